//! Audit log entries: decoding, the export filters, a JSON view of the fields, and the decision
//! in words. The entries' bytes are leaves of the log's Merkle tree ([`crate::merkle`]);
//! `docs/audit-log.md` specifies them.

use prost::Message;
use serde_json::{Value, json};

use crate::{
    envelope::{Kind, Tlp},
    pb::{self, audit_entry::Event},
};

/// The largest entry a verifier accepts: entries hold metadata only.
pub const MAX_ENTRY_BYTES: usize = 64 * 1024;

/// Why an entry could not be decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    /// The entry is larger than [`MAX_ENTRY_BYTES`].
    #[error("entry is larger than {MAX_ENTRY_BYTES} bytes")]
    TooLarge,
    /// The bytes are not an `AuditEntry`.
    #[error("entry does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The entry has no event.
    #[error("entry has no event")]
    NoEvent,
}

/// Decodes an entry's bytes.
pub fn decode(bytes: &[u8]) -> Result<pb::AuditEntry, EntryError> {
    if bytes.len() > MAX_ENTRY_BYTES {
        return Err(EntryError::TooLarge);
    }
    let entry = pb::AuditEntry::decode(bytes)?;
    if entry.event.is_none() {
        return Err(EntryError::NoEvent);
    }
    Ok(entry)
}

/// The name of an entry's event, as in exports: `transfer_accepted`, `transfer_refused`, …
pub fn event_name(entry: &pb::AuditEntry) -> &'static str {
    match &entry.event {
        Some(Event::TransferAccepted(_)) => "transfer_accepted",
        Some(Event::TransferRefused(_)) => "transfer_refused",
        Some(Event::Delivered(_)) => "delivered",
        Some(Event::Acknowledged(_)) => "acknowledged",
        Some(Event::ConsentRevoked(_)) => "consent_revoked",
        Some(Event::RecallQueued(_)) => "recall_queued",
        Some(Event::ConfigLoaded(_)) => "config_loaded",
        Some(Event::CallRefused(_)) => "call_refused",
        Some(Event::AuditExported(_)) => "audit_exported",
        Some(Event::DesignationRecorded(_)) => "designation_recorded",
        Some(Event::NoticeQueued(_)) => "notice_queued",
        Some(Event::InvolvementDeclared(_)) => "involvement_declared",
        None => "none",
    }
}

/// Which entries an export keeps. Empty fields keep everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only entries at or after this time (Unix seconds).
    pub since: Option<i64>,
    /// Only entries before this time (Unix seconds).
    pub until: Option<i64>,
    /// Only entries involving this agency.
    pub agency: Option<String>,
    /// Only entries about this organisation.
    pub organisation: Option<String>,
    /// Only refusals with this reason code.
    pub reason: Option<String>,
    /// Only entries this agency is a party to: what an agency's own export holds
    /// (`docs/audit-log.md` §4.2). Narrower than [`Filter::agency`].
    pub party: Option<String>,
}

impl Filter {
    /// Whether the filter keeps every entry.
    pub fn is_empty(&self) -> bool {
        *self == Filter::default()
    }

    /// Whether `entry` passes the filter.
    pub fn matches(&self, entry: &pb::AuditEntry) -> bool {
        let t = entry.time.as_ref().map_or(0, |t| t.seconds);
        if self.since.is_some_and(|s| t < s) || self.until.is_some_and(|u| t >= u) {
            return false;
        }
        let facts = Facts::of(entry);
        if let Some(a) = &self.agency
            && !facts.agencies.iter().any(|x| x == a)
        {
            return false;
        }
        if let Some(p) = &self.party
            && !facts.parties.iter().any(|x| x == p)
        {
            return false;
        }
        if let Some(o) = &self.organisation
            && !facts.organisations.iter().any(|x| x == o)
        {
            return false;
        }
        if let Some(r) = &self.reason
            && facts.reason != Some(r.as_str())
        {
            return false;
        }
        true
    }
}

/// What the filters read of an entry.
struct Facts<'e> {
    /// The agencies (or auditors) it involves, for [`Filter::agency`].
    agencies: Vec<&'e str>,
    /// The agencies it is about as a party, for [`Filter::party`]: a subset of `agencies`.
    parties: Vec<&'e str>,
    /// The organisations it is about.
    organisations: Vec<&'e str>,
    /// Its refusal reason, if it is a refusal.
    reason: Option<&'e str>,
}

fn nonempty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// The sender and recipients of an envelope, and every organisation it identifies: declared,
/// named by the payload, or consenting.
fn envelope_facts(e: Option<&pb::EnvelopeFacts>) -> (Vec<&str>, Vec<&str>) {
    let Some(e) = e else {
        return (Vec::new(), Vec::new());
    };
    let mut agencies = vec![e.sender.as_str()];
    agencies.extend(e.recipients.iter().map(String::as_str));
    let mut organisations: Vec<&str> = nonempty(&e.organisation).into_iter().collect();
    organisations.extend(e.organisations.iter().map(String::as_str));
    organisations.extend(e.consents.iter().map(|c| c.organisation.as_str()));
    (agencies, organisations)
}

impl<'e> Facts<'e> {
    fn of(entry: &'e pb::AuditEntry) -> Facts<'e> {
        let plain = |agencies: Vec<&'e str>| Facts {
            parties: agencies.clone(),
            agencies,
            organisations: Vec::new(),
            reason: None,
        };
        match &entry.event {
            Some(Event::TransferAccepted(a)) => {
                let (agencies, organisations) = envelope_facts(a.envelope.as_ref());
                Facts {
                    parties: agencies.clone(),
                    agencies,
                    organisations,
                    reason: None,
                }
            }
            // A refused send involves its addressees, but only its sender is a party to it:
            // nothing reached them.
            Some(Event::TransferRefused(r)) => {
                let (agencies, organisations) = envelope_facts(r.envelope.as_ref());
                Facts {
                    parties: agencies.first().copied().into_iter().collect(),
                    agencies,
                    organisations,
                    reason: Some(r.reason.as_str()),
                }
            }
            Some(Event::Delivered(d)) => plain(vec![d.recipient.as_str()]),
            Some(Event::Acknowledged(a)) => plain(vec![a.recipient.as_str()]),
            Some(Event::ConsentRevoked(r)) => Facts {
                organisations: r.organisations.iter().map(String::as_str).collect(),
                ..plain(vec![r.submitted_by.as_str()])
            },
            Some(Event::RecallQueued(q)) => Facts {
                organisations: nonempty(&q.organisation).into_iter().collect(),
                ..plain(vec![q.recipient.as_str(), q.sender.as_str()])
            },
            // A refused call involves the agency (or auditor) the certificate was recognised as.
            Some(Event::CallRefused(c)) => Facts {
                reason: Some(c.reason.as_str()),
                ..plain(nonempty(&c.caller).into_iter().collect())
            },
            // An export involves its exporter; it is about no organisation, whatever it asked
            // for.
            Some(Event::AuditExported(x)) => plain(vec![x.auditor.as_str()]),
            // A designation involves its agency and the agencies of the flows it opens; only
            // its agency is a party to it (the recipients see it in the transfers it allowed).
            Some(Event::DesignationRecorded(d)) => {
                let mut agencies = vec![d.agency.as_str()];
                agencies.extend(
                    d.flows
                        .iter()
                        .filter_map(|f| f.split_once("->").map(|(_, to)| to)),
                );
                Facts {
                    parties: vec![d.agency.as_str()],
                    ..plain(agencies)
                }
            }
            // A notice involves the agency it is for (the others it names are told in notices
            // of their own).
            Some(Event::NoticeQueued(n)) => plain(vec![n.recipient.as_str()]),
            Some(Event::InvolvementDeclared(d)) => {
                let mut agencies = vec![d.agency.as_str()];
                agencies.extend(d.notified.iter().map(String::as_str));
                plain(agencies)
            }
            Some(Event::ConfigLoaded(_)) | None => plain(Vec::new()),
        }
    }
}

fn kind_name(kind: i32) -> String {
    Kind::try_from(kind).map_or_else(|_| format!("unknown({kind})"), |k| k.as_str().to_owned())
}

/// "a" or "an" before a kind's name.
fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

fn tlp_name(tlp: i32) -> String {
    Tlp::try_from(tlp).map_or_else(|_| format!("unknown({tlp})"), |t| t.as_str().to_owned())
}

fn rfc3339(ts: Option<&prost_types::Timestamp>) -> String {
    ts.and_then(|t| {
        let nanos = i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
        time::OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()
    })
    .and_then(|t| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    })
    .unwrap_or_default()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn envelope_json(e: Option<&pb::EnvelopeFacts>) -> Value {
    let Some(e) = e else { return Value::Null };
    json!({
        "message_id": e.message_id,
        "sender": e.sender,
        "recipients": e.recipients,
        "kind": kind_name(e.kind),
        "organisation": e.organisation,
        "incident_ref": e.incident_ref,
        "tlp": tlp_name(e.tlp),
        "payload_sha256": hex(&e.payload_sha256),
        "payload_size": e.payload_size,
        "consent_jti": e.consent_jti,
        "consent_issuer": e.consent_issuer,
        "consents": e.consents.iter().map(|c| json!({
            "organisation": c.organisation, "jti": c.jti, "issuer": c.issuer,
        })).collect::<Vec<_>>(),
        "organisations": e.organisations,
        "workflow": e.workflow.as_ref().map_or(Value::Null, workflow_json),
    })
}

/// The federation-unique id of the workflow an entry belongs to (a consultation, a statement
/// or an incident), if any: what `audit explain --workflow` gathers.
pub fn workflow_subject(entry: &pb::AuditEntry) -> Option<String> {
    use pb::workflow_step::Step as W;
    let step = |e: Option<&pb::EnvelopeFacts>| -> Option<String> {
        let e = e?;
        Some(match e.workflow.as_ref()?.step.as_ref()? {
            W::DsarOpen(o) => format!("{}:{}", e.sender, o.reference),
            W::DsarAnswer(a) => a.consultation_id.clone(),
            W::DsarClose(c) => c.consultation_id.clone(),
            W::CommsPropose(p) => format!("{}:{}", e.sender, p.reference),
            W::CommsAnswer(a) => a.statement_id.clone(),
        })
    };
    match &entry.event {
        Some(Event::TransferAccepted(a)) => step(a.envelope.as_ref()),
        Some(Event::TransferRefused(r)) => step(r.envelope.as_ref()),
        Some(Event::NoticeQueued(n)) => n.notice.as_ref().map(|n| n.subject.clone()),
        Some(Event::InvolvementDeclared(d)) => Some(d.incident_ref.clone()),
        _ => None,
    }
}

/// A workflow step's fields as JSON (exports, inbox files).
pub fn workflow_json(w: &pb::WorkflowStep) -> Value {
    use pb::workflow_step::Step as W;
    match &w.step {
        Some(W::DsarOpen(o)) => json!({"step": "dsar_open", "reference": o.reference,
            "concerns": o.concerns, "organisation": o.organisation,
            "respond_by": rfc3339(o.respond_by.as_ref())}),
        Some(W::DsarAnswer(a)) => {
            use pb::dsar_answer::Answer;
            let (answer, detail) = match &a.answer {
                Some(Answer::NoObjection(_)) => ("no_objection", Value::Null),
                Some(Answer::Objection(t)) => ("objection", json!(t)),
                Some(Answer::NeedMoreTime(t)) => ("need_more_time", json!(rfc3339(Some(t)))),
                None => ("none", Value::Null),
            };
            json!({"step": "dsar_answer", "consultation_id": a.consultation_id,
                "answer": answer, "detail": detail})
        }
        Some(W::DsarClose(c)) => {
            json!({"step": "dsar_close", "consultation_id": c.consultation_id})
        }
        Some(W::CommsPropose(p)) => json!({"step": "comms_propose", "reference": p.reference,
            "publish_after": rfc3339(p.publish_after.as_ref())}),
        Some(W::CommsAnswer(a)) => {
            use pb::comms_answer::Answer;
            let (answer, detail) = match &a.answer {
                Some(Answer::Approve(_)) => ("approve", Value::Null),
                Some(Answer::Objection(t)) => ("objection", json!(t)),
                None => ("none", Value::Null),
            };
            json!({"step": "comms_answer", "statement_id": a.statement_id,
                "answer": answer, "detail": detail})
        }
        None => Value::Null,
    }
}

/// A workflow step in words, for `explain`.
fn workflow_words(sender: &str, w: &pb::WorkflowStep) -> String {
    use pb::workflow_step::Step as W;
    match &w.step {
        Some(W::DsarOpen(o)) => {
            let mut s = format!(
                "It opened subject-access consultation {sender}:{}",
                o.reference
            );
            if !o.concerns.is_empty() {
                s.push_str(&format!(
                    " concerning transfer(s) {}",
                    o.concerns.join(", ")
                ));
            }
            if !o.organisation.is_empty() {
                s.push_str(&format!(" and organisation {}", o.organisation));
            }
            if o.respond_by.is_some() {
                s.push_str(&format!(
                    ", answers due by {}",
                    rfc3339(o.respond_by.as_ref())
                ));
            }
            s + "."
        }
        Some(W::DsarAnswer(a)) => {
            use pb::dsar_answer::Answer;
            let what = match &a.answer {
                Some(Answer::NoObjection(_)) => "no objection".to_owned(),
                Some(Answer::Objection(t)) => format!("an objection on the ground: {t}"),
                Some(Answer::NeedMoreTime(t)) => {
                    format!("that it needs more time, answering by {}", rfc3339(Some(t)))
                }
                None => "nothing".to_owned(),
            };
            format!(
                "It answered consultation {} with {what}.",
                a.consultation_id
            )
        }
        Some(W::DsarClose(c)) => format!("It closed consultation {}.", c.consultation_id),
        Some(W::CommsPropose(p)) => format!(
            "It proposed public statement {sender}:{}, not to be published before {}.",
            p.reference,
            rfc3339(p.publish_after.as_ref())
        ),
        Some(W::CommsAnswer(a)) => {
            use pb::comms_answer::Answer;
            match &a.answer {
                Some(Answer::Approve(_)) => format!("It approved statement {}.", a.statement_id),
                Some(Answer::Objection(t)) => {
                    format!("It objected to statement {}: {t}", a.statement_id)
                }
                None => format!("It answered statement {}.", a.statement_id),
            }
        }
        None => String::new(),
    }
}

/// A notice's fields as JSON (exports, inbox files).
pub fn notice_json(n: &pb::Notice) -> Value {
    json!({
        "notice_id": n.notice_id, "kind": notice_kind_name(n.kind), "subject": n.subject,
        "agencies": n.agencies, "due": rfc3339(n.due.as_ref()),
        "issued_at": rfc3339(n.issued_at.as_ref()), "message": n.message,
    })
}

/// A notice kind's name (`dsar_reminder`, `dsar_deadline_passed`, `incident_coordination`).
pub fn notice_kind_name(kind: i32) -> &'static str {
    match pb::NoticeKind::try_from(kind) {
        Ok(pb::NoticeKind::DsarReminder) => "dsar_reminder",
        Ok(pb::NoticeKind::DsarDeadlinePassed) => "dsar_deadline_passed",
        Ok(pb::NoticeKind::IncidentCoordination) => "incident_coordination",
        Ok(pb::NoticeKind::Unspecified) | Err(_) => "unknown",
    }
}

fn designation_json(d: &pb::SignificanceDesignation) -> Value {
    json!({
        "jti": d.jti,
        "agency": d.agency,
        "incident_ref": d.incident_ref,
        "flows": d.flows,
        "designated_by": d.designated_by,
        "designated_by_key": d.designated_by_key,
        "countersigned_by": d.countersigned_by,
        "countersigned_by_key": d.countersigned_by_key,
        "issued_at": rfc3339(d.issued_at.as_ref()),
        "countersigned_at": rfc3339(d.countersigned_at.as_ref()),
        "expires_at": rfc3339(d.expires_at.as_ref()),
        "designation_sha256": hex(&d.designation_sha256),
    })
}

/// A designation in words, for `explain`.
fn designation_words(d: &pb::SignificanceDesignation) -> String {
    format!(
        "incident {} of {} designated of national significance (designation {}) by officer {} \
         ({}) on {}, countersigned by officer {} ({}) on {}; it opens {} until {}",
        d.incident_ref,
        d.agency,
        d.jti,
        d.designated_by,
        d.designated_by_key,
        rfc3339(d.issued_at.as_ref()),
        d.countersigned_by,
        d.countersigned_by_key,
        rfc3339(d.countersigned_at.as_ref()),
        d.flows.join(", "),
        rfc3339(d.expires_at.as_ref()),
    )
}

/// The entry's fields as JSON, for exports (informative: verifiers hash the entry bytes).
pub fn to_json(entry: &pb::AuditEntry) -> Value {
    let details = match &entry.event {
        Some(Event::TransferAccepted(a)) => {
            let mut v = json!({
                "transfer_id": a.transfer_id,
                "envelope": envelope_json(a.envelope.as_ref()),
                "authorities": a.authorities.iter().map(|x| json!({
                    "recipient": x.recipient, "agreement_id": x.agreement_id, "clause": x.clause,
                })).collect::<Vec<_>>(),
                "stix_object_ids": a.stix_object_ids,
            });
            if let (Some(d), Some(map)) = (&a.designation, v.as_object_mut()) {
                map.insert("designation".into(), designation_json(d));
            }
            v
        }
        Some(Event::DesignationRecorded(d)) => designation_json(d),
        Some(Event::NoticeQueued(q)) => {
            let mut v = notice_json(&q.notice.clone().unwrap_or_default());
            if let Some(map) = v.as_object_mut() {
                map.insert("recipient".into(), json!(q.recipient));
            }
            v
        }
        Some(Event::InvolvementDeclared(d)) => json!({
            "agency": d.agency, "incident_ref": d.incident_ref, "notified": d.notified,
            "involved": d.involved, "duplicate": d.duplicate,
        }),
        Some(Event::TransferRefused(r)) => json!({
            "envelope": envelope_json(r.envelope.as_ref()),
            "reason": r.reason,
            "message": r.message,
            "agreement_id": r.agreement_id,
            "clause": r.clause,
        }),
        Some(Event::Delivered(d)) => json!({
            "recipient": d.recipient, "delivery_id": d.delivery_id,
            "transfer_id": d.transfer_id, "recall_notice": d.recall_notice,
        }),
        Some(Event::Acknowledged(a)) => json!({
            "recipient": a.recipient, "delivery_id": a.delivery_id,
            "transfer_id": a.transfer_id, "recall_notice": a.recall_notice,
        }),
        Some(Event::ConsentRevoked(r)) => {
            let mut v = json!({
                "submitted_by": r.submitted_by, "issuer": r.issuer, "jti": r.jti,
                "issued_before": rfc3339(r.issued_before.as_ref()),
                "recall_notices": r.recall_notices,
            });
            // Only when known, so that the view of an entry logged before the field is unchanged.
            if let (false, Some(map)) = (r.organisations.is_empty(), v.as_object_mut()) {
                map.insert("organisations".into(), json!(r.organisations));
            }
            v
        }
        Some(Event::RecallQueued(q)) => json!({
            "recipient": q.recipient, "transfer_id": q.transfer_id, "message_id": q.message_id,
            "consent_jti": q.consent_jti, "consent_issuer": q.consent_issuer,
            "organisation": q.organisation, "sender": q.sender,
        }),
        Some(Event::ConfigLoaded(c)) => json!({
            "config_sha256": hex(&c.config_sha256), "source": c.source, "broker_version": c.broker_version,
            "changes": c.changes, "occasion": c.occasion,
        }),
        Some(Event::CallRefused(c)) => json!({
            "rpc": c.rpc, "caller": c.caller, "cert_subject": c.cert_subject,
            "cert_sha256": hex(&c.cert_sha256), "reason": c.reason, "message": c.message,
            "count": c.count, "first_at": rfc3339(c.first_at.as_ref()),
            "last_at": rfc3339(c.last_at.as_ref()),
        }),
        Some(Event::AuditExported(x)) => json!({
            "auditor": x.auditor, "since": rfc3339(x.since.as_ref()),
            "until": rfc3339(x.until.as_ref()), "agency": x.agency,
            "organisation": x.organisation, "reason": x.reason, "index_from": x.index_from,
            "index_to": x.index_to, "checkpoint_size": x.checkpoint_size, "entries": x.entries,
            "complete": x.complete,
        }),
        None => Value::Null,
    };
    json!({
        "time": rfc3339(entry.time.as_ref()),
        "event": event_name(entry),
        "details": details,
    })
}

/// The decision or event in words: which rule, which agreement clause, which token.
pub fn explain(index: u64, entry: &pb::AuditEntry) -> String {
    let when = rfc3339(entry.time.as_ref());
    let consent = |e: &pb::EnvelopeFacts| {
        if e.consents.len() > 1 {
            let each: Vec<String> = e
                .consents
                .iter()
                .map(|c| {
                    format!(
                        "{} (token {} signed by issuer {})",
                        c.organisation, c.jti, c.issuer
                    )
                })
                .collect();
            return format!(
                "{} organisations were identified and each consented: {}.",
                e.consents.len(),
                each.join("; ")
            );
        }
        if e.consent_jti.is_empty() {
            if e.organisation.is_empty() {
                "No organisation was named, so no consent was needed (anonymised or aggregate information).".to_owned()
            } else {
                format!(
                    "Organisation {} was named; no valid consent token was established.",
                    e.organisation
                )
            }
        } else {
            format!(
                "Organisation {} consented: token {} signed by issuer {}.",
                e.organisation, e.consent_jti, e.consent_issuer
            )
        }
    };
    match &entry.event {
        Some(Event::TransferAccepted(a)) => {
            let Some(e) = &a.envelope else {
                return format!(
                    "Entry {index} ({when}): a transfer was accepted (no details recorded)."
                );
            };
            let mut s = format!(
                "Entry {index} ({when}): the broker ACCEPTED transfer {} (message {}) of {} {} marked TLP:{} from {} to {}.\n",
                a.transfer_id,
                e.message_id,
                article(&kind_name(e.kind)),
                kind_name(e.kind),
                tlp_name(e.tlp).to_uppercase(),
                e.sender,
                e.recipients.join(", ")
            );
            for x in &a.authorities {
                s.push_str(&format!(
                    "  Flow to {} is permitted by agreement {}, clause: {}.\n",
                    x.recipient, x.agreement_id, x.clause
                ));
            }
            if let Some(d) = &a.designation {
                s.push_str(&format!(
                    "  Legal basis: national significance: {}.\n",
                    designation_words(d)
                ));
            }
            s.push_str(&format!("  {}\n", consent(e)));
            if let Some(w) = &e.workflow {
                s.push_str(&format!("  {}\n", workflow_words(&e.sender, w)));
            }
            if !a.stix_object_ids.is_empty() {
                s.push_str(&format!(
                    "  It carried {} STIX object(s): {}.\n",
                    a.stix_object_ids.len(),
                    a.stix_object_ids.join(", ")
                ));
            }
            s.push_str(&format!(
                "  Payload: {} bytes, SHA-256 {}.",
                e.payload_size,
                hex(&e.payload_sha256)
            ));
            s
        }
        Some(Event::TransferRefused(r)) => {
            let who = r.envelope.as_ref().map_or_else(String::new, |e| {
                format!(
                    " {} {} (message {}) from {} to {}",
                    article(&kind_name(e.kind)),
                    kind_name(e.kind),
                    e.message_id,
                    e.sender,
                    e.recipients.join(", ")
                )
            });
            let under = match (r.agreement_id.as_str(), r.clause.as_str()) {
                ("", _) => String::new(),
                ("none", _) => "\n  No agreement covers this flow.".to_owned(),
                (agreement, clause) => {
                    format!("\n  Judged under agreement {agreement}, clause: {clause}.")
                }
            };
            format!(
                "Entry {index} ({when}): the broker REFUSED{who}.\n  Rule: {} — {}{under}",
                r.reason, r.message
            )
        }
        Some(Event::Delivered(d)) => format!(
            "Entry {index} ({when}): {} {} was handed to {} (delivery {}).",
            if d.recall_notice {
                "a recall notice for transfer"
            } else {
                "transfer"
            },
            d.transfer_id,
            d.recipient,
            d.delivery_id
        ),
        Some(Event::Acknowledged(a)) => format!(
            "Entry {index} ({when}): {} acknowledged {} {} (delivery {}): it is stored on its side.",
            a.recipient,
            if a.recall_notice {
                "the recall notice for transfer"
            } else {
                "transfer"
            },
            a.transfer_id,
            a.delivery_id
        ),
        Some(Event::ConsentRevoked(r)) => {
            let what = if r.jti.is_empty() {
                format!(
                    "every token it issued before {}",
                    rfc3339(r.issued_before.as_ref())
                )
            } else {
                format!("consent token {}", r.jti)
            };
            let whose = if r.organisations.is_empty() {
                String::new()
            } else {
                format!(" of {}", r.organisations.join(", "))
            };
            format!(
                "Entry {index} ({when}): consent issuer {} revoked {what}{whose} (statement submitted by {}); {} recall notice(s) queued.",
                r.issuer, r.submitted_by, r.recall_notices
            )
        }
        Some(Event::NoticeQueued(q)) => {
            let n = q.notice.clone().unwrap_or_default();
            format!(
                "Entry {index} ({when}): the broker queued a {} notice {} about {} for {}: {}",
                notice_kind_name(n.kind),
                n.notice_id,
                n.subject,
                q.recipient,
                n.message
            )
        }
        Some(Event::InvolvementDeclared(d)) => {
            if d.duplicate {
                format!(
                    "Entry {index} ({when}): {} declared again that it is involved in incident {}; nothing changed.",
                    d.agency, d.incident_ref
                )
            } else if d.notified.is_empty() {
                format!(
                    "Entry {index} ({when}): {} declared that it is involved in incident {}; no other agency it has an agreement with had declared it.",
                    d.agency, d.incident_ref
                )
            } else {
                format!(
                    "Entry {index} ({when}): {} declared that it is involved in incident {}; coordination notices were queued for it and for {}.",
                    d.agency,
                    d.incident_ref,
                    d.notified.join(", ")
                )
            }
        }
        Some(Event::RecallQueued(q)) => format!(
            "Entry {index} ({when}): a recall notice for transfer {} (message {}, organisation {}) was queued for {} because consent token {} was revoked.",
            q.transfer_id, q.message_id, q.organisation, q.recipient, q.consent_jti
        ),
        Some(Event::ConfigLoaded(c)) if c.occasion == "reload" => format!(
            "Entry {index} ({when}): broker {} reloaded its configuration {} (SHA-256 {}); {}.",
            c.broker_version,
            c.source,
            hex(&c.config_sha256),
            if c.changes.is_empty() {
                "nothing changed".to_owned()
            } else {
                format!("changes: {}", c.changes.join("; "))
            }
        ),
        Some(Event::ConfigLoaded(c)) => format!(
            "Entry {index} ({when}): broker {} started with configuration {} (SHA-256 {}).",
            c.broker_version,
            c.source,
            hex(&c.config_sha256)
        ),
        Some(Event::CallRefused(c)) => {
            let who = if c.caller.is_empty() {
                "a certificate that names no caller of this federation".to_owned()
            } else {
                c.caller.clone()
            };
            let mut s = format!(
                "Entry {index} ({when}): the broker REFUSED a {} call from {who} (certificate subject {:?}, SHA-256 {}).\n  Rule: {} — {}",
                c.rpc,
                c.cert_subject,
                hex(&c.cert_sha256),
                c.reason,
                c.message
            );
            if c.count > 1 {
                s.push_str(&format!(
                    "\n  This entry stands for {} identical refusals from {} to {}.",
                    c.count,
                    rfc3339(c.first_at.as_ref()),
                    rfc3339(c.last_at.as_ref())
                ));
            }
            s
        }
        Some(Event::DesignationRecorded(d)) => format!(
            "Entry {index} ({when}): the broker recorded a designation it relies on for the first time: {}.",
            designation_words(d)
        ),
        Some(Event::AuditExported(x)) => {
            let mut filter = Vec::new();
            if x.since.is_some() {
                filter.push(format!("since {}", rfc3339(x.since.as_ref())));
            }
            if x.until.is_some() {
                filter.push(format!("until {}", rfc3339(x.until.as_ref())));
            }
            for (name, value) in [
                ("agency", &x.agency),
                ("organisation", &x.organisation),
                ("reason", &x.reason),
            ] {
                if !value.is_empty() {
                    filter.push(format!("{name} {value}"));
                }
            }
            let filter = if filter.is_empty() {
                "no filter".to_owned()
            } else {
                format!("filter {}", filter.join(", "))
            };
            format!(
                "Entry {index} ({when}): auditor {} exported entries {} to {} of the log as of size {} ({filter}): {} entr{} sent{}.",
                x.auditor,
                x.index_from,
                x.index_to,
                x.checkpoint_size,
                x.entries,
                if x.entries == 1 { "y" } else { "ies" },
                if x.complete {
                    ""
                } else {
                    ", then it stopped early"
                }
            )
        }
        None => format!("Entry {index} ({when}): no event."),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn refused(sender: &str, org: &str, reason: &str, seconds: i64) -> pb::AuditEntry {
        pb::AuditEntry {
            time: Some(prost_types::Timestamp { seconds, nanos: 0 }),
            event: Some(Event::TransferRefused(pb::TransferRefused {
                envelope: Some(pb::EnvelopeFacts {
                    sender: sender.into(),
                    recipients: vec!["ico".into()],
                    organisation: org.into(),
                    ..Default::default()
                }),
                reason: reason.into(),
                message: "m".into(),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn filters() {
        let e = refused("ncsc", "acme-ltd", "CONSENT_MISSING", 100);
        let cases: &[(Filter, bool)] = &[
            (Filter::default(), true),
            (
                Filter {
                    agency: Some("ico".into()),
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    agency: Some("nca".into()),
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    organisation: Some("acme-ltd".into()),
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    organisation: Some("other".into()),
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    reason: Some("CONSENT_MISSING".into()),
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    reason: Some("NO_AGREEMENT".into()),
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    since: Some(100),
                    until: Some(101),
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    since: Some(101),
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    until: Some(100),
                    ..Default::default()
                },
                false,
            ),
        ];
        for (f, expected) in cases {
            assert_eq!(f.matches(&e), *expected, "{f:?}");
        }
    }

    fn call_refused(caller: &str, reason: &str, count: u32) -> pb::AuditEntry {
        pb::AuditEntry {
            time: Some(prost_types::Timestamp {
                seconds: 100,
                nanos: 0,
            }),
            event: Some(Event::CallRefused(pb::CallRefused {
                rpc: "Exchange.Send".into(),
                caller: caller.into(),
                cert_subject: "CN=mi6".into(),
                cert_sha256: vec![0xab; 32],
                reason: reason.into(),
                message: "m".into(),
                count,
                first_at: Some(prost_types::Timestamp {
                    seconds: 40,
                    nanos: 0,
                }),
                last_at: Some(prost_types::Timestamp {
                    seconds: 90,
                    nanos: 0,
                }),
            })),
        }
    }

    #[test]
    fn refused_calls_and_exports_filter_by_caller_and_reason() {
        let by = |agency: Option<&str>, org: Option<&str>, reason: Option<&str>| Filter {
            agency: agency.map(Into::into),
            organisation: org.map(Into::into),
            reason: reason.map(Into::into),
            ..Default::default()
        };
        let unknown = call_refused("", "UNKNOWN_AGENCY", 1);
        let auditor = call_refused("auditor", "NOT_AUTHORISED", 1);
        let export = pb::AuditEntry {
            time: None,
            event: Some(Event::AuditExported(pb::AuditExported {
                auditor: "auditor".into(),
                organisation: "acme-ltd".into(),
                ..Default::default()
            })),
        };
        let cases: &[(&pb::AuditEntry, Filter, bool)] = &[
            (&unknown, by(None, None, Some("UNKNOWN_AGENCY")), true),
            (&unknown, by(None, None, Some("NOT_AUTHORISED")), false),
            (&unknown, by(Some("ico"), None, None), false),
            (&unknown, by(None, Some("acme-ltd"), None), false),
            (&auditor, by(Some("auditor"), None, None), true),
            (&auditor, by(Some("ico"), None, None), false),
            (
                &auditor,
                by(Some("auditor"), None, Some("NOT_AUTHORISED")),
                true,
            ),
            (&export, by(Some("auditor"), None, None), true),
            (&export, by(Some("ico"), None, None), false),
            (&export, by(None, Some("acme-ltd"), None), false),
            (&export, by(None, None, Some("NOT_AUTHORISED")), false),
        ];
        for (entry, filter, expected) in cases {
            assert_eq!(filter.matches(entry), *expected, "{entry:?} {filter:?}");
        }
    }

    fn revoked(submitted_by: &str, organisations: &[&str]) -> pb::AuditEntry {
        pb::AuditEntry {
            time: None,
            event: Some(Event::ConsentRevoked(pb::ConsentRevoked {
                submitted_by: submitted_by.into(),
                issuer: "k4.pid.x".into(),
                jti: "j".into(),
                organisations: organisations.iter().map(|o| (*o).to_owned()).collect(),
                ..Default::default()
            })),
        }
    }

    fn accepted(sender: &str, recipients: &[&str], facts: pb::EnvelopeFacts) -> pb::AuditEntry {
        pb::AuditEntry {
            time: None,
            event: Some(Event::TransferAccepted(pb::TransferAccepted {
                transfer_id: "t".into(),
                envelope: Some(pb::EnvelopeFacts {
                    sender: sender.into(),
                    recipients: recipients.iter().map(|r| (*r).to_owned()).collect(),
                    ..facts
                }),
                ..Default::default()
            })),
        }
    }

    /// `--org` keeps every entry about the organisation: a revocation of its consent, a
    /// recall notice, and a transfer that names it anywhere (declared, named by the payload, or
    /// consenting), not only as the declared organisation.
    #[test]
    fn the_organisation_filter_keeps_everything_about_the_organisation() {
        let org = |o: &str| Filter {
            organisation: Some(o.into()),
            ..Default::default()
        };
        let declared = accepted(
            "ncsc",
            &["ico"],
            pb::EnvelopeFacts {
                organisation: "acme-ltd".into(),
                ..Default::default()
            },
        );
        let named = accepted(
            "ncsc",
            &["ico"],
            pb::EnvelopeFacts {
                organisation: "beta-plc".into(),
                organisations: vec!["acme-ltd".into()],
                ..Default::default()
            },
        );
        let consented = accepted(
            "ncsc",
            &["ico"],
            pb::EnvelopeFacts {
                consents: vec![pb::ConsentRef {
                    organisation: "acme-ltd".into(),
                    jti: "j".into(),
                    issuer: "i".into(),
                }],
                ..Default::default()
            },
        );
        let recall = pb::AuditEntry {
            time: None,
            event: Some(Event::RecallQueued(pb::RecallQueued {
                recipient: "ico".into(),
                sender: "ncsc".into(),
                organisation: "acme-ltd".into(),
                ..Default::default()
            })),
        };
        let cases: &[(&str, pb::AuditEntry, &str, bool)] = &[
            (
                "revocation of its consent",
                revoked("ncsc", &["acme-ltd"]),
                "acme-ltd",
                true,
            ),
            (
                "revocation among several",
                revoked("ncsc", &["beta-plc", "acme-ltd"]),
                "acme-ltd",
                true,
            ),
            (
                "revocation of another's consent",
                revoked("ncsc", &["beta-plc"]),
                "acme-ltd",
                false,
            ),
            (
                "revocation of unknown consents",
                revoked("ncsc", &[]),
                "acme-ltd",
                false,
            ),
            ("declared", declared.clone(), "acme-ltd", true),
            ("declared, another asked", declared, "beta-plc", false),
            ("named by the payload", named.clone(), "acme-ltd", true),
            ("named, the declared one asked", named, "beta-plc", true),
            ("consenting", consented, "acme-ltd", true),
            ("recall notice", recall.clone(), "acme-ltd", true),
            ("recall notice, another asked", recall, "beta-plc", false),
        ];
        for (what, entry, asked, expected) in cases {
            assert_eq!(org(asked).matches(entry), *expected, "{what}");
        }
    }

    /// An agency's own export ([`Filter::party`]) keeps exactly the entries it is a party to,
    /// which is narrower than `--agency`: not the refusals of sends addressed to it, not a
    /// designation of another agency that opens a flow to it, not the configuration.
    #[test]
    fn a_party_sees_only_its_own_entries() {
        let party = |a: &str| Filter {
            party: Some(a.into()),
            ..Default::default()
        };
        let agency = |a: &str| Filter {
            agency: Some(a.into()),
            ..Default::default()
        };
        let sent = accepted("ncsc", &["ico", "nca"], pb::EnvelopeFacts::default());
        let refused_send = refused("ncsc", "acme-ltd", "CONSENT_MISSING", 100);
        let delivered = pb::AuditEntry {
            time: None,
            event: Some(Event::Delivered(pb::Delivered {
                recipient: "ico".into(),
                ..Default::default()
            })),
        };
        let designation = pb::AuditEntry {
            time: None,
            event: Some(Event::DesignationRecorded(pb::SignificanceDesignation {
                agency: "ncsc".into(),
                flows: vec!["ncsc->ico".into()],
                ..Default::default()
            })),
        };
        let config = pb::AuditEntry {
            time: None,
            event: Some(Event::ConfigLoaded(pb::ConfigLoaded::default())),
        };
        let export = pb::AuditEntry {
            time: None,
            event: Some(Event::AuditExported(pb::AuditExported {
                auditor: "ico".into(),
                ..Default::default()
            })),
        };
        let recall = pb::AuditEntry {
            time: None,
            event: Some(Event::RecallQueued(pb::RecallQueued {
                recipient: "ico".into(),
                sender: "ncsc".into(),
                ..Default::default()
            })),
        };
        let cases: &[(&str, &pb::AuditEntry, &str, bool)] = &[
            ("its send", &sent, "ncsc", true),
            ("a send to it", &sent, "ico", true),
            ("a send to it and another", &sent, "nca", true),
            ("a send it has no part in", &sent, "dwp", false),
            ("its refused send", &refused_send, "ncsc", true),
            (
                "a refused send addressed to it",
                &refused_send,
                "ico",
                false,
            ),
            ("a delivery to it", &delivered, "ico", true),
            ("a delivery to another", &delivered, "ncsc", false),
            ("its revocation", &revoked("ncsc", &[]), "ncsc", true),
            ("another's revocation", &revoked("ncsc", &[]), "ico", false),
            ("a recall of its transfer", &recall, "ncsc", true),
            ("a recall sent to it", &recall, "ico", true),
            ("its designation", &designation, "ncsc", true),
            (
                "a designation opening a flow to it",
                &designation,
                "ico",
                false,
            ),
            ("the configuration", &config, "ncsc", false),
            ("its own export", &export, "ico", true),
            ("another's export", &export, "ncsc", false),
            (
                "its refused call",
                &call_refused("ico", "MALFORMED", 1),
                "ico",
                true,
            ),
            (
                "another's refused call",
                &call_refused("nca", "MALFORMED", 1),
                "ico",
                false,
            ),
        ];
        for (what, entry, who, expected) in cases {
            assert_eq!(party(who).matches(entry), *expected, "{what}");
        }
        // `--agency` (an auditor's filter) is wider where the party is not.
        assert!(agency("ico").matches(&refused_send));
        assert!(agency("ico").matches(&designation));
    }

    #[test]
    fn refused_calls_and_exports_explain_themselves() {
        let folded = call_refused("", "UNKNOWN_AGENCY", 99);
        let words = explain(3, &folded);
        for needle in [
            "REFUSED",
            "Exchange.Send",
            "CN=mi6",
            &"ab".repeat(32),
            "UNKNOWN_AGENCY",
            "99 identical",
        ] {
            assert!(words.contains(needle), "{needle}: {words}");
        }
        let json = to_json(&decode(&folded.encode_to_vec()).unwrap());
        assert_eq!(json["event"], "call_refused");
        assert_eq!(json["details"]["count"], 99);
        assert_eq!(json["details"]["cert_sha256"], "ab".repeat(32));
        let export = pb::AuditEntry {
            time: None,
            event: Some(Event::AuditExported(pb::AuditExported {
                auditor: "auditor".into(),
                reason: "NO_AGREEMENT".into(),
                index_to: 9,
                checkpoint_size: 9,
                entries: 2,
                complete: true,
                ..Default::default()
            })),
        };
        let words = explain(4, &export);
        assert!(
            words.contains("auditor auditor exported entries 0 to 9"),
            "{words}"
        );
        assert!(words.contains("reason NO_AGREEMENT"), "{words}");
        assert!(words.contains("2 entries sent."), "{words}");
        assert_eq!(to_json(&export)["event"], "audit_exported");
    }

    #[test]
    fn an_accepted_bundle_names_the_objects_it_carried() {
        let ids = [
            "indicator--6f1e5a2b-3c4d-4e5f-8a6b-7c8d9e0f1a2b",
            "malware--9a8b7c6d-5e4f-4321-9fed-cba987654321",
        ];
        let entry = pb::AuditEntry {
            time: None,
            event: Some(Event::TransferAccepted(pb::TransferAccepted {
                transfer_id: "t-1".into(),
                envelope: Some(pb::EnvelopeFacts {
                    sender: "ncsc".into(),
                    recipients: vec!["ico".into()],
                    tlp: pb::Tlp::Red as i32,
                    ..Default::default()
                }),
                authorities: Vec::new(),
                stix_object_ids: ids.iter().map(|s| (*s).to_owned()).collect(),
                designation: None,
            })),
        };
        let back = decode(&entry.encode_to_vec()).unwrap();
        let words = explain(5, &back);
        assert!(
            words.contains(&format!("It carried 2 STIX object(s): {}.", ids.join(", "))),
            "{words}"
        );
        assert_eq!(to_json(&back)["details"]["stix_object_ids"], json!(ids));
        // Without a bundle, nothing is said of objects.
        let mut plain = back.clone();
        if let Some(Event::TransferAccepted(a)) = &mut plain.event {
            a.stix_object_ids.clear();
        }
        assert!(!explain(5, &plain).contains("STIX"));
    }

    #[test]
    fn decode_and_explain() {
        let e = refused("ncsc", "acme-ltd", "CONSENT_MISSING", 100);
        let back = decode(&e.encode_to_vec()).unwrap();
        assert_eq!(back, e);
        let words = explain(7, &back);
        assert!(words.contains("REFUSED"), "{words}");
        assert!(words.contains("CONSENT_MISSING"), "{words}");
        assert_eq!(to_json(&back)["event"], "transfer_refused");
        assert!(matches!(decode(&[0xff, 0xff]), Err(EntryError::Decode(_))));
        assert!(matches!(decode(&[]), Err(EntryError::NoEvent)));
    }

    /// A reload's entry says what changed, in the decoded view and in words; a start-up's
    /// (and one written before `changes` and `occasion` existed) says the broker started.
    #[test]
    fn config_loaded_says_start_or_reload_and_what_changed() {
        let loaded = |occasion: &str, changes: &[&str]| pb::AuditEntry {
            time: None,
            event: Some(Event::ConfigLoaded(pb::ConfigLoaded {
                config_sha256: vec![0xab; 32],
                source: "/etc/concordat/broker.toml".into(),
                broker_version: "1.2.3".into(),
                changes: changes.iter().map(|c| (*c).to_owned()).collect(),
                occasion: occasion.into(),
            })),
        };
        let reload = loaded(
            "reload",
            &[
                "agreement ico-nca: added",
                "listen: 127.0.0.1:7443 -> 0.0.0.0:7443 (needs a restart)",
            ],
        );
        let back = decode(&reload.encode_to_vec()).unwrap();
        let words = explain(9, &back);
        assert!(words.contains("reloaded its configuration"), "{words}");
        assert!(words.contains("agreement ico-nca: added"), "{words}");
        assert!(words.contains("(needs a restart)"), "{words}");
        let view = to_json(&back);
        assert_eq!(view["event"], "config_loaded");
        assert_eq!(view["details"]["occasion"], "reload");
        assert_eq!(
            view["details"]["changes"],
            json!([
                "agreement ico-nca: added",
                "listen: 127.0.0.1:7443 -> 0.0.0.0:7443 (needs a restart)"
            ])
        );
        assert_eq!(view["details"]["config_sha256"], "ab".repeat(32));
        for occasion in ["start", ""] {
            let words = explain(0, &loaded(occasion, &[]));
            assert!(words.contains("started with configuration"), "{words}");
            assert_eq!(
                to_json(&loaded(occasion, &[]))["details"]["changes"],
                json!([])
            );
        }
    }
}
