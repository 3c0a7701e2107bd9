//! The agent as a witness of the broker's audit log.
//!
//! Every receipt carries the transfer's audit entry, a signed checkpoint and an inclusion proof.
//! The witness checks the checkpoint's signature with the log key from `agent.toml`, the entry's
//! inclusion, and that the checkpoint is consistent with the last one it saw (asking the broker
//! for a consistency proof between the two sizes). The last checkpoint is kept in the spool's
//! `.state/`, so a restarted agent still holds the broker to its history. An inconsistency is an
//! alarm: it is logged and the agent stops sending.
//!
//! Every delivery carries the same kind of proof for the entry it was queued under (a
//! transfer's `transfer_accepted`, a recall notice's `recall_queued`); the witness checks it
//! before the delivery is written to the inbox and acknowledged.
//!
//! A receipt or delivery is held to its entry field by field: every field the entry records
//! must be the entry's ([`ReceiptClaim`], [`TransferClaim`], [`DeliveryClaim`]), and a
//! refusal names each field that differs. What the entry does not record (a transfer's
//! content type, a receipt's warnings, a recall notice's time of revocation) is not part of
//! a claim, and whoever presents a verdict must not present it as verified.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
};

use concordat_proto::{
    audit,
    checkpoint::{self, Checkpoint, LogVerifier},
    merkle::{self, Hash},
    pb,
};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use crate::{
    client::Broker,
    spool::{atomic_write, kind_name, tlp_name},
};

/// Why a receipt's audit proof was not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WitnessError {
    /// The broker's log contradicts what it showed before, or signs what it should not: stop.
    #[error("ALARM: {0}")]
    Alarm(String),
    /// The check could not be completed (e.g. the broker is unreachable); try again later.
    #[error("{0}")]
    Incomplete(String),
}

/// Checks the broker's checkpoints for one agent.
pub struct Witness {
    verifier: LogVerifier,
    /// This agency (its certificate's), whose own authority each delivery must carry.
    agency: Option<String>,
    state_file: PathBuf,
    last: Mutex<Option<Checkpoint>>,
    alarmed: AtomicBool,
}

fn hashes(proof: &[Vec<u8>]) -> Result<Vec<Hash>, WitnessError> {
    proof
        .iter()
        .map(|h| {
            Hash::from_slice(h)
                .map_err(|_| WitnessError::Alarm("a proof hash is not 32 bytes".into()))
        })
        .collect()
}

/// What a receipt says of its transfer, to hold against the `transfer_accepted` entry its
/// proof carries: read from the wire by the agent, or from a receipt file by `concordat
/// receipt verify`.
///
/// The entry binds every field here. A receipt's `warnings` (an agreement due for review) and
/// its `duplicate` flag are the broker's words at the time of the answer and are not in the
/// log: they are not part of the claim and cannot be verified.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReceiptClaim {
    /// The broker's transfer id.
    pub transfer_id: String,
    /// The sender's message id.
    pub message_id: String,
    /// When the broker accepted it: the entry's time.
    pub accepted_at: ClaimedTime,
    /// For each recipient, the agreement and clause relied on, in the entry's order.
    pub authorities: Vec<pb::Authority>,
    /// The first consent's token id and issuer (empty without consent).
    pub consent_jti: String,
    /// See `consent_jti`.
    pub consent_issuer: String,
    /// Every consent relied on; `None` when the claim does not say (a receipt file).
    pub consents: Option<Vec<pb::ConsentRef>>,
    /// The entry's index in the log, when the claim states it besides the proof's.
    pub log_index: Option<u64>,
}

impl ReceiptClaim {
    /// What `receipt` claims.
    pub fn of(receipt: &pb::Receipt) -> ReceiptClaim {
        ReceiptClaim {
            transfer_id: receipt.transfer_id.clone(),
            message_id: receipt.message_id.clone(),
            accepted_at: ClaimedTime::Exact(receipt.accepted_at),
            authorities: receipt.authorities.clone(),
            consent_jti: receipt.consent_jti.clone(),
            consent_issuer: receipt.consent_issuer.clone(),
            consents: Some(receipt.consents.clone()),
            log_index: None,
        }
    }

    /// What a receipt file claims (it keeps no list of consents).
    pub(crate) fn of_file(file: &crate::spool::ReceiptFile) -> ReceiptClaim {
        ReceiptClaim {
            transfer_id: file.transfer_id.clone(),
            message_id: file.message_id.clone(),
            accepted_at: ClaimedTime::Text(file.accepted_at.clone()),
            authorities: file
                .authorities
                .iter()
                .map(|a| pb::Authority {
                    recipient: a.recipient.clone(),
                    agreement_id: a.agreement_id.clone(),
                    clause: a.clause.clone(),
                })
                .collect(),
            consent_jti: file.consent_jti.clone(),
            consent_issuer: file.consent_issuer.clone(),
            consents: None,
            log_index: file.log_index,
        }
    }

    /// Whether `entry` (at `log_index`) is this transfer's acceptance, as the receipt states it.
    fn check(&self, entry: &pb::AuditEntry, log_index: u64) -> Result<(), String> {
        let Some(pb::audit_entry::Event::TransferAccepted(a)) = &entry.event else {
            return Err(format!(
                "the audit entry of receipt {} is not a transfer_accepted entry",
                self.transfer_id
            ));
        };
        let facts = a.envelope.clone().unwrap_or_default();
        let mut d = Differences::new("receipt");
        d.text("transfer_id", &self.transfer_id, &a.transfer_id);
        d.text("message_id", &self.message_id, &facts.message_id);
        d.time("accepted_at", &self.accepted_at, entry.time.as_ref());
        if self.authorities.len() == a.authorities.len() {
            for (i, (c, l)) in self.authorities.iter().zip(&a.authorities).enumerate() {
                d.text(
                    &format!("authorities[{i}].recipient"),
                    &c.recipient,
                    &l.recipient,
                );
                d.text(
                    &format!("authorities[{i}].agreement_id"),
                    &c.agreement_id,
                    &l.agreement_id,
                );
                d.text(&format!("authorities[{i}].clause"), &c.clause, &l.clause);
            }
        } else {
            d.differ(
                "authorities",
                format!("{} of them", self.authorities.len()),
                a.authorities.len().to_string(),
            );
        }
        d.text("consent_jti", &self.consent_jti, &facts.consent_jti);
        d.text(
            "consent_issuer",
            &self.consent_issuer,
            &facts.consent_issuer,
        );
        if let Some(consents) = &self.consents {
            d.debug("consents", consents, &facts.consents);
        }
        if let Some(index) = self.log_index {
            d.debug("log_index", &index, &log_index);
        }
        d.result(&self.transfer_id)
    }
}

/// Checks, offline, that `proof` proves the receipt `claim`: the checkpoint is signed by the log
/// key `verifier` names, the entry is that transfer's `transfer_accepted` entry and records
/// every field of the claim as the claim states it ([`ReceiptClaim`]), and the inclusion proof
/// places the entry at its index in the checkpoint's tree. Returns the checkpoint, or what is
/// wrong (every field that differs, by name).
pub fn verify_receipt(
    verifier: &LogVerifier,
    claim: &ReceiptClaim,
    proof: &pb::AuditProof,
) -> Result<Checkpoint, String> {
    verify_entry(verifier, "receipt", proof, |entry| {
        claim.check(entry, proof.log_index)
    })
}

/// A time as a claim states it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClaimedTime {
    /// As the broker sent it: must be the entry's time exactly.
    Exact(Option<prost_types::Timestamp>),
    /// As a file keeps it: the RFC 3339 text the agent writes (whole seconds), which must be
    /// the entry's time written the same way.
    Text(String),
}

fn show_time(t: Option<&prost_types::Timestamp>) -> String {
    match t {
        Some(t) if t.nanos != 0 => format!("{} + {} ns", crate::spool::rfc3339(Some(t)), t.nanos),
        t => crate::spool::rfc3339(t),
    }
}

/// The fields of a claim that differ from its entry, each named with both values.
struct Differences {
    what: &'static str,
    found: Vec<String>,
}

impl Differences {
    fn new(what: &'static str) -> Self {
        Differences {
            what,
            found: Vec::new(),
        }
    }

    fn differ(&mut self, field: &str, claimed: String, logged: String) {
        self.found.push(format!(
            "{field} (the {} says {claimed}, the entry {logged})",
            self.what
        ));
    }

    fn text(&mut self, field: &str, claimed: &str, logged: &str) {
        self.debug(field, claimed, logged);
    }

    fn debug<T: PartialEq + std::fmt::Debug + ?Sized>(
        &mut self,
        field: &str,
        claimed: &T,
        logged: &T,
    ) {
        if claimed != logged {
            self.differ(field, format!("{claimed:?}"), format!("{logged:?}"));
        }
    }

    fn time(
        &mut self,
        field: &str,
        claimed: &ClaimedTime,
        logged: Option<&prost_types::Timestamp>,
    ) {
        let (same, shown) = match claimed {
            ClaimedTime::Exact(t) => (t.as_ref() == logged, show_time(t.as_ref())),
            ClaimedTime::Text(s) => (*s == crate::spool::rfc3339(logged), s.clone()),
        };
        if !same {
            self.differ(field, shown, show_time(logged));
        }
    }

    fn result(self, id: &str) -> Result<(), String> {
        if self.found.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "the {} of transfer {id} does not match its audit entry: {}",
                self.what,
                self.found.join("; ")
            ))
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a transfer's delivery says of itself, field by field: every field its
/// `transfer_accepted` entry records. The payload is represented by its SHA-256 (and size).
///
/// Not here, because the entry does not record it: the payload's `content_type` (the log keeps
/// the payload's digest and size only), which therefore cannot be verified.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TransferClaim {
    /// The broker's transfer id.
    pub transfer_id: String,
    /// The sender's message id.
    pub message_id: String,
    /// The sending agency.
    pub sender: String,
    /// Every recipient of the transfer.
    pub recipients: Vec<String>,
    /// The message kind (the wire's number).
    pub kind: i32,
    /// The organisation the envelope named (empty: none).
    pub organisation: String,
    /// Every organisation the transfer identifies, `organisation` first when set; `None` when
    /// the claim does not say (an inbox file written before this field).
    pub organisations: Option<Vec<String>>,
    /// The federation-unique incident reference (empty: none).
    pub incident_ref: String,
    /// The TLP marking (the wire's number).
    pub tlp: i32,
    /// The first consent's token id and issuer (empty without consent).
    pub consent_jti: String,
    /// See `consent_jti`.
    pub consent_issuer: String,
    /// Every consent relied on; `None` when the claim does not say (an older inbox file).
    pub consents: Option<Vec<pb::ConsentRef>>,
    /// The agreement and clause relied on for this recipient: the entry's authority for
    /// `recipient` when it is known, else one of the entry's authorities.
    pub agreement_id: String,
    /// See `agreement_id`.
    pub clause: String,
    /// When the broker accepted it: the entry's time.
    pub accepted_at: ClaimedTime,
    /// The workflow step it carries, as exports and inbox files write it.
    pub workflow: Option<serde_json::Value>,
    /// The SHA-256 of the payload.
    pub payload_sha256: Vec<u8>,
    /// The payload's size, when the claim holds the payload.
    pub payload_size: Option<u64>,
    /// The agency the delivery was made to, when it is known (the live agent's, from its
    /// certificate): then the transfer must be addressed to it, and `agreement_id` and
    /// `clause` must be its authority, not a co-recipient's. A file checked offline does not
    /// say whose inbox it was in.
    pub recipient: Option<String>,
}

impl TransferClaim {
    /// What transfer `t` claims; the payload is hashed here.
    pub fn of(t: &pb::Transfer) -> TransferClaim {
        TransferClaim {
            transfer_id: t.transfer_id.clone(),
            message_id: t.message_id.clone(),
            sender: t.sender.clone(),
            recipients: t.recipients.clone(),
            kind: t.kind,
            organisation: t.organisation.clone(),
            organisations: Some(t.organisations.clone()),
            incident_ref: t.incident_ref.clone(),
            tlp: t.tlp,
            consent_jti: t.consent_jti.clone(),
            consent_issuer: t.consent_issuer.clone(),
            consents: Some(t.consents.clone()),
            agreement_id: t.agreement_id.clone(),
            clause: t.clause.clone(),
            accepted_at: ClaimedTime::Exact(t.accepted_at),
            workflow: t.workflow.as_ref().map(audit::workflow_json),
            payload_sha256: Sha256::digest(&t.payload).to_vec(),
            payload_size: Some(t.payload.len() as u64),
            recipient: None,
        }
    }

    fn check(&self, entry: &pb::AuditEntry, a: &pb::TransferAccepted) -> Result<(), String> {
        let f = a.envelope.clone().unwrap_or_default();
        let mut d = Differences::new("delivery");
        d.text("transfer_id", &self.transfer_id, &a.transfer_id);
        d.text("message_id", &self.message_id, &f.message_id);
        d.text("sender", &self.sender, &f.sender);
        d.debug("recipients", &self.recipients, &f.recipients);
        d.text("kind", &kind_name(self.kind), &kind_name(f.kind));
        d.text("organisation", &self.organisation, &f.organisation);
        if let Some(organisations) = &self.organisations {
            // The log keeps `organisation` apart; a delivery lists it first.
            let logged: Vec<String> = (!f.organisation.is_empty())
                .then(|| f.organisation.clone())
                .into_iter()
                .chain(f.organisations.iter().cloned())
                .collect();
            d.debug("organisations", organisations, &logged);
        }
        d.text("incident_ref", &self.incident_ref, &f.incident_ref);
        d.text("tlp", &tlp_name(self.tlp), &tlp_name(f.tlp));
        d.text("consent_jti", &self.consent_jti, &f.consent_jti);
        d.text("consent_issuer", &self.consent_issuer, &f.consent_issuer);
        if let Some(consents) = &self.consents {
            d.debug("consents", consents, &f.consents);
        }
        // The entry has one authority per recipient: this agency's, when it is known; else,
        // as the delivery does not say whose it is, one of the transfer's recipients'.
        if let Some(me) = &self.recipient
            && !f.recipients.contains(me)
        {
            d.differ(
                "recipient",
                me.clone(),
                format!("names {}", f.recipients.join(", ")),
            );
        }
        let authority = a.authorities.iter().any(|x| {
            x.agreement_id == self.agreement_id
                && x.clause == self.clause
                && match &self.recipient {
                    Some(me) => &x.recipient == me,
                    None => self.recipients.contains(&x.recipient),
                }
        });
        if !authority {
            let logged: Vec<String> = a
                .authorities
                .iter()
                .map(|x| format!("{}: {} clause {}", x.recipient, x.agreement_id, x.clause))
                .collect();
            d.differ(
                "agreement_id and clause",
                format!("{} clause {}", self.agreement_id, self.clause),
                format!("has {}", logged.join(", ")),
            );
        }
        d.time("accepted_at", &self.accepted_at, entry.time.as_ref());
        let workflow = f.workflow.as_ref().map(audit::workflow_json);
        d.debug("workflow", &self.workflow, &workflow);
        d.text(
            "payload_sha256",
            &hex(&self.payload_sha256),
            &hex(&f.payload_sha256),
        );
        if let Some(size) = self.payload_size {
            d.debug("payload_size", &size, &f.payload_size);
        }
        d.result(&self.transfer_id)
    }
}

/// What a delivery says of itself, to hold against the audit entry its proof carries: read
/// from the wire by the agent, or from an inbox file by `concordat receipt verify`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeliveryClaim {
    /// A transfer: proved by its `transfer_accepted` entry.
    Transfer(Box<TransferClaim>),
    /// A recall notice: proved by its `recall_queued` entry.
    Recall {
        /// The transfer recalled.
        transfer_id: String,
        /// Its message id.
        message_id: String,
        /// Its sender.
        sender: String,
        /// The organisation whose consent was revoked.
        organisation: String,
        /// The revoked consent token and its issuer.
        consent_jti: String,
        /// See `consent_jti`.
        consent_issuer: String,
    },
    /// A notice of the broker's own: proved by its `notice_queued` entry, which holds it whole.
    Notice(pb::Notice),
}

impl DeliveryClaim {
    /// What `body` claims; the payload is hashed here.
    pub fn of(body: &pb::delivery::Body) -> DeliveryClaim {
        match body {
            pb::delivery::Body::Transfer(t) => {
                DeliveryClaim::Transfer(Box::new(TransferClaim::of(t)))
            }
            pb::delivery::Body::RecallNotice(n) => DeliveryClaim::Recall {
                transfer_id: n.transfer_id.clone(),
                message_id: n.message_id.clone(),
                sender: n.sender.clone(),
                organisation: n.organisation.clone(),
                consent_jti: n.consent_jti.clone(),
                consent_issuer: n.consent_issuer.clone(),
            },
            pb::delivery::Body::Notice(n) => DeliveryClaim::Notice(n.clone()),
        }
    }

    /// Whether `entry` is the entry this delivery was queued under: for a transfer, its
    /// acceptance with every field the entry records as the delivery states it; for a recall
    /// notice, the recall of this transfer, under this consent, to this organisation; for a
    /// notice, the notice whole. Every field that differs is named.
    fn check(&self, entry: &pb::AuditEntry) -> Result<(), String> {
        use pb::audit_entry::Event;
        let matches = match (self, &entry.event) {
            (DeliveryClaim::Transfer(claim), Some(Event::TransferAccepted(a))) => {
                return claim.check(entry, a);
            }
            (
                DeliveryClaim::Recall {
                    transfer_id,
                    message_id,
                    sender,
                    organisation,
                    consent_jti,
                    consent_issuer,
                },
                Some(Event::RecallQueued(q)),
            ) => {
                let mut d = Differences::new("recall notice");
                d.text("transfer_id", transfer_id, &q.transfer_id);
                d.text("message_id", message_id, &q.message_id);
                d.text("sender", sender, &q.sender);
                d.text("organisation", organisation, &q.organisation);
                d.text("consent_jti", consent_jti, &q.consent_jti);
                d.text("consent_issuer", consent_issuer, &q.consent_issuer);
                return d.result(transfer_id);
            }
            (DeliveryClaim::Notice(n), Some(Event::NoticeQueued(q))) => {
                q.notice.as_ref() == Some(n)
            }
            _ => false,
        };
        if matches {
            Ok(())
        } else {
            Err(format!(
                "the audit entry of delivery {} describes something else (another kind of \
                 entry, or another notice)",
                self.transfer_id()
            ))
        }
    }

    /// The transfer delivered or recalled.
    pub fn transfer_id(&self) -> &str {
        match self {
            DeliveryClaim::Transfer(t) => &t.transfer_id,
            DeliveryClaim::Recall { transfer_id, .. } => transfer_id,
            DeliveryClaim::Notice(n) => &n.notice_id,
        }
    }
}

/// Checks, offline, that `proof` proves the delivery `claim`: the checkpoint is signed by the
/// log key `verifier` names, the entry is the one the delivery was queued under and records
/// every field of the claim as the claim states it ([`DeliveryClaim`]; a refusal names each
/// field that differs), and the inclusion proof places it at its index in the checkpoint's tree.
pub fn verify_delivery(
    verifier: &LogVerifier,
    claim: &DeliveryClaim,
    proof: &pb::AuditProof,
) -> Result<Checkpoint, String> {
    verify_entry(verifier, "delivery", proof, |entry| claim.check(entry))
}

/// The checks common to receipts and deliveries: the checkpoint's signature, the entry
/// (`what_entry`), and its inclusion in the checkpoint's tree.
fn verify_entry(
    verifier: &LogVerifier,
    what: &str,
    proof: &pb::AuditProof,
    what_entry: impl FnOnce(&pb::AuditEntry) -> Result<(), String>,
) -> Result<Checkpoint, String> {
    let cp = checkpoint::open(&proof.checkpoint, verifier)
        .map_err(|e| format!("the {what}'s checkpoint does not verify: {e}"))?;
    let entry = audit::decode(&proof.entry).map_err(|e| format!("the {what}'s entry: {e}"))?;
    what_entry(&entry)?;
    let path: Vec<Hash> = proof
        .inclusion_proof
        .iter()
        .map(|h| Hash::from_slice(h).map_err(|_| "a proof hash is not 32 bytes".to_owned()))
        .collect::<Result<_, _>>()?;
    merkle::check_record(
        &path,
        cp.size(),
        cp.root(),
        proof.log_index,
        &merkle::leaf_hash(&proof.entry),
    )
    .map_err(|e| {
        format!(
            "entry {} is not in the checkpoint's tree: {e}",
            proof.log_index
        )
    })?;
    Ok(cp)
}

impl Witness {
    /// A witness trusting `verifier`, keeping its last checkpoint in `state_dir/checkpoint`.
    pub fn new(verifier: LogVerifier, state_dir: PathBuf) -> anyhow::Result<Self> {
        let state_file = state_dir.join("checkpoint");
        let last = match std::fs::read_to_string(&state_file) {
            Ok(note) => Some(checkpoint::open(&note, &verifier).map_err(|e| {
                anyhow::anyhow!(
                    "{}: stored checkpoint does not verify: {e}",
                    state_file.display()
                )
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        Ok(Witness {
            verifier,
            agency: None,
            state_file,
            last: Mutex::new(last),
            alarmed: AtomicBool::new(false),
        })
    }

    /// The witness of `agency`'s deliveries: each must be addressed to it and carry its own
    /// agreement and clause ([`TransferClaim::recipient`]).
    pub fn for_agency(mut self, agency: &concordat_proto::ids::AgencyId) -> Self {
        self.agency = Some(agency.to_string());
        self
    }

    /// Whether an alarm has been raised: the agent must not send.
    pub fn alarmed(&self) -> bool {
        self.alarmed.load(Ordering::SeqCst)
    }

    fn alarm(&self, why: String) -> WitnessError {
        if !self.alarmed.swap(true, Ordering::SeqCst) {
            tracing::error!(
                "ALARM: {}; the agent stops sending until an operator investigates",
                concordat_support::escape::Escaped(&why)
            );
        }
        WitnessError::Alarm(why)
    }

    /// Checks the audit proof of a receipt for message `message_id`.
    pub async fn check_receipt(
        &self,
        broker: &Broker,
        receipt: &pb::Receipt,
    ) -> Result<(), WitnessError> {
        let Some(proof) = &receipt.audit else {
            return Err(self.alarm(format!(
                "receipt for {} carries no audit proof",
                receipt.message_id
            )));
        };
        let cp = verify_receipt(&self.verifier, &ReceiptClaim::of(receipt), proof)
            .map_err(|why| self.alarm(why))?;
        self.advance(broker, cp, &proof.checkpoint).await
    }

    /// Checks the audit proof of a delivery before it is stored and acknowledged: the entry it
    /// was queued under, its inclusion, and the checkpoint's consistency with the last one seen.
    /// A delivery without a proof, or whose proof fails, is an alarm.
    pub async fn check_delivery(
        &self,
        broker: &Broker,
        delivery: &pb::Delivery,
    ) -> Result<(), WitnessError> {
        let Some(body) = &delivery.body else {
            return Ok(());
        };
        let mut claim = DeliveryClaim::of(body);
        if let DeliveryClaim::Transfer(t) = &mut claim {
            t.recipient.clone_from(&self.agency);
        }
        let Some(proof) = &delivery.audit else {
            return Err(self.alarm(format!(
                "delivery {} (transfer {}) carries no audit proof",
                delivery.delivery_id,
                claim.transfer_id()
            )));
        };
        let cp = verify_delivery(&self.verifier, &claim, proof).map_err(|why| self.alarm(why))?;
        self.advance(broker, cp, &proof.checkpoint).await
    }

    /// Checks `new` against the last checkpoint seen and keeps the larger.
    async fn advance(
        &self,
        broker: &Broker,
        new: Checkpoint,
        note: &str,
    ) -> Result<(), WitnessError> {
        let mut last = self.last.lock().await;
        let Some(old) = last.as_ref() else {
            self.store(note)?;
            *last = Some(new);
            return Ok(());
        };
        if old.origin() != new.origin() {
            return Err(self.alarm(format!(
                "checkpoint origin changed from {} to {}",
                old.origin(),
                new.origin()
            )));
        }
        let (small, large) = if new.size() >= old.size() {
            (old, &new)
        } else {
            (&new, old)
        };
        if small.size() == large.size() {
            if small.root() != large.root() {
                return Err(self.alarm(format!(
                    "two checkpoints of size {} with different roots (a fork)",
                    small.size()
                )));
            }
            return Ok(());
        }
        let response = broker
            .deadline(broker.audit().checkpoint(pb::CheckpointRequest {
                from_size: small.size(),
                to_size: large.size(),
            }))
            .await
            .map_err(|s| match crate::client::refusal_of(&s) {
                // An honest broker can always prove consistency between two sizes it signed;
                // refusing the sizes means its log no longer reaches the larger one.
                Some((reason, message)) if reason == "MALFORMED" => self.alarm(format!(
                    "the broker cannot prove its log of size {} extends the one of size {}: {message}",
                    large.size(),
                    small.size()
                )),
                _ => WitnessError::Incomplete(format!("asking for a consistency proof: {}", s.message())),
            })?
            .into_inner();
        let proof = hashes(&response.consistency_proof)?;
        checkpoint::check_consistent(small, large, &proof).map_err(|e| {
            self.alarm(format!(
                "checkpoint of size {} is not consistent with the one of size {}: {e}",
                large.size(),
                small.size()
            ))
        })?;
        if new.size() > old.size() {
            self.store(note)?;
            *last = Some(new);
        }
        Ok(())
    }

    fn store(&self, note: &str) -> Result<(), WitnessError> {
        let dir = self
            .state_file
            .parent()
            .map(PathBuf::from)
            .unwrap_or_default();
        atomic_write(&dir, "checkpoint", note.as_bytes())
            .map_err(|e| WitnessError::Incomplete(format!("storing the checkpoint: {e}")))
    }
}

/// A one-entry audit log signed by a fresh key, and a transfer logged in it, for the tests of
/// this crate.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod test_log {
    use concordat_proto::{
        checkpoint::{self, Checkpoint, LogSigner, LogVerifier},
        merkle, pb,
    };
    use prost::Message as _;
    use sha2::{Digest, Sha256};

    /// The log's verifier and the proof of `entry`, the only entry of a log of size 1.
    pub(crate) fn prove(entry: &pb::AuditEntry) -> (LogVerifier, pb::AuditProof) {
        let signer = LogSigner::generate("concordat.test/audit").unwrap();
        let bytes = entry.encode_to_vec();
        let cp = Checkpoint::new(signer.name(), 1, merkle::leaf_hash(&bytes)).unwrap();
        let proof = pb::AuditProof {
            log_index: 0,
            checkpoint: checkpoint::sign(&cp, &signer).unwrap(),
            inclusion_proof: Vec::new(),
            entry: bytes,
        };
        (signer.verifier(), proof)
    }

    /// A TLP:RED incident record about acme-ltd, sent under consent by ncsc to ico, as ico
    /// receives it, and its `transfer_accepted` entry.
    pub(crate) fn transfer(payload: &[u8], content_type: &str) -> (pb::Transfer, pb::AuditEntry) {
        let accepted_at = prost_types::Timestamp {
            seconds: 1_796_000_000,
            nanos: 123_000_000,
        };
        let consent = pb::ConsentRef {
            organisation: "acme-ltd".into(),
            jti: "0193a6f4-7c1e-7000-8000-000000000001".into(),
            issuer: "k4.pid.issuer".into(),
        };
        let transfer = pb::Transfer {
            transfer_id: "5b0d4a9e-3c2f-4d8e-9a51-0c6f7e2b1a11".into(),
            message_id: "0193a6f4-7c1e-7000-8000-0000000000aa".into(),
            sender: "ncsc".into(),
            recipients: vec!["ico".into()],
            kind: pb::MessageKind::IncidentRecord as i32,
            organisation: "acme-ltd".into(),
            incident_ref: "ncsc:INC-7".into(),
            content_type: content_type.into(),
            tlp: pb::Tlp::Red as i32,
            payload: payload.to_vec(),
            consent_jti: consent.jti.clone(),
            consent_issuer: consent.issuer.clone(),
            agreement_id: "ico-ncsc-2024".into(),
            clause: "4.2".into(),
            accepted_at: Some(accepted_at),
            organisations: vec!["acme-ltd".into(), "globex-plc".into()],
            consents: vec![consent.clone()],
            workflow: None,
        };
        let facts = pb::EnvelopeFacts {
            message_id: transfer.message_id.clone(),
            sender: transfer.sender.clone(),
            recipients: transfer.recipients.clone(),
            kind: transfer.kind,
            organisation: transfer.organisation.clone(),
            incident_ref: transfer.incident_ref.clone(),
            tlp: transfer.tlp,
            payload_sha256: Sha256::digest(payload).to_vec(),
            payload_size: payload.len() as u64,
            consent_jti: consent.jti.clone(),
            consent_issuer: consent.issuer.clone(),
            consents: vec![consent],
            // The log keeps `organisation` apart from the others.
            organisations: vec!["globex-plc".into()],
            workflow: None,
        };
        let entry = pb::AuditEntry {
            time: Some(accepted_at),
            event: Some(pb::audit_entry::Event::TransferAccepted(
                pb::TransferAccepted {
                    transfer_id: transfer.transfer_id.clone(),
                    envelope: Some(facts),
                    authorities: vec![pb::Authority {
                        recipient: "ico".into(),
                        agreement_id: "ico-ncsc-2024".into(),
                        clause: "4.2".into(),
                    }],
                    stix_object_ids: Vec::new(),
                    designation: None,
                },
            )),
        };
        (transfer, entry)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// A delivery verifies only if every field its `transfer_accepted` entry records is the
    /// entry's: a TLP:RED incident record about acme-ltd, made under consent, cannot pass for
    /// TLP:CLEAR, a threat assessment, about no organisation or without consent.
    #[test]
    fn a_delivery_must_match_every_field_its_entry_records() {
        let (transfer, entry) = test_log::transfer(br#"{"a":1}"#, "application/json");
        let (key, proof) = test_log::prove(&entry);
        let body = |t: &pb::Transfer| DeliveryClaim::of(&pb::delivery::Body::Transfer(t.clone()));
        verify_delivery(&key, &body(&transfer), &proof).unwrap();
        type Forge = fn(&mut pb::Transfer);
        let rows: [(&str, Forge); 17] = [
            ("tlp", |t| t.tlp = pb::Tlp::Clear as i32),
            ("kind", |t| {
                t.kind = pb::MessageKind::ThreatAssessment as i32
            }),
            ("organisation", |t| t.organisation.clear()),
            ("organisation", |t| t.organisation = "someone-else".into()),
            ("organisations", |t| t.organisations.clear()),
            ("incident_ref", |t| t.incident_ref = "nca:OTHER".into()),
            ("consent_jti", |t| t.consent_jti = "forged-jti".into()),
            ("consent_issuer", |t| t.consent_issuer.clear()),
            ("consents", |t| t.consents.clear()),
            ("agreement_id", |t| t.agreement_id = "other-mou".into()),
            ("clause", |t| t.clause = "9.9".into()),
            ("accepted_at", |t| {
                t.accepted_at = Some(prost_types::Timestamp {
                    seconds: 1,
                    nanos: 0,
                })
            }),
            ("recipients", |t| t.recipients.push("nca".into())),
            ("sender", |t| t.sender = "nca".into()),
            ("message_id", |t| t.message_id.push('0')),
            ("payload_sha256", |t| t.payload.push(b' ')),
            ("workflow", |t| {
                t.workflow = Some(pb::WorkflowStep {
                    step: Some(pb::workflow_step::Step::DsarClose(pb::DsarClose {
                        consultation_id: "ncsc:DSAR-1".into(),
                    })),
                })
            }),
        ];
        for (field, forge) in rows {
            let mut forged = transfer.clone();
            forge(&mut forged);
            let err = verify_delivery(&key, &body(&forged), &proof)
                .expect_err(&format!("a delivery with another {field} verified"));
            assert!(err.contains(field), "{field}: {err}");
        }
        // The content type is not in the log: it is not checked (and not claimed to be).
        let mut other = transfer.clone();
        other.content_type = "text/plain".into();
        verify_delivery(&key, &body(&other), &proof).unwrap();
    }

    /// A transfer to two agencies has an authority for each. The agent knows which agency it
    /// is (its certificate's): the delivery must carry that agency's agreement and clause, not
    /// a co-recipient's, and the transfer must be addressed to it.
    #[test]
    fn a_delivery_carries_this_agencys_own_authority() {
        let (mut transfer, mut entry) = test_log::transfer(br#"{"a":1}"#, "application/json");
        transfer.recipients.push("nca".into());
        let Some(pb::audit_entry::Event::TransferAccepted(a)) = &mut entry.event else {
            unreachable!()
        };
        if let Some(facts) = &mut a.envelope {
            facts.recipients.push("nca".into());
        }
        a.authorities.push(pb::Authority {
            recipient: "nca".into(),
            agreement_id: "nca-ncsc-2025".into(),
            clause: "7.1".into(),
        });
        let (key, proof) = test_log::prove(&entry);
        let claim = |t: &pb::Transfer, me: Option<&str>| {
            let mut claim = TransferClaim::of(t);
            claim.recipient = me.map(str::to_owned);
            DeliveryClaim::Transfer(Box::new(claim))
        };
        // ico's own delivery (ico's authority) verifies, for ico and when the agency is not
        // known; nca's copy labelled with ico's authority verifies only when it is not known.
        verify_delivery(&key, &claim(&transfer, Some("ico")), &proof).unwrap();
        verify_delivery(&key, &claim(&transfer, None), &proof).unwrap();
        let err = verify_delivery(&key, &claim(&transfer, Some("nca")), &proof).unwrap_err();
        assert!(err.contains("agreement_id and clause"), "{err}");
        let mut for_nca = transfer.clone();
        for_nca.agreement_id = "nca-ncsc-2025".into();
        for_nca.clause = "7.1".into();
        verify_delivery(&key, &claim(&for_nca, Some("nca")), &proof).unwrap();
        // A transfer not addressed to this agency is not its delivery.
        let err = verify_delivery(&key, &claim(&transfer, Some("ncsc")), &proof).unwrap_err();
        assert!(err.contains("recipient"), "{err}");
    }
}
