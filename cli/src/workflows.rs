//! The MoUs' workflows from the operator's side (docs/workflows.md): `concordat dsar`,
//! `concordat comms` and `concordat incident`, and the story of one workflow told from the
//! audit log (`concordat audit explain --workflow`).
//!
//! Every step (open, answer, close, propose, approve, object) is an envelope sent with
//! `Exchange.Send` that carries the step: the broker decides it like any transfer and applies
//! the step to the workflow's state in the same act, so a refused step changed nothing. A step
//! without a payload file carries a small JSON document describing it ([`step_document`]). The
//! status commands, `dsar find` and `incident involve` ask the `Workflows` service.
//!
//! Each command returns a [`Report`]: the words to print and whether the broker refused, which
//! the binary turns into an exit status. The JSON forms (`--json`) are the `*Report` types
//! serialised with serde; their field names are the documented interface (README,
//! "Workflows").

use std::{fmt::Write as _, path::Path};

use anyhow::Context as _;
use concordat_proto::{
    audit,
    envelope::{Kind, Tlp},
    ids::{AgencyId, MessageId, OrgId},
    pb,
    workflow::{
        CommsAnswer, DsarAnswer, DsarOpen, Reference, Step, WorkflowId, parse_deadline,
        parse_not_before,
    },
};
use concordat_support::escape::Escaped;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use concordat_agent::client::ClientTls;

use crate::operator::{self, SendOutcome, describe_status, refusal_of};

/// What a command did, for a person, and whether the broker refused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The words to print (ends with a newline).
    pub text: String,
    /// The broker refused (the binary exits with its "refused" status).
    pub refused: bool,
}

impl Report {
    fn done(text: String) -> Report {
        Report {
            text,
            refused: false,
        }
    }

    fn refused(reason: &str, message: &str) -> Report {
        Report {
            text: format!("refused: {reason}: {message}\n"),
            refused: true,
        }
    }
}

/// A step's own payload: a file and its media type.
#[derive(Debug, Clone)]
pub struct Payload {
    /// The bytes.
    pub bytes: Vec<u8>,
    /// Its media type.
    pub content_type: String,
}

impl Payload {
    /// Reads `path` as the payload of type `content_type`.
    pub fn read(path: &Path, content_type: &str) -> anyhow::Result<Payload> {
        Ok(Payload {
            bytes: std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
            content_type: content_type.to_owned(),
        })
    }

    /// Reads a draft statement: `text/markdown` for `.md`, `text/plain` for `.txt`, else
    /// `content_type`, which must then be given.
    pub fn statement(path: &Path, content_type: Option<&str>) -> anyhow::Result<Payload> {
        let by_extension = match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("md") => Some("text/markdown"),
            Some(e) if e.eq_ignore_ascii_case("txt") => Some("text/plain"),
            _ => None,
        };
        let content_type = content_type.or(by_extension).with_context(|| {
            format!(
                "{}: give --content-type (only .md and .txt files have a default)",
                path.display()
            )
        })?;
        Payload::read(path, content_type)
    }
}

/// The agency of a client certificate (its common name), which the broker takes for the
/// caller: the owner of the ids it chooses (`<agency>:<reference>`).
pub fn own_agency(tls: &ClientTls) -> anyhow::Result<AgencyId> {
    tls.agency()
}

/// Reads a workflow id given on the command line: `<agency>:<reference>`, or, where `own`
/// is given, the caller's own reference without prefix.
pub fn workflow_id(text: &str, own: Option<&AgencyId>) -> anyhow::Result<WorkflowId> {
    let parsed = match own {
        Some(own) => WorkflowId::qualify(own, text),
        None => text.parse(),
    };
    parsed.map_err(|e| anyhow::anyhow!("{text:?} is not a workflow id (<agency>:<reference>): {e}"))
}

/// The JSON document a step carries when it has no payload of its own: what the step says,
/// for the recipient's systems. It never names the organisation (`organisation` in the step
/// is for the broker, which checks it was already disclosed; naming it in the payload would
/// be a new disclosure the content gate refuses without consent).
pub fn step_document(id: &WorkflowId, step: &Step) -> Vec<u8> {
    let mut doc = audit::workflow_json(&pb::WorkflowStep::from(step));
    if let Some(map) = doc.as_object_mut() {
        map.remove("organisation");
        map.insert("id".into(), id.to_string().into());
    }
    serde_json::to_vec_pretty(&doc).unwrap_or_default()
}

/// The id of the workflow a step belongs to, `sender` sending it.
fn id_of(sender: &AgencyId, step: &Step) -> WorkflowId {
    match step {
        Step::DsarOpen(o) => WorkflowId {
            owner: sender.clone(),
            reference: o.reference.clone(),
        },
        Step::CommsPropose { reference, .. } => WorkflowId {
            owner: sender.clone(),
            reference: reference.clone(),
        },
        Step::DsarAnswer { consultation, .. } | Step::DsarClose { consultation } => {
            consultation.clone()
        }
        Step::CommsAnswer { statement, .. } => statement.clone(),
    }
}

/// Sends `step` to `to` as an envelope of the step's kind (TLP amber), with `payload` or the
/// step's own document. `message_id`: a fresh one if `None`.
pub async fn send_step(
    tls: &ClientTls,
    own: &AgencyId,
    to: Vec<AgencyId>,
    step: Step,
    payload: Option<Payload>,
    message_id: Option<MessageId>,
) -> anyhow::Result<SendOutcome> {
    let id = id_of(own, &step);
    let payload = payload.unwrap_or_else(|| Payload {
        bytes: step_document(&id, &step),
        content_type: "application/json".into(),
    });
    let mut envelope = operator::envelope(
        message_id,
        to,
        step.kind(),
        None,
        None,
        None,
        Tlp::Amber,
        payload.content_type,
        payload.bytes,
    );
    envelope.workflow = Some(step);
    operator::send(tls, envelope).await
}

/// The lines every accepted step prints after its first: the transfer, its audit entry and
/// the broker's warnings.
fn receipt_lines(s: &mut String, r: &pb::Receipt) {
    let _ = write!(s, "  transfer {} (message {})", r.transfer_id, r.message_id);
    if let Some(a) = &r.audit {
        let _ = write!(s, ", audit entry {}", a.log_index);
    }
    if r.duplicate {
        s.push_str(", sent before: the first decision returned");
    }
    s.push('\n');
    for w in &r.warnings {
        let _ = writeln!(s, "  warning: {}", Escaped(w));
    }
}

fn rfc3339(t: Option<&prost_types::Timestamp>) -> Option<String> {
    let t = t?;
    OffsetDateTime::from_unix_timestamp(t.seconds)
        .ok()?
        .format(&time::format_description::well_known::Rfc3339)
        .ok()
}

fn format_time(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

fn join(agencies: &[AgencyId]) -> String {
    agencies
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------------
// dsar

/// `concordat dsar open`.
#[derive(Debug, Clone)]
pub struct OpenRequest {
    /// The consulted agencies.
    pub with: Vec<AgencyId>,
    /// The requester's reference.
    pub reference: String,
    /// The transfers it concerns.
    pub concerns: Vec<uuid::Uuid>,
    /// The organisation it concerns.
    pub organisation: Option<OrgId>,
    /// The deadline, as given (a date or an RFC 3339 time).
    pub respond_by: Option<String>,
    /// A payload of its own (the request's details).
    pub payload: Option<Payload>,
}

/// `concordat dsar open`: opens a consultation with the agencies in `request.with`.
pub async fn dsar_open(tls: &ClientTls, request: OpenRequest) -> anyhow::Result<Report> {
    let own = own_agency(tls)?;
    let reference: Reference = request
        .reference
        .parse()
        .map_err(|e| anyhow::anyhow!("--ref {:?} {e}", request.reference))?;
    let respond_by = request
        .respond_by
        .as_deref()
        .map(|t| parse_deadline(t).map_err(|e| anyhow::anyhow!("--respond-by: {e}")))
        .transpose()?;
    let step = Step::DsarOpen(DsarOpen {
        reference: reference.clone(),
        concerns: request.concerns.clone(),
        organisation: request.organisation.clone(),
        respond_by,
    });
    let id = WorkflowId {
        owner: own.clone(),
        reference,
    };
    let outcome = send_step(tls, &own, request.with.clone(), step, request.payload, None).await?;
    let receipt = match outcome {
        SendOutcome::Accepted(r) => r,
        SendOutcome::Refused { reason, message } => return Ok(Report::refused(&reason, &message)),
    };
    let mut s = format!(
        "opened subject-access consultation {id} with {}\n",
        join(&request.with)
    );
    receipt_lines(&mut s, &receipt);
    if !request.concerns.is_empty() {
        let concerns: Vec<String> = request.concerns.iter().map(ToString::to_string).collect();
        let _ = writeln!(s, "  concerning transfer(s) {}", concerns.join(", "));
    }
    if let Some(org) = &request.organisation {
        let _ = writeln!(s, "  concerning organisation {org}");
    }
    // The deadlines the broker set (the agreement's default when none was given).
    match consultations(tls, &id.to_string(), true).await {
        Ok(list) => {
            for c in list.iter().filter(|c| c.consultation_id == id.to_string()) {
                for p in &c.parties {
                    let _ = writeln!(
                        s,
                        "  {}: {}, answer due by {}",
                        p.agency,
                        p.state,
                        p.due.as_deref().unwrap_or("(no deadline)")
                    );
                }
            }
        }
        Err(e) => {
            let _ = writeln!(
                s,
                "  (deadlines not shown: {}; see `concordat dsar status {id}`)",
                concordat_support::report(e.as_ref())
            );
        }
    }
    Ok(Report::done(s))
}

/// A consulted agency's answer on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RespondWith {
    /// `--no-objection`.
    NoObjection,
    /// `--objection TEXT`.
    Objection(String),
    /// `--need-more-time DATE`.
    NeedMoreTime(String),
}

/// `concordat dsar respond ID`: answers consultation `id` (`<requester>:<reference>`).
pub async fn dsar_respond(
    tls: &ClientTls,
    id: &str,
    answer: RespondWith,
) -> anyhow::Result<Report> {
    let own = own_agency(tls)?;
    let consultation = workflow_id(id, None)?;
    let (answer, words) = match answer {
        RespondWith::NoObjection => (DsarAnswer::NoObjection, "no objection".to_owned()),
        RespondWith::Objection(text) => {
            let words = format!("objection: {}", text.trim());
            (DsarAnswer::Objection(text.trim().to_owned()), words)
        }
        RespondWith::NeedMoreTime(date) => {
            let t = parse_deadline(&date).map_err(|e| anyhow::anyhow!("--need-more-time: {e}"))?;
            (
                DsarAnswer::NeedMoreTime(t),
                format!("more time needed, answering by {}", format_time(t)),
            )
        }
    };
    let to = vec![consultation.owner.clone()];
    let step = Step::DsarAnswer {
        consultation: consultation.clone(),
        answer,
    };
    match send_step(tls, &own, to, step, None, None).await? {
        SendOutcome::Accepted(r) => {
            let mut s = format!("answered consultation {consultation}: {words}\n");
            receipt_lines(&mut s, &r);
            Ok(Report::done(s))
        }
        SendOutcome::Refused { reason, message } => Ok(Report::refused(&reason, &message)),
    }
}

/// `concordat dsar close ID`: asks the broker which agencies were consulted, then sends the
/// close to exactly them.
pub async fn dsar_close(tls: &ClientTls, id: &str) -> anyhow::Result<Report> {
    let own = own_agency(tls)?;
    let consultation = workflow_id(id, Some(&own))?;
    let found = match consultations(tls, &consultation.to_string(), true).await {
        Ok(list) => list,
        Err(e) => return refused_or_error(e),
    };
    let Some(status) = found
        .into_iter()
        .find(|c| c.consultation_id == consultation.to_string())
    else {
        anyhow::bail!(
            "the broker knows no consultation {consultation} that this agency is a party to"
        );
    };
    let to = status
        .parties
        .iter()
        .map(|p| p.agency.parse::<AgencyId>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("the broker named a consulted agency that is no id: {e}"))?;
    let step = Step::DsarClose {
        consultation: consultation.clone(),
    };
    match send_step(tls, &own, to.clone(), step, None, None).await? {
        SendOutcome::Accepted(r) => {
            let mut s = format!("closed consultation {consultation}; told {}\n", join(&to));
            receipt_lines(&mut s, &r);
            Ok(Report::done(s))
        }
        SendOutcome::Refused { reason, message } => Ok(Report::refused(&reason, &message)),
    }
}

/// A refusal by one of the `Workflows` calls, or another failure as an error.
#[derive(Debug)]
pub struct Refusal {
    /// The reason code.
    pub reason: String,
    /// The broker's message.
    pub message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "refused [{}]: {}", self.reason, self.message)
    }
}

impl std::error::Error for Refusal {}

/// Turns a failed call into a [`Refusal`] error when it is one, so that callers can tell it
/// apart (`downcast_ref`) from a transport failure.
fn status_error(status: tonic::Status) -> anyhow::Error {
    match refusal_of(&status) {
        Some((reason, message)) => anyhow::Error::new(Refusal { reason, message }),
        None => describe_status(status),
    }
}

/// A report for a failed `Workflows` call: a refusal is reported, anything else is an error.
fn refused_or_error(e: anyhow::Error) -> anyhow::Result<Report> {
    match e.downcast::<Refusal>() {
        Ok(r) => Ok(Report::refused(&r.reason, &r.message)),
        Err(e) => Err(e),
    }
}

/// One consultation in `concordat dsar status --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsultationReport {
    /// `<requester>:<reference>`.
    pub consultation_id: String,
    pub requester: String,
    pub reference: String,
    /// `open`, `answered`, `overdue` or `closed`.
    pub state: String,
    /// Whether `dsar close` would be accepted now.
    pub may_close: bool,
    pub concerns: Vec<String>,
    /// `null` when it concerns no organisation.
    pub organisation: Option<String>,
    /// RFC 3339 times; `closed_at` is `null` while it is not closed.
    pub opened_at: Option<String>,
    pub closed_at: Option<String>,
    /// The transfer that opened it.
    pub transfer_id: String,
    pub parties: Vec<PartyReport>,
}

/// One consulted agency in [`ConsultationReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartyReport {
    pub agency: String,
    /// `awaiting`, `no_objection`, `objection` or `overdue`.
    pub state: String,
    /// The exemption ground, for `objection`.
    pub objection: Option<String>,
    /// Its deadline, and when it answered (RFC 3339).
    pub due: Option<String>,
    pub answered_at: Option<String>,
    /// Whether the broker sent it a reminder.
    pub reminded: bool,
}

impl From<pb::ConsultationStatus> for ConsultationReport {
    fn from(c: pb::ConsultationStatus) -> Self {
        let non_empty = |s: String| (!s.is_empty()).then_some(s);
        ConsultationReport {
            consultation_id: c.consultation_id,
            requester: c.requester,
            reference: c.reference,
            state: c.state,
            may_close: c.may_close,
            concerns: c.concerns,
            organisation: non_empty(c.organisation),
            opened_at: rfc3339(c.opened_at.as_ref()),
            closed_at: rfc3339(c.closed_at.as_ref()),
            transfer_id: c.transfer_id,
            parties: c
                .parties
                .into_iter()
                .map(|p| PartyReport {
                    agency: p.agency,
                    state: p.state,
                    objection: non_empty(p.objection),
                    due: rfc3339(p.due.as_ref()),
                    answered_at: rfc3339(p.answered_at.as_ref()),
                    reminded: p.reminded,
                })
                .collect(),
        }
    }
}

/// Asks the broker for consultation `id` (empty: every one the caller may see; closed ones
/// too if `all`). A refusal is a [`Refusal`] error.
async fn consultations(
    tls: &ClientTls,
    id: &str,
    all: bool,
) -> anyhow::Result<Vec<ConsultationReport>> {
    let broker = tls.connect().await?;
    let mut client = broker.workflows();
    let answer = broker
        .deadline(client.consultations(pb::ConsultationsRequest {
            consultation_id: id.to_owned(),
            all,
        }))
        .await
        .map_err(status_error)?;
    Ok(answer
        .into_inner()
        .consultations
        .into_iter()
        .map(ConsultationReport::from)
        .collect())
}

/// `concordat dsar status [ID] [--all]`: the consultations as the broker tracks them.
pub async fn dsar_status(
    tls: &ClientTls,
    id: Option<&str>,
    all: bool,
) -> anyhow::Result<Result<Vec<ConsultationReport>, Report>> {
    let id = match id {
        Some(id) => workflow_id(id, Some(&own_agency(tls)?))?.to_string(),
        None => String::new(),
    };
    match consultations(tls, &id, all || !id.is_empty()).await {
        Ok(list) => Ok(Ok(list)),
        Err(e) => refused_or_error(e).map(Err),
    }
}

/// The consultations in words.
pub fn consultations_text(list: &[ConsultationReport]) -> String {
    if list.is_empty() {
        return "no consultations\n".into();
    }
    let mut s = String::new();
    for c in list {
        let _ = writeln!(
            s,
            "{}  {}{}  opened {} by {}",
            c.consultation_id,
            c.state,
            if c.may_close && c.state != "closed" {
                " (may close)"
            } else {
                ""
            },
            c.opened_at.as_deref().unwrap_or("?"),
            c.requester
        );
        if let Some(t) = &c.closed_at {
            let _ = writeln!(s, "  closed {t}");
        }
        if !c.concerns.is_empty() {
            let _ = writeln!(s, "  concerning transfer(s) {}", c.concerns.join(", "));
        }
        if let Some(org) = &c.organisation {
            let _ = writeln!(s, "  concerning organisation {org}");
        }
        for p in &c.parties {
            let _ = write!(s, "  {}: {}", p.agency, p.state);
            if let Some(o) = &p.objection {
                let _ = write!(s, " ({})", Escaped(o));
            }
            if let Some(t) = &p.answered_at {
                let _ = write!(s, ", answered {t}");
            }
            if let Some(t) = &p.due {
                let _ = write!(s, ", due {t}");
            }
            if p.reminded {
                s.push_str(", reminded");
            }
            s.push('\n');
        }
    }
    s
}

/// `concordat dsar find --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FoundTransfers {
    pub transfers: Vec<TransferReport>,
    /// More matched than the broker returns in one answer (1000).
    pub truncated: bool,
    /// The size of the log the broker searched.
    pub log_size: u64,
}

/// One transfer in [`FoundTransfers`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferReport {
    pub transfer_id: String,
    pub message_id: String,
    pub sender: String,
    pub recipients: Vec<String>,
    pub kind: String,
    pub organisations: Vec<String>,
    /// `null` when it has none.
    pub incident_ref: Option<String>,
    /// RFC 3339.
    pub accepted_at: Option<String>,
    /// Its entry in the audit log.
    pub log_index: u64,
}

/// What `concordat dsar find` looks for.
#[derive(Debug, Clone, Default)]
pub struct FindRequest {
    /// The other agency.
    pub with: Option<AgencyId>,
    /// Transfers identifying this organisation.
    pub organisation: Option<OrgId>,
    /// Transfers with this incident reference.
    pub incident: Option<String>,
    /// Accepted on or after (a date: its start; or an RFC 3339 time).
    pub since: Option<String>,
}

/// `concordat dsar find`: the caller's transfers with another agency about an organisation or
/// an incident.
pub async fn dsar_find(
    tls: &ClientTls,
    request: FindRequest,
) -> anyhow::Result<Result<FoundTransfers, Report>> {
    let since = request
        .since
        .as_deref()
        .map(|t| parse_not_before(t).map_err(|e| anyhow::anyhow!("--since: {e}")))
        .transpose()?;
    let broker = tls.connect().await?;
    let mut client = broker.workflows();
    let call = client.find_transfers(pb::FindTransfersRequest {
        with: request.with.map(String::from).unwrap_or_default(),
        organisation: request.organisation.map(String::from).unwrap_or_default(),
        incident_ref: request.incident.unwrap_or_default(),
        since: since.map(|t| prost_types::Timestamp {
            seconds: t.unix_timestamp(),
            nanos: 0,
        }),
    });
    let answer = match broker.deadline(call).await {
        Ok(a) => a.into_inner(),
        Err(status) => return refused_or_error(status_error(status)).map(Err),
    };
    Ok(Ok(FoundTransfers {
        truncated: answer.truncated,
        log_size: answer.log_size,
        transfers: answer
            .transfers
            .into_iter()
            .map(|t| TransferReport {
                kind: Kind::try_from(t.kind)
                    .map(|k| k.to_string())
                    .unwrap_or_else(|_| "unknown".into()),
                accepted_at: rfc3339(t.accepted_at.as_ref()),
                incident_ref: (!t.incident_ref.is_empty()).then_some(t.incident_ref),
                transfer_id: t.transfer_id,
                message_id: t.message_id,
                sender: t.sender,
                recipients: t.recipients,
                organisations: t.organisations,
                log_index: t.log_index,
            })
            .collect(),
    }))
}

/// Found transfers in words.
pub fn found_text(found: &FoundTransfers) -> String {
    let mut s = String::new();
    for t in &found.transfers {
        let _ = write!(
            s,
            "{}  {}  {} -> {}  {}",
            t.transfer_id,
            t.accepted_at.as_deref().unwrap_or("?"),
            t.sender,
            t.recipients.join(","),
            t.kind
        );
        if !t.organisations.is_empty() {
            let _ = write!(s, "  org {}", t.organisations.join(","));
        }
        if let Some(i) = &t.incident_ref {
            let _ = write!(s, "  incident {i}");
        }
        let _ = writeln!(s, "  entry {}", t.log_index);
    }
    let _ = writeln!(
        s,
        "{} transfer(s){} in a log of {}",
        found.transfers.len(),
        if found.truncated {
            " (more matched: narrow with --since)"
        } else {
            ""
        },
        found.log_size
    );
    s
}

// ---------------------------------------------------------------------------------------------
// comms

/// `concordat comms propose`.
#[derive(Debug, Clone)]
pub struct ProposeRequest {
    /// The parties asked to approve.
    pub to: Vec<AgencyId>,
    /// The draft.
    pub statement: Payload,
    /// Not to be published before (a date: its start; or an RFC 3339 time).
    pub publish_after: String,
    /// The proposer's reference; default: derived from the date and the message id.
    pub reference: Option<String>,
}

/// The reference `comms propose` gives a statement when none is given:
/// `stmt-<YYYYMMDD>-<the message id's last 8 hex digits>` (random bits, so two proposals of
/// a day differ).
pub fn default_statement_reference(today: time::Date, message_id: &MessageId) -> String {
    let id = message_id.to_string();
    let tail = &id[id.len().saturating_sub(8)..];
    format!(
        "stmt-{:04}{:02}{:02}-{tail}",
        today.year(),
        u8::from(today.month()),
        today.day()
    )
}

/// `concordat comms propose`: proposes a draft public statement to the parties in `to`.
pub async fn comms_propose(tls: &ClientTls, request: ProposeRequest) -> anyhow::Result<Report> {
    let own = own_agency(tls)?;
    let now = OffsetDateTime::now_utc();
    let message_id = MessageId::new_time_ordered(now);
    let reference_text = request
        .reference
        .clone()
        .unwrap_or_else(|| default_statement_reference(now.date(), &message_id));
    let reference: Reference = reference_text
        .parse()
        .map_err(|e| anyhow::anyhow!("--ref {reference_text:?} {e}"))?;
    let publish_after = parse_not_before(&request.publish_after)
        .map_err(|e| anyhow::anyhow!("--publish-after: {e}"))?;
    let id = WorkflowId {
        owner: own.clone(),
        reference: reference.clone(),
    };
    let step = Step::CommsPropose {
        reference,
        publish_after,
    };
    match send_step(
        tls,
        &own,
        request.to.clone(),
        step,
        Some(request.statement),
        Some(message_id),
    )
    .await?
    {
        SendOutcome::Accepted(r) => {
            let mut s = format!(
                "proposed statement {id} to {}, not to be published before {}\n",
                join(&request.to),
                format_time(publish_after)
            );
            receipt_lines(&mut s, &r);
            let _ = writeln!(
                s,
                "  it may be published once every party approves: `concordat comms status {id}`"
            );
            Ok(Report::done(s))
        }
        SendOutcome::Refused { reason, message } => Ok(Report::refused(&reason, &message)),
    }
}

/// `concordat comms approve ID` (`objection: None`) or `comms object ID --reason TEXT`.
pub async fn comms_answer(
    tls: &ClientTls,
    id: &str,
    objection: Option<String>,
) -> anyhow::Result<Report> {
    let own = own_agency(tls)?;
    let statement = workflow_id(id, None)?;
    let (answer, words) = match objection {
        None => (CommsAnswer::Approve, "approved".to_owned()),
        Some(reason) => (
            CommsAnswer::Objection(reason.trim().to_owned()),
            format!("objected: {}", reason.trim()),
        ),
    };
    let to = vec![statement.owner.clone()];
    let step = Step::CommsAnswer {
        statement: statement.clone(),
        answer,
    };
    match send_step(tls, &own, to, step, None, None).await? {
        SendOutcome::Accepted(r) => {
            let mut s = format!("statement {statement}: {words}\n");
            receipt_lines(&mut s, &r);
            Ok(Report::done(s))
        }
        SendOutcome::Refused { reason, message } => Ok(Report::refused(&reason, &message)),
    }
}

/// One statement in `concordat comms status --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementReport {
    /// `<proposer>:<reference>`.
    pub statement_id: String,
    pub proposer: String,
    pub reference: String,
    /// `pending`, `objected` or `approved`.
    pub state: String,
    /// Approved by every party it involves and past `publish_after`.
    pub may_publish: bool,
    /// RFC 3339.
    pub proposed_at: Option<String>,
    pub publish_after: Option<String>,
    /// The proposal's transfer, and the draft's SHA-256 (lowercase hex).
    pub transfer_id: String,
    pub statement_sha256: String,
    pub parties: Vec<StatementPartyReport>,
}

/// One party in [`StatementReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementPartyReport {
    pub agency: String,
    /// `pending`, `approved` or `objected`.
    pub state: String,
    pub objection: Option<String>,
    pub answered_at: Option<String>,
}

impl From<pb::StatementStatus> for StatementReport {
    fn from(st: pb::StatementStatus) -> Self {
        StatementReport {
            statement_id: st.statement_id,
            proposer: st.proposer,
            reference: st.reference,
            state: st.state,
            may_publish: st.may_publish,
            proposed_at: rfc3339(st.proposed_at.as_ref()),
            publish_after: rfc3339(st.publish_after.as_ref()),
            transfer_id: st.transfer_id,
            statement_sha256: st
                .statement_sha256
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            parties: st
                .parties
                .into_iter()
                .map(|p| StatementPartyReport {
                    agency: p.agency,
                    state: p.state,
                    objection: (!p.objection.is_empty()).then_some(p.objection),
                    answered_at: rfc3339(p.answered_at.as_ref()),
                })
                .collect(),
        }
    }
}

/// `concordat comms status [ID]`: the statements as the broker tracks them.
pub async fn comms_status(
    tls: &ClientTls,
    id: Option<&str>,
) -> anyhow::Result<Result<Vec<StatementReport>, Report>> {
    let id = match id {
        Some(id) => workflow_id(id, Some(&own_agency(tls)?))?.to_string(),
        None => String::new(),
    };
    let broker = tls.connect().await?;
    let mut client = broker.workflows();
    let call = client.statements(pb::StatementsRequest { statement_id: id });
    match broker.deadline(call).await {
        Ok(a) => Ok(Ok(a
            .into_inner()
            .statements
            .into_iter()
            .map(StatementReport::from)
            .collect())),
        Err(status) => refused_or_error(status_error(status)).map(Err),
    }
}

/// Statements in words.
pub fn statements_text(list: &[StatementReport]) -> String {
    if list.is_empty() {
        return "no statements\n".into();
    }
    let mut s = String::new();
    for st in list {
        let _ = writeln!(
            s,
            "{}  {}  {}  proposed {} by {}, not before {}",
            st.statement_id,
            st.state,
            if st.may_publish {
                "may be published"
            } else {
                "may not be published yet"
            },
            st.proposed_at.as_deref().unwrap_or("?"),
            st.proposer,
            st.publish_after.as_deref().unwrap_or("?"),
        );
        for p in &st.parties {
            let _ = write!(s, "  {}: {}", p.agency, p.state);
            if let Some(o) = &p.objection {
                let _ = write!(s, " ({})", Escaped(o));
            }
            if let Some(t) = &p.answered_at {
                let _ = write!(s, ", answered {t}");
            }
            s.push('\n');
        }
    }
    s
}

// ---------------------------------------------------------------------------------------------
// incident

/// `concordat incident involve --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvolvementReport {
    /// The federation-unique reference.
    pub incident_ref: String,
    /// The other agencies involved that were told (and named in this agency's notice).
    pub notified: Vec<String>,
    /// This agency had declared it before; nothing changed.
    pub duplicate: bool,
}

/// `concordat incident involve REF`: declares this agency involved in an incident.
pub async fn incident_involve(
    tls: &ClientTls,
    reference: &str,
) -> anyhow::Result<Result<InvolvementReport, Report>> {
    let broker = tls.connect().await?;
    let mut client = broker.workflows();
    let call = client.involve(pb::InvolveRequest {
        incident_ref: reference.to_owned(),
    });
    match broker.deadline(call).await {
        Ok(a) => {
            let a = a.into_inner();
            Ok(Ok(InvolvementReport {
                incident_ref: a.incident_ref,
                notified: a.notified,
                duplicate: a.duplicate,
            }))
        }
        Err(status) => refused_or_error(status_error(status)).map(Err),
    }
}

/// An involvement in words.
pub fn involvement_text(r: &InvolvementReport) -> String {
    if r.duplicate {
        format!(
            "already declared involved in incident {}; nothing changed\n",
            r.incident_ref
        )
    } else if r.notified.is_empty() {
        format!(
            "declared involved in incident {}; no other agency you share an agreement with has \
             declared it yet (each that does will be told, and so will you)\n",
            r.incident_ref
        )
    } else {
        format!(
            "declared involved in incident {}; coordination notices queued for {} and for you\n",
            r.incident_ref,
            r.notified.join(", ")
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The story of a workflow, from the audit log.

/// `concordat audit explain --workflow ID`: a one-line summary of the workflow's entries, then
/// each entry explained, in log order. `None` when no entry belongs to it.
pub fn story(id: &str, entries: &[(u64, pb::AuditEntry)]) -> Option<String> {
    let (first, last) = (entries.first()?, entries.last()?);
    let mut what = "Workflow";
    let mut steps = Vec::new();
    for (_, entry) in entries {
        use pb::audit_entry::Event;
        match &entry.event {
            Some(Event::TransferAccepted(a)) => {
                let Some(e) = &a.envelope else { continue };
                let Some(w) = e.workflow.as_ref().and_then(|w| w.step.as_ref()) else {
                    continue;
                };
                what = story_kind(w);
                steps.push(step_summary(&e.sender, &e.recipients, w));
            }
            Some(Event::TransferRefused(r)) => {
                let Some(e) = &r.envelope else { continue };
                let name = match e.workflow.as_ref().and_then(|w| w.step.as_ref()) {
                    Some(w) => {
                        what = story_kind(w);
                        step_name(w)
                    }
                    None => "step",
                };
                steps.push(format!("{}'s {name} refused ({})", e.sender, r.reason));
            }
            Some(Event::NoticeQueued(q)) => {
                let kind = q
                    .notice
                    .as_ref()
                    .map_or("unknown", |n| audit::notice_kind_name(n.kind));
                if kind == "incident_coordination" {
                    what = "Incident";
                }
                steps.push(format!("{kind} notice for {}", q.recipient));
            }
            Some(Event::InvolvementDeclared(d)) => {
                what = "Incident";
                steps.push(if d.duplicate {
                    format!("{} declared involvement again", d.agency)
                } else {
                    format!("{} declared involvement", d.agency)
                });
            }
            _ => {}
        }
    }
    let when = |e: &pb::AuditEntry| rfc3339(e.time.as_ref()).unwrap_or_else(|| "?".into());
    let mut s = format!(
        "{what} {id}: {} entr{} ({} at {} to {} at {}): {}.\n",
        entries.len(),
        if entries.len() == 1 { "y" } else { "ies" },
        first.0,
        when(&first.1),
        last.0,
        when(&last.1),
        steps.join("; ")
    );
    for (index, entry) in entries {
        s.push('\n');
        s.push_str(&audit::explain(*index, entry));
        if !s.ends_with('\n') {
            s.push('\n');
        }
    }
    Some(s)
}

fn story_kind(step: &pb::workflow_step::Step) -> &'static str {
    use pb::workflow_step::Step as W;
    match step {
        W::DsarOpen(_) | W::DsarAnswer(_) | W::DsarClose(_) => "Subject-access consultation",
        W::CommsPropose(_) | W::CommsAnswer(_) => "Public statement",
    }
}

fn step_name(step: &pb::workflow_step::Step) -> &'static str {
    use pb::workflow_step::Step as W;
    match step {
        W::DsarOpen(_) => "dsar_open",
        W::DsarAnswer(_) => "dsar_answer",
        W::DsarClose(_) => "dsar_close",
        W::CommsPropose(_) => "comms_propose",
        W::CommsAnswer(_) => "comms_answer",
    }
}

fn step_summary(sender: &str, recipients: &[String], step: &pb::workflow_step::Step) -> String {
    use pb::workflow_step::Step as W;
    let to = recipients.join(", ");
    match step {
        W::DsarOpen(_) => format!("opened by {sender} with {to}"),
        W::DsarAnswer(a) => {
            use pb::dsar_answer::Answer;
            match &a.answer {
                Some(Answer::NoObjection(_)) => format!("{sender}: no objection"),
                Some(Answer::Objection(_)) => format!("{sender}: objection"),
                Some(Answer::NeedMoreTime(t)) => format!(
                    "{sender}: more time needed, until {}",
                    rfc3339(Some(t)).unwrap_or_else(|| "?".into())
                ),
                None => format!("{sender} answered"),
            }
        }
        W::DsarClose(_) => format!("closed by {sender}"),
        W::CommsPropose(_) => format!("proposed by {sender} to {to}"),
        W::CommsAnswer(a) => {
            use pb::comms_answer::Answer;
            match &a.answer {
                Some(Answer::Approve(_)) => format!("approved by {sender}"),
                Some(Answer::Objection(_)) => format!("objected to by {sender}"),
                None => format!("{sender} answered"),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use pb::audit_entry::Event;

    /// An objection is another agency's free text: it is printed escaped, so that it cannot
    /// add a line of its own (or colour the terminal) in `dsar status` or `comms status`.
    #[test]
    fn objections_are_printed_escaped() {
        let forged = "Schedule 2\nnca:DSAR-9  closed  opened 2026 by nca\u{1b}[31m";
        let party = serde_json::json!({"agency": "nca", "state": "objection",
            "objection": forged, "due": null, "answered_at": null, "reminded": false});
        let c: ConsultationReport = serde_json::from_value(serde_json::json!({
            "consultation_id": "ico:DSAR-1", "requester": "ico", "reference": "DSAR-1",
            "state": "answered", "may_close": false, "concerns": [], "organisation": null,
            "opened_at": null, "closed_at": null, "transfer_id": "t", "parties": [party],
        }))
        .unwrap();
        let st: StatementReport = serde_json::from_value(serde_json::json!({
            "statement_id": "ico:press-1", "proposer": "ico", "reference": "press-1",
            "state": "objected", "may_publish": false, "proposed_at": null,
            "publish_after": null, "transfer_id": "t", "statement_sha256": "00",
            "parties": [{"agency": "nca", "state": "objected", "objection": forged,
                "answered_at": null}],
        }))
        .unwrap();
        for text in [consultations_text(&[c]), statements_text(&[st])] {
            assert_eq!(text.lines().count(), 2, "{text}");
            assert!(!text.contains('\u{1b}'), "{text}");
            assert!(text.contains("Schedule 2\\n"), "{text}");
        }
    }

    fn at(seconds: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos: 0 })
    }

    fn step_entry(
        seconds: i64,
        sender: &str,
        to: &[&str],
        step: pb::workflow_step::Step,
        refused: Option<&str>,
    ) -> pb::AuditEntry {
        let envelope = pb::EnvelopeFacts {
            sender: sender.into(),
            recipients: to.iter().map(|s| s.to_string()).collect(),
            kind: pb::MessageKind::DsarConsultation as i32,
            workflow: Some(pb::WorkflowStep { step: Some(step) }),
            ..Default::default()
        };
        pb::AuditEntry {
            time: at(seconds),
            event: Some(match refused {
                None => Event::TransferAccepted(pb::TransferAccepted {
                    transfer_id: format!("t-{seconds}"),
                    envelope: Some(envelope),
                    ..Default::default()
                }),
                Some(reason) => Event::TransferRefused(pb::TransferRefused {
                    envelope: Some(envelope),
                    reason: reason.into(),
                    message: "not yet".into(),
                    ..Default::default()
                }),
            }),
        }
    }

    /// A synthetic log: one consultation told in full, with entries of other workflows and
    /// plain transfers between its steps.
    fn log() -> Vec<pb::AuditEntry> {
        use pb::workflow_step::Step as W;
        let id = "nca:DSAR-2026-0012";
        let answer = |a| {
            W::DsarAnswer(pb::DsarAnswer {
                consultation_id: id.into(),
                answer: Some(a),
            })
        };
        vec![
            step_entry(
                1_800_000_000,
                "nca",
                &["ico"],
                W::DsarOpen(pb::DsarOpen {
                    reference: "DSAR-2026-0012".into(),
                    ..Default::default()
                }),
                None,
            ),
            // Another consultation of the same requester.
            step_entry(
                1_800_000_010,
                "nca",
                &["ico"],
                W::DsarOpen(pb::DsarOpen {
                    reference: "DSAR-2026-0013".into(),
                    ..Default::default()
                }),
                None,
            ),
            step_entry(
                1_800_000_020,
                "nca",
                &["ico"],
                W::DsarClose(pb::DsarClose {
                    consultation_id: id.into(),
                }),
                Some("CONSULTATION_OPEN"),
            ),
            pb::AuditEntry {
                time: at(1_800_000_030),
                event: Some(Event::NoticeQueued(pb::NoticeQueued {
                    recipient: "ico".into(),
                    notice: Some(pb::Notice {
                        notice_id: "n-1".into(),
                        kind: pb::NoticeKind::DsarReminder as i32,
                        subject: id.into(),
                        ..Default::default()
                    }),
                })),
            },
            // A plain transfer, no workflow.
            pb::AuditEntry {
                time: at(1_800_000_035),
                event: Some(Event::TransferAccepted(pb::TransferAccepted {
                    transfer_id: "plain".into(),
                    envelope: Some(pb::EnvelopeFacts {
                        sender: "nca".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })),
            },
            step_entry(
                1_800_000_040,
                "ico",
                &["nca"],
                answer(pb::dsar_answer::Answer::NoObjection(true)),
                None,
            ),
            step_entry(
                1_800_000_050,
                "nca",
                &["ico"],
                W::DsarClose(pb::DsarClose {
                    consultation_id: id.into(),
                }),
                None,
            ),
        ]
    }

    fn story_of(id: &str) -> Option<String> {
        let entries: Vec<(u64, pb::AuditEntry)> = log()
            .into_iter()
            .enumerate()
            .map(|(i, e)| (i as u64 + 100, e))
            .filter(|(_, e)| audit::workflow_subject(e).as_deref() == Some(id))
            .collect();
        story(id, &entries)
    }

    #[test]
    fn a_consultation_is_told_from_its_entries_in_log_order() {
        let told = story_of("nca:DSAR-2026-0012").unwrap();
        let summary = told.lines().next().unwrap();
        assert_eq!(
            summary,
            "Subject-access consultation nca:DSAR-2026-0012: 5 entries (100 at \
             2027-01-15T08:00:00Z to 106 at 2027-01-15T08:00:50Z): opened by nca with ico; \
             nca's dsar_close refused (CONSULTATION_OPEN); dsar_reminder notice for ico; \
             ico: no objection; closed by nca."
        );
        // Each entry explained after the summary, in log order, and only this workflow's.
        let positions: Vec<usize> = [
            "Entry 100 ",
            "Entry 102 ",
            "Entry 103 ",
            "Entry 105 ",
            "Entry 106 ",
        ]
        .iter()
        .map(|e| {
            told.find(e)
                .unwrap_or_else(|| panic!("{e} missing from:\n{told}"))
        })
        .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{told}");
        for other in ["Entry 101 ", "Entry 104 "] {
            assert!(
                !told.contains(other),
                "{other} is not this workflow's:\n{told}"
            );
        }
        assert!(told.contains("no objection"), "{told}");

        let other = story_of("nca:DSAR-2026-0013").unwrap();
        assert!(other.starts_with("Subject-access consultation nca:DSAR-2026-0013: 1 entry ("));
        assert_eq!(story_of("nca:NOTHING"), None);
    }

    #[test]
    fn incidents_are_told_from_declarations_and_notices() {
        let entries = vec![
            (
                7,
                pb::AuditEntry {
                    time: at(1_800_000_000),
                    event: Some(Event::InvolvementDeclared(pb::InvolvementDeclared {
                        agency: "ico".into(),
                        incident_ref: "ico:INC-1".into(),
                        involved: vec!["ico".into()],
                        ..Default::default()
                    })),
                },
            ),
            (
                9,
                pb::AuditEntry {
                    time: at(1_800_000_100),
                    event: Some(Event::InvolvementDeclared(pb::InvolvementDeclared {
                        agency: "nca".into(),
                        incident_ref: "ico:INC-1".into(),
                        notified: vec!["ico".into()],
                        involved: vec!["ico".into(), "nca".into()],
                        duplicate: false,
                    })),
                },
            ),
        ];
        let told = story("ico:INC-1", &entries).unwrap();
        assert!(
            told.starts_with(
                "Incident ico:INC-1: 2 entries (7 at 2027-01-15T08:00:00Z to 9 at \
                 2027-01-15T08:01:40Z): ico declared involvement; nca declared involvement.\n"
            ),
            "{told}"
        );
        assert!(told.contains("coordination notices were queued"), "{told}");
    }

    #[test]
    fn step_documents_describe_the_step_without_naming_the_organisation() {
        let id: WorkflowId = "nca:DSAR-1".parse().unwrap();
        let step = Step::DsarOpen(DsarOpen {
            reference: "DSAR-1".parse().unwrap(),
            concerns: vec![uuid::Uuid::from_u128(1)],
            organisation: Some("acme-ltd".parse().unwrap()),
            respond_by: None,
        });
        let doc: serde_json::Value = serde_json::from_slice(&step_document(&id, &step)).unwrap();
        assert_eq!(doc["step"], "dsar_open");
        assert_eq!(doc["id"], "nca:DSAR-1");
        assert_eq!(doc["concerns"][0], uuid::Uuid::from_u128(1).to_string());
        assert!(!doc.to_string().contains("acme"), "{doc}");
    }

    #[test]
    fn statements_get_a_default_reference_from_the_date_and_message_id() {
        let id: MessageId = "0190f3a4-5b6c-7d8e-9f01-23456789abcd".parse().unwrap();
        let date = time::macros::date!(2026 - 12 - 02);
        let r = default_statement_reference(date, &id);
        assert_eq!(r, "stmt-20261202-6789abcd");
        assert!(r.parse::<Reference>().is_ok());
    }

    #[test]
    fn statement_payloads_take_their_type_from_the_extension() {
        let dir = tempfile::tempdir().unwrap();
        let rows = [
            ("s.md", None, Ok("text/markdown")),
            ("s.MD", None, Ok("text/markdown")),
            ("s.txt", None, Ok("text/plain")),
            ("s.html", Some("text/html"), Ok("text/html")),
            ("s.md", Some("text/x-custom"), Ok("text/x-custom")),
            ("s.html", None, Err("--content-type")),
        ];
        for (name, given, expected) in rows {
            let path = dir.path().join(name);
            std::fs::write(&path, "# Statement\n").unwrap();
            match (Payload::statement(&path, given), expected) {
                (Ok(p), Ok(t)) => assert_eq!(p.content_type, t, "{name}"),
                (Err(e), Err(m)) => assert!(e.to_string().contains(m), "{name}: {e}"),
                (got, _) => panic!("{name}: {got:?}"),
            }
        }
    }

    #[test]
    fn ids_on_the_command_line_qualify_only_where_they_may() {
        let own: AgencyId = "nca".parse().unwrap();
        assert_eq!(
            workflow_id("DSAR-1", Some(&own)).unwrap().to_string(),
            "nca:DSAR-1"
        );
        assert_eq!(
            workflow_id("ico:X", Some(&own)).unwrap().to_string(),
            "ico:X"
        );
        assert!(
            workflow_id("DSAR-1", None)
                .unwrap_err()
                .to_string()
                .contains("<agency>:<reference>")
        );
        assert!(workflow_id("a b:c", Some(&own)).is_err());
    }
}
