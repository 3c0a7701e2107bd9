//! The spool directory: the agent's only interface with the agency's own systems.
//!
//! ```text
//! outbox/    the agency drops JSON files here (write elsewhere or as *.tmp / .dotfile, then rename)
//! sent/      accepted files, each with <name>.receipt.json
//! refused/   refused files, each with <name>.reason.json (reason code and message)
//! failed/    files that could not be read or parsed, each with <name>.error.txt; also outbox
//!            entries that are not regular files (links, FIFOs: moved, never followed or
//!            opened) or whose names are not UTF-8 (kept with each other byte as \xNN)
//! inbox/     deliveries: <sender>.<message_id>.json, and <sender>.<message_id>.recall.json
//!            for recall notices, notice.<notice_id>.json for the broker's own notices
//!            (consultation reminders and deadlines, incident coordination)
//! .state/    the agent's own bookkeeping (message ids chosen for outbox files)
//! ```
//!
//! An outbox file is an [`OutboxMessage`]: one envelope. It may carry a workflow step
//! (docs/workflows.md) as a `workflow` object with exactly one key, the step's name:
//!
//! ```text
//! {"dsar_open":     {"reference": "DSAR-2026-0012", "concerns": ["<transfer id>", ...],
//!                    "organisation": "acme-ltd", "respond_by": "2026-12-31"}}
//! {"dsar_answer":   {"consultation_id": "nca:DSAR-2026-0012", "no_objection": true}}
//!                    (or "objection": "<exemption ground>", or "need_more_time": "2027-01-15")
//! {"dsar_close":    {"consultation_id": "nca:DSAR-2026-0012"}}
//! {"comms_propose": {"reference": "press-2026-12-02", "publish_after": "2026-12-05"}}
//! {"comms_answer":  {"statement_id": "ncsc:press-2026-12-02", "approve": true}}
//!                    (or "objection": "<reason>")
//! ```
//!
//! `concerns`, `organisation` and `respond_by` are optional. Times are a date (`YYYY-MM-DD`:
//! a deadline is the end of that day UTC, `publish_after` its start) or an RFC 3339 time. With
//! a step, `kind` may be left out (it follows from the step: `dsar_consultation` or
//! `public_communication`) and, if given, must be the step's. A file of exactly the form
//! `{"incident_involvement": "REF"}` is not an envelope: the agent declares the agency's
//! involvement in incident REF (`<agency>:<reference>`, or its own reference without prefix)
//! with `Workflows.Involve` and moves the file to `sent/` beside `<name>.involvement.json`, the
//! broker's answer. A malformed file of either form goes to `failed/`.
//!
//! Every write is atomic and durable: a temporary file in the same directory, fsync, rename,
//! fsync of the directory; a write that fails removes its temporary file. A delivery is
//! acknowledged only after its file is on disk, and one already in the inbox is not written
//! twice, so each message lands exactly once.
//!
//! The broker scopes message ids per sender: two agencies may use the same id, and their
//! messages are different transfers. Inbox files are therefore named, and recognised as already
//! delivered, by sender and message id together ([`InboxKey`]); by the id alone, one agency's
//! message would pass for a redelivery of another's and be acknowledged unwritten. Inboxes
//! written by earlier agents hold `<message_id>.json` (and `<message_id>.recall.json`): such a
//! file counts as this delivery only if the `sender` it records is this delivery's sender.

use std::{
    ffi::OsStr,
    fs::{self, File},
    io::{self, Read as _, Write},
    os::unix::ffi::OsStrExt as _,
    path::{Component, Path, PathBuf},
};

use base64::Engine as _;
use concordat_proto::{
    checkpoint::Checkpoint,
    envelope::{Envelope, Kind, Tlp},
    ids::{AgencyId, MessageId},
    pb,
    workflow::{Reference, WorkflowId, parse_deadline, parse_not_before},
};
use concordat_support::escape::{Escaped, lossless_name};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

/// The largest outbox file or payload file the agent reads.
pub const MAX_FILE_BYTES: u64 = 80 * 1024 * 1024;

/// The folders of a spool directory.
pub const FOLDERS: [&str; 6] = ["outbox", "sent", "refused", "failed", "inbox", ".state/ids"];

/// A spool directory.
#[derive(Debug, Clone)]
pub struct Spool {
    root: PathBuf,
}

/// Why an outbox file cannot be sent: it goes to `failed/` with this explanation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboxError {
    /// The file (or its payload or token file) could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: io::Error,
    },
    /// The file is too large.
    #[error("{path} is larger than {MAX_FILE_BYTES} bytes")]
    TooLarge {
        /// The file.
        path: String,
    },
    /// The path names something other than a regular file (a directory, a FIFO, a device).
    #[error("{path} is not a regular file")]
    NotAFile {
        /// The path.
        path: String,
    },
    /// A file an outbox message names is not a relative path of plain names inside the spool
    /// directory, or a symbolic link is on its way (none is followed).
    #[error(
        "{path:?} {why}: files named by an outbox message are read only from inside the spool \
         directory, by a relative path of plain names, never through a symbolic link"
    )]
    OutsideSpool {
        /// The path as the message gives it.
        path: String,
        /// What is wrong with it.
        why: String,
    },
    /// The file is not valid outbox JSON.
    #[error("not a valid outbox message: {0}")]
    Parse(String),
    /// The file's name is too long to be filed under (its id record, its sidecar).
    #[error(
        "its name is {0} bytes long; the agent sends files whose names have at most \
         {MAX_NAME_BYTES} bytes: give it a shorter name"
    )]
    NameTooLong(usize),
    /// The file left the outbox before it could be read (one replaced meanwhile is read as
    /// the new file): nothing to send.
    #[error("{path} left the outbox before it was read")]
    Gone {
        /// The file.
        path: String,
    },
}

/// The longest outbox file name the agent sends, in bytes. Its id record, its sidecar and their
/// temporary files add up to 59 bytes to the name it is filed under (a dot, a message id, a
/// suffix such as `.involvement.json`, and `.tmp`), and no file name may exceed 255 bytes.
pub const MAX_NAME_BYTES: usize = 190;

/// How much of a longer name is kept when such a file is filed under `failed/` (followed by a
/// random id).
const KEPT_NAME_BYTES: usize = 120;

/// Which file a path named when the agent read it: its device and inode. A file written anew
/// and renamed over the old one, as the README asks writers to do, is another file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    /// The file at `path` (not following a symbolic link).
    fn of(path: &Path) -> io::Result<FileId> {
        Ok(FileId::from(&fs::symlink_metadata(path)?))
    }

    /// The file `file` is open on.
    fn of_file(file: &File) -> io::Result<FileId> {
        Ok(FileId::from(&file.metadata()?))
    }
}

impl From<&fs::Metadata> for FileId {
    fn from(meta: &fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt as _;
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// An outbox file, as the agency writes it.
///
/// Exactly one of `payload` (any JSON value, sent as written, members in their order, without
/// the whitespace between tokens), `payload_base64` or `payload_file` must be given; at most
/// one of `consent_token` and `consent_token_file`. Files (`payload_file`,
/// `consent_token_file`, `consent_token_files`, `designation_file`) are named by a relative
/// path of plain names inside the spool directory: an absolute path, `.` or `..`, or a symbolic
/// link anywhere on the way (none is followed) is refused ([`OutboxError::OutsideSpool`]). Keep
/// payload files out of `outbox/`, or they would be taken for messages.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxMessage {
    /// The message id (a UUID). When absent the agent chooses one, once, and reuses it on retry.
    pub message_id: Option<String>,
    /// Recipient agency ids.
    pub recipients: Vec<String>,
    /// `threat_assessment`, `incident_record`, `dsar_consultation` or `public_communication`;
    /// may be left out when `workflow` is given (the step's kind).
    pub kind: Option<String>,
    /// The organisation the payload identifies, if any.
    pub organisation: Option<String>,
    /// The incident reference.
    pub incident_ref: Option<String>,
    /// The payload's media type (default `application/json` for inline JSON payloads,
    /// `application/octet-stream` otherwise).
    pub content_type: Option<String>,
    /// TLP marking: clear, green, amber, amber+strict, red (default amber).
    pub tlp: Option<String>,
    /// An inline JSON payload, kept as the text the file holds: parsed into a
    /// `serde_json::Value`, a large one took tens of times its size in memory.
    pub payload: Option<Box<serde_json::value::RawValue>>,
    /// An inline binary payload, base64.
    pub payload_base64: Option<String>,
    /// A payload file.
    pub payload_file: Option<PathBuf>,
    /// An inline consent token.
    pub consent_token: Option<String>,
    /// A file holding the consent token.
    pub consent_token_file: Option<PathBuf>,
    /// Further organisations the payload identifies, each needing its consent token.
    #[serde(default)]
    pub organisations: Vec<String>,
    /// Further consent tokens, inline, one per further organisation identified.
    #[serde(default)]
    pub consent_tokens: Vec<String>,
    /// Files holding further consent tokens.
    #[serde(default)]
    pub consent_token_files: Vec<PathBuf>,
    /// A designation file (`concordat significance countersign`): the two halves of a
    /// national-significance designation, one per line.
    pub designation_file: Option<PathBuf>,
    /// A workflow step the envelope carries (see the module docs).
    pub workflow: Option<OutboxStep>,
}

/// A workflow step in an outbox file: `{"<step name>": {fields}}` (see the module docs).
/// Times are dates or RFC 3339 times, as [`parse_deadline`] and [`parse_not_before`] read them.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum OutboxStep {
    /// Opens a subject-access consultation with the recipients.
    DsarOpen {
        /// The requester's own reference.
        reference: String,
        /// The transfers (ids) it concerns.
        #[serde(default)]
        concerns: Vec<String>,
        /// The organisation it concerns.
        organisation: Option<String>,
        /// The deadline for answers (default: the agreement's).
        respond_by: Option<String>,
    },
    /// Answers a consultation: exactly one of the three answers.
    DsarAnswer {
        /// `<requester>:<reference>`.
        consultation_id: String,
        /// `true`: no objection.
        no_objection: Option<bool>,
        /// An objection, with its exemption ground.
        objection: Option<String>,
        /// The agency will answer by then.
        need_more_time: Option<String>,
    },
    /// Closes a consultation (sent to exactly the consulted agencies).
    DsarClose {
        /// `<requester>:<reference>`.
        consultation_id: String,
    },
    /// Proposes the payload as a public statement to the recipients.
    CommsPropose {
        /// The proposer's own reference.
        reference: String,
        /// Not to be published before.
        publish_after: String,
    },
    /// Answers a proposed statement: exactly one of the two answers.
    CommsAnswer {
        /// `<proposer>:<reference>`.
        statement_id: String,
        /// `true`: approved.
        approve: Option<bool>,
        /// An objection, with its reason.
        objection: Option<String>,
    },
}

impl OutboxStep {
    /// The step as the wire carries it. Only the shapes the file format adds are checked here
    /// (one answer, readable times); the fields themselves are checked with the envelope.
    pub fn to_wire(&self) -> Result<pb::WorkflowStep, String> {
        use pb::workflow_step::Step as W;
        let time = |field: &str, text: &str, parse: fn(&str) -> Result<_, String>| {
            parse(text)
                .map(timestamp)
                .map_err(|e| format!("workflow.{field}: {e}"))
        };
        let step = match self {
            OutboxStep::DsarOpen {
                reference,
                concerns,
                organisation,
                respond_by,
            } => W::DsarOpen(pb::DsarOpen {
                reference: reference.clone(),
                concerns: concerns.clone(),
                organisation: organisation.clone().unwrap_or_default(),
                respond_by: respond_by
                    .as_deref()
                    .map(|t| time("dsar_open.respond_by", t, parse_deadline))
                    .transpose()?,
            }),
            OutboxStep::DsarAnswer {
                consultation_id,
                no_objection,
                objection,
                need_more_time,
            } => {
                use pb::dsar_answer::Answer;
                let answer = match (no_objection, objection, need_more_time) {
                    (Some(true), None, None) => Answer::NoObjection(true),
                    (None, Some(text), None) => Answer::Objection(text.clone()),
                    (None, None, Some(t)) => {
                        Answer::NeedMoreTime(time("dsar_answer.need_more_time", t, parse_deadline)?)
                    }
                    _ => {
                        return Err("workflow.dsar_answer: give exactly one of \
                                    \"no_objection\": true, \"objection\" and \"need_more_time\""
                            .into());
                    }
                };
                W::DsarAnswer(pb::DsarAnswer {
                    consultation_id: consultation_id.clone(),
                    answer: Some(answer),
                })
            }
            OutboxStep::DsarClose { consultation_id } => W::DsarClose(pb::DsarClose {
                consultation_id: consultation_id.clone(),
            }),
            OutboxStep::CommsPropose {
                reference,
                publish_after,
            } => W::CommsPropose(pb::CommsPropose {
                reference: reference.clone(),
                publish_after: Some(time(
                    "comms_propose.publish_after",
                    publish_after,
                    parse_not_before,
                )?),
            }),
            OutboxStep::CommsAnswer {
                statement_id,
                approve,
                objection,
            } => {
                use pb::comms_answer::Answer;
                let answer = match (approve, objection) {
                    (Some(true), None) => Answer::Approve(true),
                    (None, Some(text)) => Answer::Objection(text.clone()),
                    _ => {
                        return Err("workflow.comms_answer: give exactly one of \
                                    \"approve\": true and \"objection\""
                            .into());
                    }
                };
                W::CommsAnswer(pb::CommsAnswer {
                    statement_id: statement_id.clone(),
                    answer: Some(answer),
                })
            }
        };
        Ok(pb::WorkflowStep { step: Some(step) })
    }
}

/// An outbox file that declares the agency's involvement in an incident.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InvolvementFile {
    incident_involvement: String,
}

/// What an outbox file asks the agent to do.
#[derive(Debug, Clone, PartialEq)]
pub enum OutboxItem {
    /// Send this envelope.
    Envelope(Box<Envelope>),
    /// Declare involvement in this incident (`Workflows.Involve`); the reference as written,
    /// checked for shape.
    Involvement(String),
}

/// What the agent writes beside an involvement file it declared: the broker's answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct InvolvementAnswerFile {
    /// The federation-unique incident reference.
    pub incident_ref: String,
    /// The other agencies involved that were told (each sent a coordination notice).
    pub notified: Vec<String>,
    /// True when the agency had declared it before.
    pub duplicate: bool,
}

fn timestamp(t: time::OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: 0,
    }
}

/// What the agent writes beside an accepted file.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReceiptFile {
    /// The broker's transfer id.
    pub transfer_id: String,
    /// The message id.
    pub message_id: String,
    /// When the broker accepted it (RFC 3339).
    pub accepted_at: String,
    /// Per recipient: agreement and clause.
    pub authorities: Vec<AuthorityFile>,
    /// The consent token's jti, if any.
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub consent_jti: String,
    /// The consent token's issuer key id, if any.
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub consent_issuer: String,
    /// The audit log index of the transfer's entry, when the broker provides it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub log_index: Option<u64>,
    /// The whole proof of acceptance, as the broker gave it: checked offline by
    /// `concordat receipt verify FILE --log-key K`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub proof: Option<ProofFile>,
    /// The broker's warnings about the decision, one sentence each: e.g. an agreement relied
    /// on is due or overdue for review.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub warnings: Vec<String>,
}

/// A receipt's audit proof in a receipt file: the entry, a signed checkpoint that includes it,
/// and the RFC 6962 inclusion proof.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProofFile {
    /// The entry's index in the audit log.
    pub log_index: u64,
    /// The entry's exact bytes (a serialized `AuditEntry`), base64.
    pub entry: String,
    /// The signed checkpoint (a C2SP signed note).
    pub checkpoint: String,
    /// The inclusion proof's hashes, base64, leaf to root.
    pub inclusion_proof: Vec<String>,
}

impl ProofFile {
    /// The proof of `receipt`, if it carries one.
    pub fn of(receipt: &pb::Receipt) -> Option<ProofFile> {
        receipt.audit.as_ref().map(ProofFile::from_wire)
    }

    /// The proof as a file keeps it.
    pub fn from_wire(a: &pb::AuditProof) -> ProofFile {
        let b64 = &base64::engine::general_purpose::STANDARD;
        ProofFile {
            log_index: a.log_index,
            entry: b64.encode(&a.entry),
            checkpoint: a.checkpoint.clone(),
            inclusion_proof: a.inclusion_proof.iter().map(|h| b64.encode(h)).collect(),
        }
    }

    /// The proof as the wire has it; `Err` names the field that is not base64.
    pub fn to_wire(&self) -> Result<pb::AuditProof, String> {
        let b64 = &base64::engine::general_purpose::STANDARD;
        let decode = |field: &str, s: &str| {
            b64.decode(s.trim())
                .map_err(|e| format!("proof.{field} is not base64: {e}"))
        };
        Ok(pb::AuditProof {
            log_index: self.log_index,
            checkpoint: self.checkpoint.clone(),
            entry: decode("entry", &self.entry)?,
            inclusion_proof: self
                .inclusion_proof
                .iter()
                .map(|h| decode("inclusion_proof", h))
                .collect::<Result<_, _>>()?,
        })
    }
}

/// One recipient's authority, in a receipt file.
#[derive(Debug, Serialize, Deserialize)]
pub struct AuthorityFile {
    /// The recipient.
    pub recipient: String,
    /// The agreement relied on.
    pub agreement_id: String,
    /// Its clause.
    pub clause: String,
}

/// What the agent writes beside a refused file.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReasonFile {
    /// The message id that was sent (empty for an involvement declaration).
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub message_id: String,
    /// The stable reason code, e.g. `CONSENT_MISSING`.
    pub reason: String,
    /// The broker's explanation.
    pub message: String,
}

/// Where a delivery went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    /// Written to this file.
    Written(PathBuf),
    /// Already in the inbox from an earlier delivery.
    AlreadyPresent(PathBuf),
}

impl Delivered {
    /// The inbox file.
    pub fn path(&self) -> &Path {
        match self {
            Delivered::Written(p) | Delivered::AlreadyPresent(p) => p,
        }
    }
}

/// Why a delivery could not be stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeliveryError {
    /// The delivery is not something the agent can store (e.g. a message id that is not a UUID).
    #[error("unusable delivery: {0}")]
    Invalid(&'static str),
    /// Writing failed.
    #[error("writing to the inbox: {0}")]
    Io(#[from] io::Error),
}

pub(crate) fn rfc3339(ts: Option<&prost_types::Timestamp>) -> String {
    ts.and_then(|t| time::OffsetDateTime::from_unix_timestamp(t.seconds).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

impl Spool {
    /// Opens the spool at `root`, creating its folders and removing the agent's own temporary
    /// files left by a crash (never the outbox's: those belong to the agency's systems).
    pub fn open(root: &Path) -> io::Result<Spool> {
        for folder in FOLDERS {
            fs::create_dir_all(root.join(folder))?;
        }
        for folder in ["sent", "refused", "failed", "inbox", ".state", ".state/ids"] {
            for entry in fs::read_dir(root.join(folder))? {
                let entry = entry?;
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with('.') && name.ends_with(".tmp") && entry.file_type()?.is_file() {
                    fs::remove_file(entry.path())?;
                }
            }
        }
        Ok(Spool {
            root: root.to_path_buf(),
        })
    }

    /// The spool's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A folder of the spool (`outbox`, `sent`, …).
    pub fn dir(&self, folder: &str) -> PathBuf {
        self.root.join(folder)
    }

    /// The complete files waiting in `outbox/`, by name. Dot-files, `*.tmp` and directories are
    /// ignored: they are still being written.
    ///
    /// Entries that can never be sent are set aside into `failed/` as they are found, each
    /// with a log line and its `.error.txt`, so that they are reported once rather than skipped
    /// forever in silence: a symbolic link (never followed), a FIFO, a socket or a device
    /// (never opened), and a name that is not UTF-8 (kept under [`lossless_name`]: its UTF-8
    /// runs as they are, every other byte as `\xNN`).
    pub fn pending(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(self.dir("outbox"))? {
            let entry = entry?;
            let raw = entry.file_name();
            let bytes = raw.as_bytes();
            if bytes.starts_with(b".") || bytes.ends_with(b".tmp") {
                continue;
            }
            // The entry's own type: a symbolic link is not followed.
            let file_type = entry.file_type()?;
            if file_type.is_dir() {
                continue;
            }
            let mut problems = Vec::new();
            if !file_type.is_file() {
                problems.push(not_a_file(file_type));
            }
            match raw.to_str() {
                Some(name) if problems.is_empty() => names.push(name.to_owned()),
                Some(_) => self.set_aside(&raw, &problems.join("; "))?,
                None => {
                    problems.push("its name is not UTF-8 (outbox file names must be)");
                    self.set_aside(&raw, &problems.join("; "))?;
                }
            }
        }
        names.sort();
        Ok(names)
    }

    /// Moves the outbox entry `raw` (which cannot be sent, for `reason`) into `failed/` beside
    /// its `.error.txt`, as [`Spool::complete_failed`] does, but under a name that is valid
    /// UTF-8 and short enough for its sidecar, and says so in the log. The entry is renamed,
    /// never opened: a link moves as a link, a FIFO as a FIFO.
    fn set_aside(&self, raw: &OsStr, reason: &str) -> io::Result<()> {
        let shown = lossless_name(raw);
        let failed = self.dir("failed");
        let dest = free_name(&failed, &shown, ".error.txt", None);
        let sidecar = format!("{dest}.error.txt");
        atomic_write(
            &failed,
            &sidecar,
            format!("outbox/{shown}: {reason}\n").as_bytes(),
        )?;
        match fs::rename(self.dir("outbox").join(raw), failed.join(&dest)) {
            Ok(()) => {}
            // Removed by the agency meanwhile: nothing to report.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::remove_file(failed.join(&sidecar))?;
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        sync_dir(&failed)?;
        sync_dir(&self.dir("outbox"))?;
        tracing::warn!(
            file = %Escaped(&shown),
            moved_to = %Escaped(&format!("failed/{dest}")),
            "outbox entry set aside: {reason}"
        );
        Ok(())
    }

    /// Opens `relative`, a file inside the spool directory, without following a symbolic
    /// link anywhere on its way: each directory is opened relative to the one before with
    /// `O_NOFOLLOW` (`openat`), and so is the file, so that a link swapped in meanwhile is
    /// refused, never raced past (a check of the path followed by an open would be). The file
    /// is opened non-blocking: a FIFO does not block the open, and [`read_whole`] refuses it.
    fn open_inside(&self, relative: &Path) -> Result<File, OutboxError> {
        use nix::{errno::Errno, fcntl::OFlag, sys::stat::Mode};
        let outside = |why: String| OutboxError::OutsideSpool {
            path: relative.display().to_string(),
            why,
        };
        let read_error = |source: io::Error| OutboxError::Read {
            path: self.root.join(relative).display().to_string(),
            source,
        };
        let names = plain_components(relative).map_err(|why| outside(why.into()))?;
        let Some((file, dirs)) = names.split_last() else {
            return Err(outside("is empty".into()));
        };
        let refused = |e: Errno, name: &OsStr| match e {
            // O_NOFOLLOW's refusal; with O_DIRECTORY, some kernels say ENOTDIR instead.
            Errno::ELOOP => outside(format!(
                "is a symbolic link or passes through one ({name:?})"
            )),
            e => read_error(e.into()),
        };
        let mut dir: std::os::fd::OwnedFd = File::open(&self.root).map_err(read_error)?.into();
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        for name in dirs {
            dir = nix::fcntl::openat(&dir, *name, flags | OFlag::O_DIRECTORY, Mode::empty())
                .map_err(|e| match e {
                    Errno::ENOTDIR if is_symlink_at(&dir, name) => refused(Errno::ELOOP, name),
                    e => refused(e, name),
                })?;
        }
        let fd = nix::fcntl::openat(
            &dir,
            *file,
            flags | OFlag::O_NONBLOCK | OFlag::O_NOCTTY,
            Mode::empty(),
        )
        .map_err(|e| refused(e, file))?;
        Ok(File::from(fd))
    }

    /// Reads `relative`, a file inside the spool directory (see [`Spool::open_inside`]).
    fn read_inside(&self, relative: &Path) -> Result<Vec<u8>, OutboxError> {
        let file = self.open_inside(relative)?;
        read_whole(file, &self.root.join(relative).display().to_string())
    }

    /// Reads and validates the outbox file `name`: an envelope (its message id chosen, once,
    /// if the file does not give one) or an involvement declaration.
    pub fn load(&self, name: &str) -> Result<OutboxItem, OutboxError> {
        self.load_file(name).map(|(item, _)| item)
    }

    /// As [`Spool::load`], with the identity of the file read, which the `complete_*` methods
    /// check before they move the file: one removed or replaced since is not moved.
    pub fn load_file(&self, name: &str) -> Result<(OutboxItem, FileId), OutboxError> {
        if name.len() > MAX_NAME_BYTES {
            return Err(OutboxError::NameTooLong(name.len()));
        }
        let relative = Path::new("outbox").join(name);
        let shown = self.root.join(&relative).display().to_string();
        let file = match self.open_inside(&relative) {
            Err(OutboxError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Err(OutboxError::Gone { path: shown });
            }
            opened => opened?,
        };
        let read = FileId::of_file(&file).map_err(|source| OutboxError::Read {
            path: shown.clone(),
            source,
        })?;
        let bytes = read_whole(file, &shown)?;
        item_from_outbox(name, &bytes, self).map(|item| (item, read))
    }

    /// The message id chosen for outbox file `name` with content `fingerprint` (its SHA-256):
    /// read from `.state/ids/`, or chosen now and stored durably before it is used, so that a
    /// retry after a crash reuses it. The fingerprint keeps a stale record (left by a crash after
    /// the file moved out, before its record was removed) from lending its id to a new file of
    /// the same name.
    pub fn message_id_for(&self, name: &str, fingerprint: &str) -> io::Result<MessageId> {
        let dir = self.dir(".state/ids");
        let path = dir.join(name);
        if let Ok(text) = fs::read_to_string(&path) {
            let mut parts = text.split_whitespace();
            if let (Some(id), Some(print)) = (parts.next(), parts.next())
                && print == fingerprint
                && let Ok(id) = id.parse()
            {
                return Ok(id);
            }
        }
        let id = MessageId::new_time_ordered(time::OffsetDateTime::now_utc());
        atomic_write(&dir, name, format!("{id} {fingerprint}\n").as_bytes())?;
        Ok(id)
    }

    /// Moves outbox file `name` to `folder` beside a sidecar file `<name><suffix>` with
    /// `contents`, then forgets its message id. The sidecar is written first: a crash in between
    /// leaves the file in the outbox, to be sent again under the same id.
    ///
    /// Nothing in `folder` is overwritten: when `<name>` or `<name><suffix>` is taken (an
    /// earlier file of the same name, or a file named like another's sidecar), the file is
    /// filed as `<name>.<id>`, the message id or, without one or when that is taken too, a
    /// random one. A name longer than [`MAX_NAME_BYTES`] keeps its first bytes only.
    ///
    /// `loaded` is the file as it was read. One removed from the outbox since is not there to
    /// move, and one replaced since is another message: it stays in the outbox, to be sent on
    /// the next pass under a new id. Either way the sidecar is filed alone, and a warning says
    /// so.
    fn complete(
        &self,
        name: &str,
        folder: &str,
        suffix: &str,
        contents: &[u8],
        id: Option<MessageId>,
        loaded: Option<FileId>,
    ) -> io::Result<PathBuf> {
        let dest_dir = self.dir(folder);
        let dest = free_name(&dest_dir, name, suffix, id);
        atomic_write(&dest_dir, &format!("{dest}{suffix}"), contents)?;
        let source = self.dir("outbox").join(name);
        let present = match FileId::of(&source) {
            Ok(now) => Some(now),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        match (present, loaded) {
            (None, _) => tracing::warn!(
                file = %Escaped(name),
                filed = %Escaped(&format!("{folder}/{dest}{suffix}")),
                "the file left the outbox while it was being sent: its outcome is filed without it"
            ),
            (Some(now), Some(read)) if now != read => tracing::warn!(
                file = %Escaped(name),
                filed = %Escaped(&format!("{folder}/{dest}{suffix}")),
                "the file was replaced while it was being sent: the outcome filed is the file's as \
                 it was read; the new file stays in the outbox, to be sent as a new message"
            ),
            _ => {
                fs::rename(&source, dest_dir.join(&dest))?;
                sync_dir(&dest_dir)?;
            }
        }
        sync_dir(&self.dir("outbox"))?;
        // A name too long to send never had an id record.
        if name.len() <= MAX_NAME_BYTES {
            match fs::remove_file(self.dir(".state/ids").join(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(dest_dir.join(dest))
    }

    /// Records an accepted file: `sent/<name>` and `sent/<name>.receipt.json`.
    pub fn complete_sent(
        &self,
        name: &str,
        receipt: &pb::Receipt,
        loaded: Option<FileId>,
    ) -> io::Result<PathBuf> {
        let file = ReceiptFile {
            transfer_id: receipt.transfer_id.clone(),
            message_id: receipt.message_id.clone(),
            accepted_at: rfc3339(receipt.accepted_at.as_ref()),
            authorities: receipt
                .authorities
                .iter()
                .map(|a| AuthorityFile {
                    recipient: a.recipient.clone(),
                    agreement_id: a.agreement_id.clone(),
                    clause: a.clause.clone(),
                })
                .collect(),
            consent_jti: receipt.consent_jti.clone(),
            consent_issuer: receipt.consent_issuer.clone(),
            log_index: receipt.audit.as_ref().map(|a| a.log_index),
            proof: ProofFile::of(receipt),
            warnings: receipt.warnings.clone(),
        };
        let json = serde_json::to_vec_pretty(&file).map_err(io::Error::other)?;
        let id = receipt.message_id.parse().ok();
        self.complete(name, "sent", ".receipt.json", &json, id, loaded)
    }

    /// Records a refused file: `refused/<name>` and `refused/<name>.reason.json`.
    pub fn complete_refused(
        &self,
        name: &str,
        message_id: MessageId,
        reason: &str,
        message: &str,
        loaded: Option<FileId>,
    ) -> io::Result<PathBuf> {
        let file = ReasonFile {
            message_id: message_id.to_string(),
            reason: reason.to_owned(),
            message: message.to_owned(),
        };
        let json = serde_json::to_vec_pretty(&file).map_err(io::Error::other)?;
        self.complete(
            name,
            "refused",
            ".reason.json",
            &json,
            Some(message_id),
            loaded,
        )
    }

    /// Records a declared involvement: `sent/<name>` and `sent/<name>.involvement.json`.
    pub fn complete_involved(
        &self,
        name: &str,
        answer: &pb::InvolveResponse,
        loaded: Option<FileId>,
    ) -> io::Result<PathBuf> {
        let file = InvolvementAnswerFile {
            incident_ref: answer.incident_ref.clone(),
            notified: answer.notified.clone(),
            duplicate: answer.duplicate,
        };
        let json = serde_json::to_vec_pretty(&file).map_err(io::Error::other)?;
        self.complete(name, "sent", ".involvement.json", &json, None, loaded)
    }

    /// Records a refused involvement declaration: `refused/<name>` and
    /// `refused/<name>.reason.json` (without a message id: nothing was sent).
    pub fn complete_refused_involvement(
        &self,
        name: &str,
        reason: &str,
        message: &str,
        loaded: Option<FileId>,
    ) -> io::Result<PathBuf> {
        let file = ReasonFile {
            message_id: String::new(),
            reason: reason.to_owned(),
            message: message.to_owned(),
        };
        let json = serde_json::to_vec_pretty(&file).map_err(io::Error::other)?;
        self.complete(name, "refused", ".reason.json", &json, None, loaded)
    }

    /// Records a file that could not be read or parsed: `failed/<name>` and
    /// `failed/<name>.error.txt`.
    pub fn complete_failed(&self, name: &str, error: &str) -> io::Result<PathBuf> {
        self.complete(
            name,
            "failed",
            ".error.txt",
            format!("{error}\n").as_bytes(),
            None,
            None,
        )
    }

    /// Writes a delivery to the inbox, durably, unless it is already there.
    ///
    /// A delivery already there (from this sender, under this message id) is not written
    /// again, but the inbox directory is fsynced before this returns: the earlier write may have
    /// been cut short between its rename and its directory fsync, and the caller acknowledges
    /// on return.
    pub fn deliver(&self, delivery: &pb::Delivery) -> Result<Delivered, DeliveryError> {
        let inbox = self.dir("inbox");
        if let Some(pb::delivery::Body::Notice(n)) = &delivery.body {
            return self.deliver_notice(&inbox, n, delivery.audit.as_ref());
        }
        // The proof of the entry it was queued under goes beside the payload, for the agency to
        // keep (`concordat receipt verify` checks the file offline).
        let proof = delivery.audit.as_ref().map(ProofFile::from_wire);
        let (key, file) = match &delivery.body {
            Some(pb::delivery::Body::Transfer(t)) => (
                InboxKey::parse(&t.sender, &t.message_id, InboxKind::Transfer)?,
                InboxFile::Transfer(Box::new(TransferFile::of(t, proof))),
            ),
            Some(pb::delivery::Body::RecallNotice(n)) => (
                InboxKey::parse(&n.sender, &n.message_id, InboxKind::RecallNotice)?,
                InboxFile::Recall(Box::new(RecallFile::of(n, proof))),
            ),
            Some(pb::delivery::Body::Notice(_)) | None => {
                return Err(DeliveryError::Invalid("empty delivery"));
            }
        };
        let (name, present) = match &delivery.body {
            Some(pb::delivery::Body::RecallNotice(n)) => recall_file(&inbox, &key, n),
            _ => {
                let name = key.file_name();
                let present = match inbox.join(&name) {
                    path if path.exists() => Some(path),
                    _ => key.legacy_file_in(&inbox),
                };
                (name, present)
            }
        };
        let path = inbox.join(&name);
        if let Some(present) = present {
            sync_dir(&inbox)?;
            return Ok(Delivered::AlreadyPresent(present));
        }
        let bytes = match &file {
            InboxFile::Transfer(t) => serde_json::to_vec_pretty(t),
            InboxFile::Recall(r) => serde_json::to_vec_pretty(r),
        }
        .map_err(io::Error::other)?;
        atomic_write(&inbox, &name, &bytes)?;
        Ok(Delivered::Written(path))
    }
}

/// An inbox file of a transfer or a recall notice, as [`Spool::deliver`] writes it.
enum InboxFile<'a> {
    Transfer(Box<TransferFile<'a>>),
    Recall(Box<RecallFile>),
}

impl Spool {
    /// Writes a notice of the broker's own to the inbox as `notice.<notice_id>.json`, unless
    /// it is already there (see [`Spool::deliver`]).
    fn deliver_notice(
        &self,
        inbox: &Path,
        n: &pb::Notice,
        audit: Option<&pb::AuditProof>,
    ) -> Result<Delivered, DeliveryError> {
        let id: uuid::Uuid = n
            .notice_id
            .parse()
            .map_err(|_| DeliveryError::Invalid("notice id is not a UUID"))?;
        let name = format!("notice.{id}.json");
        let path = inbox.join(&name);
        if path.exists() {
            sync_dir(inbox)?;
            return Ok(Delivered::AlreadyPresent(path));
        }
        let mut json = concordat_proto::audit::notice_json(n);
        if let Some(obj) = json.as_object_mut() {
            obj.insert("type".into(), serde_json::Value::String("notice".into()));
            if let Some(audit) = audit {
                let proof =
                    serde_json::to_value(ProofFile::from_wire(audit)).map_err(io::Error::other)?;
                obj.insert("proof".into(), proof);
            }
        }
        let bytes = serde_json::to_vec_pretty(&json).map_err(io::Error::other)?;
        atomic_write(inbox, &name, &bytes)?;
        Ok(Delivered::Written(path))
    }
}

/// What an inbox file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboxKind {
    /// A transfer: `<sender>.<message_id>.json`.
    Transfer,
    /// A recall notice for a transfer: `<sender>.<message_id>.recall.json`.
    RecallNotice,
}

/// What names an inbox file: the sender and the message id of one transfer (the broker scopes
/// message ids per sender), and whether the file is the transfer or its recall notice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxKey {
    /// The sending agency.
    pub sender: AgencyId,
    /// The sender's message id.
    pub message_id: MessageId,
    /// The transfer or its recall notice.
    pub kind: InboxKind,
}

/// Where recall notice `n` goes in `inbox`, and the file that already holds it, if one does.
/// A transfer made under several consents is recalled once for each consent withdrawn: the
/// first notice is `<sender>.<message_id>.recall.json`, each other one
/// `<sender>.<message_id>.recall.<digest>.json` (the first 16 hex digits of the SHA-256 of its
/// consent's issuer and jti). A file that records another sender or another consent, or that
/// cannot be read, is not this notice (writing it again risks a duplicate, never a loss).
fn recall_file(inbox: &Path, key: &InboxKey, n: &pb::RecallNotice) -> (String, Option<PathBuf>) {
    let holds_it = |path: &Path| {
        Recorded::read(path).is_some_and(|r| {
            r.sender == key.sender.as_str()
                && r.consent_jti == n.consent_jti
                && r.consent_issuer == n.consent_issuer
        })
    };
    let first = key.file_name();
    let digest = hex_digest(format!("{}\0{}", n.consent_issuer, n.consent_jti).as_bytes());
    let other = format!(
        "{}.{}.recall.{}.json",
        key.sender,
        key.message_id,
        &digest[..16]
    );
    for name in [&first, &other] {
        let path = inbox.join(name);
        if holds_it(&path) {
            return (name.clone(), Some(path));
        }
    }
    let legacy = inbox.join(key.legacy_file_name());
    if holds_it(&legacy) {
        return (first, Some(legacy));
    }
    if inbox.join(&first).exists() {
        (other, None)
    } else {
        (first, None)
    }
}

/// What an inbox file records of whom it is from (the one field an old-style name leaves out)
/// and, for a recall notice, which consent it recalls (absent in transfers, and in the files
/// of earlier agents, which wrote one notice per transfer).
#[derive(Deserialize)]
struct Recorded {
    sender: String,
    #[serde(default)]
    consent_jti: String,
    #[serde(default)]
    consent_issuer: String,
}

impl Recorded {
    /// What the inbox file at `path` records, or `None` if it cannot be read as an inbox file.
    fn read(path: &Path) -> Option<Recorded> {
        serde_json::from_slice(&fs::read(path).ok()?).ok()
    }
}

impl InboxKey {
    /// The key of a delivery as the broker sent it; both fields become parts of a file name,
    /// so both must parse.
    fn parse(sender: &str, message_id: &str, kind: InboxKind) -> Result<Self, DeliveryError> {
        Ok(InboxKey {
            sender: sender
                .parse()
                .map_err(|_| DeliveryError::Invalid("sender is not an agency id"))?,
            message_id: message_id
                .parse()
                .map_err(|_| DeliveryError::Invalid("message id is not a UUID"))?,
            kind,
        })
    }

    /// The inbox file name: `<sender>.<message_id>.json` or `<sender>.<message_id>.recall.json`.
    /// Agency ids have no dots, so the name splits back unambiguously.
    pub fn file_name(&self) -> String {
        format!("{}.{}", self.sender, self.legacy_file_name())
    }

    /// The name earlier agents gave the same delivery: the message id alone.
    fn legacy_file_name(&self) -> String {
        match self.kind {
            InboxKind::Transfer => format!("{}.json", self.message_id),
            InboxKind::RecallNotice => format!("{}.recall.json", self.message_id),
        }
    }

    /// The old-style file in `inbox` that holds this delivery, if there is one: a file of the
    /// legacy name whose recorded sender is this sender. A file from another sender, or one that
    /// cannot be read, is not this delivery (writing it again risks a duplicate, never a loss).
    fn legacy_file_in(&self, inbox: &Path) -> Option<PathBuf> {
        let path = inbox.join(self.legacy_file_name());
        let recorded = Recorded::read(&path)?;
        (recorded.sender == self.sender.as_str()).then_some(path)
    }
}

/// A message kind as files and refusals name it (`threat_assessment`), or its number.
pub(crate) fn kind_name(kind: i32) -> String {
    Kind::try_from(kind)
        .map(|k| k.as_str().to_owned())
        .unwrap_or_else(|_| kind.to_string())
}

/// A TLP marking as files and refusals name it (`amber+strict`), or its number.
pub(crate) fn tlp_name(tlp: i32) -> String {
    Tlp::try_from(tlp)
        .map(|t| t.as_str().to_owned())
        .unwrap_or_else(|_| tlp.to_string())
}

/// Where the parts of an outbox message that are not in its file come from: the payload and
/// token files it names, and the message id chosen for a file that gives none. The spool reads
/// them from disk; the fuzz target (`crate::fuzzing`) supplies them from memory.
pub(crate) trait OutboxSources {
    /// Reads a file named by an outbox message (relative to the spool directory).
    fn read_file(&self, path: &Path) -> Result<Vec<u8>, OutboxError>;
    /// The message id for outbox file `name` whose contents have SHA-256 `fingerprint`.
    fn message_id(&self, name: &str, fingerprint: &str) -> Result<MessageId, OutboxError>;
}

impl OutboxSources for Spool {
    fn read_file(&self, path: &Path) -> Result<Vec<u8>, OutboxError> {
        self.read_inside(path)
    }

    fn message_id(&self, name: &str, fingerprint: &str) -> Result<MessageId, OutboxError> {
        self.message_id_for(name, fingerprint)
            .map_err(|source| OutboxError::Read {
                path: self.dir(".state/ids").join(name).display().to_string(),
                source,
            })
    }
}

/// Parses and validates the contents `bytes` of outbox file `name`: an involvement
/// declaration if it is one, else an envelope.
pub(crate) fn item_from_outbox(
    name: &str,
    bytes: &[u8],
    sources: &impl OutboxSources,
) -> Result<OutboxItem, OutboxError> {
    // The declaration's form is strict (nothing but its one key), so trying it first costs one
    // failed parse that stops at the first other key.
    if let Ok(file) = serde_json::from_slice::<InvolvementFile>(bytes) {
        let text = file.incident_involvement.trim();
        let checked = match text.split_once(':') {
            Some(_) => text.parse::<WorkflowId>().map(|_| ()),
            None => text.parse::<Reference>().map(|_| ()),
        };
        return match checked {
            Ok(()) => Ok(OutboxItem::Involvement(text.to_owned())),
            Err(e) => Err(OutboxError::Parse(format!(
                "incident_involvement {text:?} {e}"
            ))),
        };
    }
    envelope_from_outbox(name, bytes, sources).map(|e| OutboxItem::Envelope(Box::new(e)))
}

/// Parses and validates the contents `bytes` of outbox file `name` into an envelope.
pub(crate) fn envelope_from_outbox(
    name: &str,
    bytes: &[u8],
    sources: &impl OutboxSources,
) -> Result<Envelope, OutboxError> {
    let msg: OutboxMessage = serde_json::from_slice(bytes).map_err(|e| {
        let e = e.to_string();
        if e.contains("`incident_involvement`") {
            OutboxError::Parse(
                "an incident_involvement file holds nothing else: {\"incident_involvement\": \"REF\"}"
                    .into(),
            )
        } else {
            OutboxError::Parse(e)
        }
    })?;
    let parse = |what: &str, e: &dyn std::fmt::Display| OutboxError::Parse(format!("{what}: {e}"));
    let payloads = [
        msg.payload.is_some(),
        msg.payload_base64.is_some(),
        msg.payload_file.is_some(),
    ];
    if payloads.iter().filter(|p| **p).count() != 1 {
        return Err(OutboxError::Parse(
            "give exactly one of payload, payload_base64 and payload_file".into(),
        ));
    }
    let (payload, default_type) = if let Some(value) = &msg.payload {
        (minified(value.get()), "application/json")
    } else if let Some(b64) = &msg.payload_base64 {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| parse("payload_base64", &e))?;
        (bytes, "application/octet-stream")
    } else if let Some(file) = &msg.payload_file {
        (sources.read_file(file)?, "application/octet-stream")
    } else {
        return Err(OutboxError::Parse("no payload".into()));
    };
    let consent_token = match (&msg.consent_token, &msg.consent_token_file) {
        (Some(_), Some(_)) => {
            return Err(OutboxError::Parse(
                "give at most one of consent_token and consent_token_file".into(),
            ));
        }
        (Some(t), None) => Some(t.trim().to_owned()),
        (None, Some(file)) => {
            let bytes = sources.read_file(file)?;
            Some(String::from_utf8_lossy(&bytes).trim().to_owned())
        }
        (None, None) => None,
    };
    let mut consent_tokens: Vec<String> = msg
        .consent_tokens
        .iter()
        .map(|t| t.trim().to_owned())
        .collect();
    for file in &msg.consent_token_files {
        let bytes = sources.read_file(file)?;
        consent_tokens.push(String::from_utf8_lossy(&bytes).trim().to_owned());
    }
    let (significance_designation, significance_countersignature) = match &msg.designation_file {
        Some(file) => {
            let bytes = sources.read_file(file)?;
            designation_halves(&String::from_utf8_lossy(&bytes)).ok_or_else(|| {
                parse(
                    "designation_file",
                    &"must hold two lines, the designation and its countersignature",
                )
            })?
        }
        None => (String::new(), String::new()),
    };
    let fingerprint = hex_digest(bytes);
    let message_id = match &msg.message_id {
        Some(id) => id
            .parse::<MessageId>()
            .map_err(|e| parse("message_id", &e))?,
        None => sources.message_id(name, &fingerprint)?,
    };
    let workflow = msg
        .workflow
        .as_ref()
        .map(OutboxStep::to_wire)
        .transpose()
        .map_err(OutboxError::Parse)?;
    // Without a kind, a step's own: the envelope's check (kind matches step) then holds.
    let kind: Kind = match (&msg.kind, &workflow) {
        (Some(kind), _) => kind.parse().map_err(|e| parse("kind", &e))?,
        (None, Some(w)) => concordat_proto::workflow::Step::try_from(w)
            .map_err(|e| parse("envelope", &e))?
            .kind(),
        (None, None) => {
            return Err(OutboxError::Parse(
                "kind is missing (it may be left out only with a workflow step)".into(),
            ));
        }
    };
    let tlp: Tlp = msg
        .tlp
        .as_deref()
        .unwrap_or("amber")
        .parse()
        .map_err(|e| parse("tlp", &e))?;
    let wire = pb::Envelope {
        message_id: message_id.to_string(),
        recipients: msg.recipients,
        kind: pb::MessageKind::from(kind) as i32,
        organisation: msg.organisation.unwrap_or_default(),
        incident_ref: msg.incident_ref.unwrap_or_default(),
        content_type: msg.content_type.unwrap_or_else(|| default_type.into()),
        tlp: pb::Tlp::from(tlp) as i32,
        payload,
        consent_token: consent_token.unwrap_or_default(),
        consent_tokens,
        organisations: msg.organisations,
        significance_designation,
        significance_countersignature,
        workflow,
    };
    Envelope::try_from(wire).map_err(|e| parse("envelope", &e))
}

/// The components of `path`, a file an outbox message names: plain names only (no root, no
/// `.` or `..`), or what is wrong.
fn plain_components(path: &Path) -> Result<Vec<&OsStr>, &'static str> {
    if path.as_os_str().is_empty() {
        return Err("is empty");
    }
    path.components()
        .map(|c| match c {
            Component::Normal(name) => Ok(name),
            Component::RootDir | Component::Prefix(_) => Err("is absolute"),
            Component::ParentDir => Err("contains `..`"),
            Component::CurDir => Err("contains `.`"),
        })
        .collect()
}

/// Why an outbox entry of type `file_type` (not a directory) is not a regular file.
fn not_a_file(file_type: fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    if file_type.is_symlink() {
        "it is a symbolic link, which the agent does not follow: move the file itself into outbox/"
    } else if file_type.is_fifo() {
        "it is a FIFO, not a regular file"
    } else if file_type.is_socket() {
        "it is a socket, not a regular file"
    } else if file_type.is_block_device() || file_type.is_char_device() {
        "it is a device, not a regular file"
    } else {
        "it is not a regular file"
    }
}

/// Whether `name` in directory `dir` is a symbolic link (not followed).
fn is_symlink_at(dir: &std::os::fd::OwnedFd, name: &OsStr) -> bool {
    nix::sys::stat::fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
        .is_ok_and(|st| st.st_mode & nix::libc::S_IFMT == nix::libc::S_IFLNK)
}

/// Reads an open outbox, payload or token file (`shown` names it in errors): a regular file
/// only, never more than [`MAX_FILE_BYTES`] even if it grows meanwhile. A FIFO would block the
/// outbox loop and a device (`/dev/zero`) would fill memory.
fn read_whole(file: File, shown: &str) -> Result<Vec<u8>, OutboxError> {
    let read_error = |source| OutboxError::Read {
        path: shown.to_owned(),
        source,
    };
    let meta = file.metadata().map_err(read_error)?;
    if !meta.is_file() {
        return Err(OutboxError::NotAFile {
            path: shown.to_owned(),
        });
    }
    let too_large = || OutboxError::TooLarge {
        path: shown.to_owned(),
    };
    if meta.len() > MAX_FILE_BYTES {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large());
    }
    Ok(bytes)
}

/// The JSON text `json` (valid JSON, as serde_json has read it) without its insignificant
/// whitespace: its members, numbers and strings exactly as written, in their order. This is
/// what an inline payload is sent as: the agency's own JSON, a few bytes shorter, in one copy.
pub(crate) fn minified(json: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for &b in json.as_bytes() {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            out.push(b);
            in_string = b == b'"';
        }
    }
    out
}

/// The two halves of a designation file (written by `concordat significance countersign`):
/// exactly two non-empty lines, the designation and then its countersignature.
pub fn designation_halves(text: &str) -> Option<(String, String)> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let designation = lines.next()?.to_owned();
    let countersignature = lines.next()?.to_owned();
    lines
        .next()
        .is_none()
        .then_some((designation, countersignature))
}

/// An inbox file of a transfer, `inbox/<sender>.<message_id>.json`: the transfer as delivered
/// and the proof of its `transfer_accepted` entry. `payload_sha256` is always given.
///
/// A payload whose content type names JSON and which is valid JSON with nothing around it is
/// written as `payload`, byte for byte as it was received (`format` 2): never parsed into a
/// value and written back, which would lose digits of large numbers and repeated keys, and
/// would reindent a deeply nested payload into many times its size. Any other payload is
/// `payload_base64`. Files of earlier agents have no `format`, and their inline `payload` is
/// such a parsed view: no bytes in them hash to `payload_sha256`, so their payload cannot be
/// verified (their other fields can).
///
/// Every field but `content_type` (and `type`, `proof` and the payload's own fields) is
/// recorded by the entry, and `concordat receipt verify` holds each to it. `organisations`
/// and `consents` are absent from files written by earlier agents. A file with any other
/// field is not one the agent wrote, and is refused.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferFile<'a> {
    /// Always `transfer`.
    #[serde(rename = "type")]
    file_type: String,
    /// [`INBOX_FORMAT`] in files whose inline payload is the payload's bytes; absent in files
    /// of earlier agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    format: Option<u32>,
    transfer_id: String,
    message_id: String,
    sender: String,
    recipients: Vec<String>,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    organisation: String,
    /// Every organisation the transfer identifies, `organisation` first when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    organisations: Option<Vec<String>>,
    #[serde(default)]
    incident_ref: String,
    /// Not in the audit log, so not verified.
    #[serde(default)]
    content_type: String,
    #[serde(default)]
    tlp: String,
    #[serde(default)]
    consent_jti: String,
    #[serde(default)]
    consent_issuer: String,
    /// Every consent the transfer was made under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    consents: Option<Vec<ConsentFile>>,
    #[serde(default)]
    agreement_id: String,
    #[serde(default)]
    clause: String,
    #[serde(default)]
    accepted_at: String,
    payload_sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    workflow: Option<serde_json::Value>,
    #[serde(
        default,
        borrow,
        deserialize_with = "raw_payload",
        skip_serializing_if = "Option::is_none"
    )]
    payload: Option<&'a RawValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    payload_base64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    proof: Option<ProofFile>,
}

/// One consent a transfer was made under, in an inbox file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsentFile {
    organisation: String,
    jti: String,
    issuer: String,
}

/// An inbox file of a recall notice, `inbox/<sender>.<message_id>.recall.json`. Its
/// `revoked_at` is not in the `recall_queued` entry, so not verified.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecallFile {
    /// Always `recall_notice`.
    #[serde(rename = "type")]
    file_type: String,
    transfer_id: String,
    message_id: String,
    sender: String,
    #[serde(default)]
    organisation: String,
    #[serde(default)]
    consent_jti: String,
    #[serde(default)]
    consent_issuer: String,
    #[serde(default)]
    revoked_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    proof: Option<ProofFile>,
}

/// Why an inbox file names no proof.
const NO_PROOF: &str = "the inbox file holds no proof (written by an agent older than the \
                        proof field, or from a broker that sent none)";

/// The `format` of the inbox files this agent writes: the inline payload is the payload's bytes.
const INBOX_FORMAT: u32 = 2;

/// An inline payload as the file has it, byte for byte (`null` too, which `Option` alone would
/// read as no payload).
fn raw_payload<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

impl<'a> TransferFile<'a> {
    /// The file for transfer `t`, with its `proof`.
    fn of(t: &'a pb::Transfer, proof: Option<ProofFile>) -> TransferFile<'a> {
        // Validated, never parsed into a value: the raw value borrows the payload, and it is
        // used only if it is the payload whole (no whitespace around it), so the file holds
        // exactly the bytes whose SHA-256 the entry records.
        let inline = t
            .content_type
            .contains("json")
            .then(|| serde_json::from_slice::<&RawValue>(&t.payload).ok())
            .flatten()
            .filter(|raw| raw.get().as_bytes() == t.payload.as_slice());
        let payload_base64 = inline
            .is_none()
            .then(|| base64::engine::general_purpose::STANDARD.encode(&t.payload));
        TransferFile {
            file_type: "transfer".into(),
            format: Some(INBOX_FORMAT),
            transfer_id: t.transfer_id.clone(),
            message_id: t.message_id.clone(),
            sender: t.sender.clone(),
            recipients: t.recipients.clone(),
            kind: kind_name(t.kind),
            organisation: t.organisation.clone(),
            organisations: Some(t.organisations.clone()),
            incident_ref: t.incident_ref.clone(),
            content_type: t.content_type.clone(),
            tlp: tlp_name(t.tlp),
            consent_jti: t.consent_jti.clone(),
            consent_issuer: t.consent_issuer.clone(),
            consents: Some(
                t.consents
                    .iter()
                    .map(|c| ConsentFile {
                        organisation: c.organisation.clone(),
                        jti: c.jti.clone(),
                        issuer: c.issuer.clone(),
                    })
                    .collect(),
            ),
            agreement_id: t.agreement_id.clone(),
            clause: t.clause.clone(),
            accepted_at: rfc3339(t.accepted_at.as_ref()),
            payload_sha256: hex_digest(&t.payload),
            workflow: t
                .workflow
                .as_ref()
                .map(concordat_proto::audit::workflow_json),
            payload: inline,
            payload_base64,
            proof,
        }
    }

    /// What the file claims of the transfer, to hold against its entry: with `payload`, the
    /// payload's bytes as the file holds them, their digest and size; without, the digest the
    /// file records.
    fn claim(&self, payload: Option<&[u8]>) -> Result<crate::witness::TransferClaim, String> {
        let kind = self
            .kind
            .parse::<Kind>()
            .map(|k| pb::MessageKind::from(k) as i32)
            .or_else(|_| self.kind.parse::<i32>())
            .map_err(|_| format!("kind {:?} is not a message kind", self.kind))?;
        let tlp = self
            .tlp
            .parse::<Tlp>()
            .map(|t| pb::Tlp::from(t) as i32)
            .or_else(|_| self.tlp.parse::<i32>())
            .map_err(|_| format!("tlp {:?} is not a TLP marking", self.tlp))?;
        Ok(crate::witness::TransferClaim {
            transfer_id: self.transfer_id.clone(),
            message_id: self.message_id.clone(),
            sender: self.sender.clone(),
            recipients: self.recipients.clone(),
            kind,
            organisation: self.organisation.clone(),
            organisations: self.organisations.clone(),
            incident_ref: self.incident_ref.clone(),
            tlp,
            consent_jti: self.consent_jti.clone(),
            consent_issuer: self.consent_issuer.clone(),
            consents: self.consents.as_ref().map(|cs| {
                cs.iter()
                    .map(|c| pb::ConsentRef {
                        organisation: c.organisation.clone(),
                        jti: c.jti.clone(),
                        issuer: c.issuer.clone(),
                    })
                    .collect()
            }),
            agreement_id: self.agreement_id.clone(),
            clause: self.clause.clone(),
            accepted_at: crate::witness::ClaimedTime::Text(self.accepted_at.clone()),
            workflow: self.workflow.clone(),
            payload_sha256: match payload {
                Some(bytes) => Sha256::digest(bytes).to_vec(),
                None => sha256_of_hex(&self.payload_sha256)?,
            },
            payload_size: payload.map(|p| p.len() as u64),
            recipient: None,
        })
    }
}

impl RecallFile {
    fn of(n: &pb::RecallNotice, proof: Option<ProofFile>) -> RecallFile {
        RecallFile {
            file_type: "recall_notice".into(),
            transfer_id: n.transfer_id.clone(),
            message_id: n.message_id.clone(),
            sender: n.sender.clone(),
            organisation: n.organisation.clone(),
            consent_jti: n.consent_jti.clone(),
            consent_issuer: n.consent_issuer.clone(),
            revoked_at: rfc3339(n.revoked_at.as_ref()),
            proof,
        }
    }
}

/// A SHA-256 written as 64 hex digits.
fn sha256_of_hex(hex: &str) -> Result<Vec<u8>, String> {
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .filter(|d| d.len() == 32)
        .ok_or_else(|| "payload_sha256 is not 64 hex digits".to_owned())
}

/// Checks an inbox file offline (`concordat receipt verify`): its `proof` is signed by the log
/// key, its entry is the one the delivery was queued under and records every field of the file
/// that it can record as the file states it (for a transfer: all but `content_type`; for a
/// recall notice: all but `revoked_at`; a notice whole), and it is included in the
/// checkpoint's tree. The payload's bytes (inline or `payload_base64`) are hashed again; a file
/// of an earlier agent that inlined a parsed view of a JSON payload is refused, since nothing
/// in it is the payload (see `TransferFile`). `None` if the file is not an inbox file;
/// otherwise the verdict or what is wrong.
pub fn verify_inbox_file(
    text: &[u8],
    key: &concordat_proto::checkpoint::LogVerifier,
) -> Option<Result<String, String>> {
    /// The one field every inbox file has; the rest is read by type.
    #[derive(Deserialize)]
    struct Typed {
        #[serde(rename = "type")]
        file_type: String,
    }
    let typed: Typed = serde_json::from_slice(text).ok()?;
    Some(inbox_verdict(text, &typed.file_type, key))
}

fn inbox_verdict(
    text: &[u8],
    kind: &str,
    key: &concordat_proto::checkpoint::LogVerifier,
) -> Result<String, String> {
    let checked = |what: &str, wire: &pb::AuditProof, cp: &Checkpoint, tail: &str| {
        format!(
            "VERIFIED: {what} is entry {} of {} (checkpoint of size {}, root {}); {tail}",
            wire.log_index,
            cp.origin(),
            cp.size(),
            cp.root().to_hex()
        )
    };
    match kind {
        "transfer" => {
            // Read without a value tree: the inline payload stays a slice of `text`.
            let file: TransferFile<'_> = serde_json::from_slice(text)
                .map_err(|e| format!("the inbox file does not read as a transfer: {e}"))?;
            // The payload's bytes, when the file holds them; `None` for the parsed view that
            // files of earlier agents hold instead.
            let decoded;
            let payload: Option<&[u8]> = match (file.format, file.payload, &file.payload_base64) {
                (Some(INBOX_FORMAT) | None, None, Some(b64)) => {
                    decoded = base64::engine::general_purpose::STANDARD
                        .decode(b64.trim())
                        .map_err(|e| format!("payload_base64 is not base64: {e}"))?;
                    Some(&decoded)
                }
                (Some(INBOX_FORMAT), Some(raw), None) => Some(raw.get().as_bytes()),
                (None, Some(_), None) => None,
                (Some(INBOX_FORMAT) | None, _, _) => {
                    return Err("the inbox file must hold exactly one of payload and \
                                payload_base64"
                        .into());
                }
                (Some(other), _, _) => {
                    return Err(format!(
                        "inbox file format {other} is not one this version reads \
                         (it reads {INBOX_FORMAT} and files without a format)"
                    ));
                }
            };
            // The payload the file holds is what is held to the entry's digest; the file's own
            // `payload_sha256` must then be that digest too.
            let claim = crate::witness::DeliveryClaim::Transfer(Box::new(file.claim(payload)?));
            let wire = file.proof.as_ref().ok_or(NO_PROOF)?.to_wire()?;
            let cp = crate::witness::verify_delivery(key, &claim, &wire)?;
            let Some(payload) = payload else {
                return Err(format!(
                    "payload not verified: the other fields of the file are those of entry {} \
                     of {}, but the file was written by an agent earlier than inbox format \
                     {INBOX_FORMAT}, which kept a JSON payload as a value parsed and written \
                     again (large numbers and repeated keys may differ from what was received), \
                     so no bytes in it hash to payload_sha256",
                    wire.log_index,
                    cp.origin()
                ));
            };
            if hex_digest(payload) != file.payload_sha256 {
                return Err("payload_sha256 is not the SHA-256 of the file's payload".into());
            }
            Ok(checked(
                &format!(
                    "delivery of transfer {} from {}",
                    file.transfer_id, file.sender
                ),
                &wire,
                &cp,
                "every field is the entry's but content_type, which the audit log does not \
                 record (not verified)",
            ))
        }
        "recall_notice" => {
            let file: RecallFile = serde_json::from_slice(text)
                .map_err(|e| format!("the inbox file does not read as a recall notice: {e}"))?;
            let claim = crate::witness::DeliveryClaim::Recall {
                transfer_id: file.transfer_id.clone(),
                message_id: file.message_id.clone(),
                sender: file.sender.clone(),
                organisation: file.organisation.clone(),
                consent_jti: file.consent_jti.clone(),
                consent_issuer: file.consent_issuer.clone(),
            };
            let wire = file.proof.as_ref().ok_or(NO_PROOF)?.to_wire()?;
            let cp = crate::witness::verify_delivery(key, &claim, &wire)?;
            Ok(checked(
                &format!(
                    "recall notice for transfer {} from {}",
                    file.transfer_id, file.sender
                ),
                &wire,
                &cp,
                "every field is the entry's but revoked_at, which the recall's entry does not \
                 record (not verified)",
            ))
        }
        // A notice file holds the notice as JSON: it is the one its proof's entry holds if
        // that entry's notice reads the same, field for field.
        "notice" => {
            let v: serde_json::Value =
                serde_json::from_slice(text).map_err(|e| format!("the notice file: {e}"))?;
            let wire = proof_of(&v)?.to_wire()?;
            let entry = concordat_proto::audit::decode(&wire.entry)
                .map_err(|e| format!("the proof's entry: {e}"))?;
            let Some(pb::audit_entry::Event::NoticeQueued(q)) = entry.event else {
                return Err("the proof's entry is not a notice_queued entry".into());
            };
            let notice = q.notice.unwrap_or_default();
            // Every field of the file is the entry's notice's, as `notice_json` writes it, or
            // `type` and `proof`; a field the broker never wrote is not verified, so refused.
            let logged = concordat_proto::audit::notice_json(&notice);
            let (Some(logged), Some(fields)) = (logged.as_object(), v.as_object()) else {
                return Err("the notice file is not a JSON object".into());
            };
            let mut differ: Vec<String> = logged
                .iter()
                .filter(|(k, x)| fields.get(k.as_str()) != Some(x))
                .map(|(k, x)| {
                    let said = fields
                        .get(k.as_str())
                        .map_or("nothing".into(), |f| f.to_string());
                    format!("{k} (the file says {said}, the entry {x})")
                })
                .collect();
            differ.extend(
                fields
                    .keys()
                    .filter(|k| {
                        !logged.contains_key(k.as_str()) && !["type", "proof"].contains(&k.as_str())
                    })
                    .map(|k| format!("{k} (not a field of a notice)")),
            );
            if !differ.is_empty() {
                return Err(format!(
                    "the notice file does not read as the notice its audit entry holds: {}",
                    differ.join("; ")
                ));
            }
            let claim = crate::witness::DeliveryClaim::Notice(notice);
            let cp = crate::witness::verify_delivery(key, &claim, &wire)?;
            Ok(format!(
                "VERIFIED: notice {} is entry {} of {} (checkpoint of size {}, root {})",
                claim.transfer_id(),
                wire.log_index,
                cp.origin(),
                cp.size(),
                cp.root().to_hex()
            ))
        }
        other => Err(format!("an inbox file of unknown type {other:?}")),
    }
}

/// The `proof` of a notice file.
fn proof_of(v: &serde_json::Value) -> Result<ProofFile, String> {
    serde_json::from_value(v.get("proof").cloned().ok_or(NO_PROOF)?)
        .map_err(|e| format!("proof: {e}"))
}

/// Checks a receipt file (`sent/<name>.receipt.json`) offline (`concordat receipt verify`):
/// its proof is signed by the log key, its entry is this transfer's acceptance and records
/// every field of the file but `warnings` as the file states it (`transfer_id`, `message_id`,
/// `accepted_at`, `authorities`, `consent_jti`, `consent_issuer`, `log_index`:
/// [`crate::witness::ReceiptClaim`]), and it is included in the checkpoint's tree. The verdict,
/// or what is wrong.
pub fn verify_receipt_file(
    text: &[u8],
    key: &concordat_proto::checkpoint::LogVerifier,
) -> Result<String, String> {
    let receipt: ReceiptFile =
        serde_json::from_slice(text).map_err(|e| format!("not a receipt file: {e}"))?;
    let proof = receipt
        .proof
        .as_ref()
        .ok_or("holds no proof (written by an agent older than the proof field)")?;
    let wire = proof.to_wire()?;
    let claim = crate::witness::ReceiptClaim::of_file(&receipt);
    let cp = crate::witness::verify_receipt(key, &claim, &wire)?;
    Ok(format!(
        "VERIFIED: transfer {} (message {}) is entry {} of {} (checkpoint of size {}, root {}); \
         its time, authorities and consent are the entry's{}",
        receipt.transfer_id,
        receipt.message_id,
        wire.log_index,
        cp.origin(),
        cp.size(),
        cp.root().to_hex(),
        if receipt.warnings.is_empty() {
            ""
        } else {
            "; its warnings are the broker's advice, not in the audit log, and are not verified"
        }
    ))
}

fn hex_digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes `bytes` to `dir/name` atomically and durably: a temporary file, fsync, rename, fsync
/// of the directory.
///
/// If writing, syncing or renaming fails (a full disk, say), the temporary file is removed
/// before the error is returned: a failed write leaves nothing behind.
pub fn atomic_write(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let written = File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, dir.join(name))
    });
    if let Err(e) = written {
        // The write's error is the one to report. If the file cannot be removed either (or
        // was never created), `Spool::open` removes any leftover at the next start.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// Whether the sidecar at `path` (a receipt or a refusal's reason) records message id `id`.
/// Anything else there (another message's, a file named like a sidecar, one too large for a
/// sidecar) does not.
fn records_message_id(path: &Path, id: MessageId) -> bool {
    #[derive(Deserialize)]
    struct Recorded {
        message_id: String,
    }
    let mut bytes = Vec::new();
    let read = File::open(path).and_then(|f| f.take(1 << 20).read_to_end(&mut bytes));
    read.is_ok()
        && serde_json::from_slice::<Recorded>(&bytes)
            .is_ok_and(|r| r.message_id.parse::<MessageId>().is_ok_and(|m| m == id))
}

/// The name under which the outbox file `name` is filed in `dir`, beside its sidecar
/// `<name><suffix>`, overwriting nothing. It is `name` unless that or its sidecar is taken
/// (a sidecar alone that records message id `id` is the file's own, written before a crash
/// cut its move short, and does not count), else `<name>.<id>`, else `<name>.<random id>`. A
/// name longer than [`MAX_NAME_BYTES`] keeps its first [`KEPT_NAME_BYTES`] (at a character
/// boundary) and always takes an id.
fn free_name(dir: &Path, name: &str, suffix: &str, id: Option<MessageId>) -> String {
    let taken = |dest: &str| {
        let sidecar = dir.join(format!("{dest}{suffix}"));
        fs::symlink_metadata(dir.join(dest)).is_ok()
            || (fs::symlink_metadata(&sidecar).is_ok()
                && !id.is_some_and(|id| records_message_id(&sidecar, id)))
    };
    let mut end = name.len();
    if end > MAX_NAME_BYTES {
        end = KEPT_NAME_BYTES;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
    }
    let base = &name[..end];
    if base.len() == name.len() && !taken(name) {
        return name.to_owned();
    }
    let mut dest = match id {
        Some(id) => format!("{base}.{id}"),
        None => format!("{base}.{}", MessageId::new_random()),
    };
    while taken(&dest) {
        dest = format!("{base}.{}", MessageId::new_random());
    }
    dest
}

/// fsyncs a directory, so that a rename in it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn envelope_of(item: OutboxItem) -> Envelope {
        match item {
            OutboxItem::Envelope(e) => *e,
            OutboxItem::Involvement(r) => panic!("an involvement ({r}), not an envelope"),
        }
    }

    fn spool() -> (tempfile::TempDir, Spool) {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        (dir, spool)
    }

    #[test]
    fn pending_ignores_partial_files() {
        let (_d, s) = spool();
        for name in ["b.json", "a.json", ".hidden.json", "c.json.tmp"] {
            fs::write(s.dir("outbox").join(name), "{}").unwrap();
        }
        fs::create_dir(s.dir("outbox").join("sub")).unwrap();
        assert_eq!(s.pending().unwrap(), ["a.json", "b.json"]);
    }

    /// Outbox entries that can never be sent (a symbolic link, a FIFO, a name that is not
    /// UTF-8) are set aside into `failed/` once, each with its reason, rather than skipped in
    /// silence for ever; the link is not followed and the FIFO is not opened.
    #[test]
    fn unsendable_outbox_entries_are_set_aside_once() {
        use std::os::unix::{ffi::OsStrExt as _, fs::symlink};
        let (d, s) = spool();
        let target = d.path().join("target.json");
        fs::write(&target, "secret").unwrap();
        symlink(&target, s.dir("outbox").join("link.json")).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(s.dir("outbox").join("pipe.json"))
            .status()
            .unwrap();
        assert!(made.success());
        let raw = std::ffi::OsStr::from_bytes(b"caf\xe9.json");
        fs::write(s.dir("outbox").join(raw), "{}").unwrap();
        fs::write(s.dir("outbox").join("ok.json"), "{}").unwrap();
        let listed = |folder: &str| {
            let mut names: Vec<String> = fs::read_dir(s.dir(folder))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        for pass in 0..2 {
            assert_eq!(s.pending().unwrap(), ["ok.json"], "pass {pass}");
            assert_eq!(listed("outbox"), ["ok.json"], "pass {pass}");
            assert_eq!(
                listed("failed"),
                [
                    "caf\\xe9.json",
                    "caf\\xe9.json.error.txt",
                    "link.json",
                    "link.json.error.txt",
                    "pipe.json",
                    "pipe.json.error.txt",
                ],
                "pass {pass}"
            );
        }
        for (name, reason) in [
            ("caf\\xe9.json", "not UTF-8"),
            ("link.json", "symbolic link"),
            ("pipe.json", "FIFO"),
        ] {
            let text = fs::read_to_string(s.dir("failed").join(format!("{name}.error.txt")));
            let text = text.unwrap();
            assert!(text.contains(reason), "{name}: {text}");
        }
        // Moved as they are: the link still a link to the untouched file, the FIFO a FIFO.
        let link = s.dir("failed").join("link.json");
        assert!(
            fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(fs::read_to_string(&target).unwrap(), "secret");
        use std::os::unix::fs::FileTypeExt as _;
        let pipe = fs::symlink_metadata(s.dir("failed").join("pipe.json")).unwrap();
        assert!(pipe.file_type().is_fifo());
    }

    /// A payload or token file that is not a regular file (a FIFO that nobody writes, a
    /// device that never ends) is refused at once instead of blocking or filling memory.
    #[test]
    fn named_files_must_be_regular_files() {
        let (d, s) = spool();
        let fifo = d.path().join("pipe");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        fs::write(
            s.dir("outbox").join("m.json"),
            r#"{"recipients":["ico"],"kind":"threat_assessment","payload_file":"pipe"}"#,
        )
        .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let loader = s.clone();
        std::thread::spawn(move || tx.send(loader.load("m.json").map(|_| ())));
        let result = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("loading an outbox file that names a FIFO blocks");
        let err = result.expect_err("a FIFO is not a payload file");
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    /// Files an outbox message names are read only from inside the spool directory, by a
    /// relative path of plain names, never through a symbolic link: an outbox file must not be
    /// able to send the agent's own private key (or anything else it may read) to a recipient.
    #[test]
    fn named_files_stay_inside_the_spool() {
        use std::os::unix::fs::symlink;
        let d = tempfile::tempdir().unwrap();
        let secret = d.path().join("agent.key");
        fs::write(&secret, "PRIVATE KEY").unwrap();
        let s = Spool::open(&d.path().join("spool")).unwrap();
        fs::create_dir(s.dir("payloads")).unwrap();
        fs::write(s.dir("payloads").join("ok.txt"), "ok").unwrap();
        symlink(&secret, s.dir("link-out")).unwrap();
        symlink(d.path(), s.dir("dir-out")).unwrap();
        symlink("ok.txt", s.dir("payloads").join("link-in")).unwrap();
        let absolute = secret.display().to_string();
        // (the path named, the payload read or what the refusal says)
        let rows: [(&str, Result<&str, &str>); 9] = [
            ("payloads/ok.txt", Ok("ok")),
            ("payloads//ok.txt", Ok("ok")),
            (&absolute, Err("is absolute")),
            ("../agent.key", Err("contains `..`")),
            ("payloads/../../agent.key", Err("contains `..`")),
            ("./payloads/ok.txt", Err("contains `.`")),
            ("link-out", Err("is a symbolic link")),
            ("dir-out/agent.key", Err("is a symbolic link")),
            ("payloads/link-in", Err("is a symbolic link")),
        ];
        let fields = [
            "payload_file",
            "consent_token_file",
            "consent_token_files",
            "designation_file",
        ];
        for (i, (path, want)) in rows.into_iter().enumerate() {
            for field in fields {
                let mut file = serde_json::json!({"recipients": ["ico"],
                    "kind": "threat_assessment", "content_type": "text/plain"});
                if field != "payload_file" {
                    file["payload_base64"] = "cA==".into();
                }
                file[field] = if field == "consent_token_files" {
                    serde_json::json!([path])
                } else {
                    serde_json::json!(path)
                };
                let got = load_json(&s, &format!("{i}.{field}.json"), &file);
                match want {
                    Ok(text) => {
                        if field == "payload_file" {
                            assert_eq!(envelope_of(got.unwrap()).payload, text.as_bytes());
                        }
                    }
                    Err(why) => {
                        let err = got.expect_err(&format!("{field} {path:?} was read"));
                        assert!(
                            err.contains(why) && err.contains("inside the spool directory"),
                            "{field} {path:?}: {err}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn message_ids_are_chosen_once() {
        let (_d, s) = spool();
        fs::write(
            s.dir("outbox").join("m.json"),
            r#"{"recipients":["ico"],"kind":"threat_assessment","payload":{"x":1}}"#,
        )
        .unwrap();
        let first = envelope_of(s.load("m.json").unwrap());
        let again = envelope_of(s.load("m.json").unwrap());
        assert_eq!(first.message_id, again.message_id);
        assert_eq!(first.content_type, "application/json");
        assert_eq!(first.payload, br#"{"x":1}"#);
        assert_eq!(first.tlp, Tlp::Amber);
    }

    /// An inline JSON payload is sent as the agency wrote it, members in its order and numbers
    /// and strings as written, without the whitespace between tokens: read as raw text, never
    /// built into a tree (see `tests/outbox_memory.rs`).
    #[test]
    fn inline_payloads_are_sent_as_written_without_whitespace() {
        let (_d, s) = spool();
        let rows = [
            (r#"{"x":1}"#, r#"{"x":1}"#),
            (
                "{ \"b\" : 1 ,\n  \"a\" : [ 1.50 , 2e3 , -0 ] }",
                r#"{"b":1,"a":[1.50,2e3,-0]}"#,
            ),
            (
                r#"{"s": "a \" b \\", "t" : "x y\t\\\"z "}"#,
                r#"{"s":"a \" b \\","t":"x y\t\\\"z "}"#,
            ),
            (r#" "just a string " "#, r#""just a string ""#),
            (r#"[ ]"#, r#"[]"#),
        ];
        for (i, (written, sent)) in rows.into_iter().enumerate() {
            let file = format!(
                r#"{{"recipients":["ico"],"kind":"threat_assessment","payload":{written}}}"#
            );
            fs::write(s.dir("outbox").join(format!("{i}.json")), file).unwrap();
            let envelope = envelope_of(s.load(&format!("{i}.json")).unwrap());
            assert_eq!(
                String::from_utf8(envelope.payload).unwrap(),
                sent,
                "{written}"
            );
        }
    }

    /// `designation_file` names a file of two lines, which travel as the envelope's two
    /// designation halves; anything else sends the message to `failed/`.
    #[test]
    fn designation_files_hold_two_halves() {
        let (d, s) = spool();
        let message = r#"{"recipients":["ncsc"],"kind":"incident_record","payload":{},"designation_file":"d.txt"}"#;
        fs::write(s.dir("outbox").join("m.json"), message).unwrap();
        // (file contents, the halves read, or None: refused)
        let rows: [(&str, Option<(&str, &str)>); 5] = [
            (
                "v4.public.a\nv4.public.b\n",
                Some(("v4.public.a", "v4.public.b")),
            ),
            (
                "\n  v4.public.a  \r\n\nv4.public.b",
                Some(("v4.public.a", "v4.public.b")),
            ),
            ("v4.public.a\n", None),
            ("", None),
            ("v4.public.a\nv4.public.b\nv4.public.c\n", None),
        ];
        for (text, want) in rows {
            fs::write(d.path().join("d.txt"), text).unwrap();
            let got = s.load("m.json").map(envelope_of).map(|e| {
                e.significance
                    .map(|t| (t.designation, t.countersignature))
                    .unwrap()
            });
            match want {
                Some((a, b)) => {
                    let (x, y) = got.unwrap();
                    assert_eq!((x.as_str(), y.as_str()), (a, b), "{text:?}");
                }
                None => assert!(
                    got.unwrap_err().to_string().contains("designation_file"),
                    "{text:?}"
                ),
            }
        }
    }

    #[test]
    fn a_stale_id_record_is_not_reused_for_new_content() {
        let (_d, s) = spool();
        let first = s.message_id_for("m.json", "aaaa").unwrap();
        assert_eq!(s.message_id_for("m.json", "aaaa").unwrap(), first);
        assert_ne!(s.message_id_for("m.json", "bbbb").unwrap(), first);
    }

    #[test]
    fn leftover_temporary_files_are_removed_at_start() {
        let (d, s) = spool();
        fs::write(s.dir("inbox").join(".x.json.tmp"), "partial").unwrap();
        fs::write(s.dir("outbox").join(".agency.json.tmp"), "in progress").unwrap();
        let s = Spool::open(d.path()).unwrap();
        assert!(!s.dir("inbox").join(".x.json.tmp").exists());
        assert!(s.dir("outbox").join(".agency.json.tmp").exists());
    }

    #[test]
    fn malformed_files_explain_themselves() {
        let (_d, s) = spool();
        let cases = [
            ("not json", "not a valid outbox message"),
            (
                r#"{"recipients":["ico"],"kind":"threat_assessment"}"#,
                "exactly one of payload",
            ),
            (
                r#"{"recipients":["ico"],"kind":"gossip","payload":1}"#,
                "kind",
            ),
            (
                r#"{"recipients":["ico"],"kind":"threat_assessment","payload":1,"extra":2}"#,
                "unknown field",
            ),
            (
                r#"{"recipients":["I C O"],"kind":"threat_assessment","payload":1}"#,
                "recipients",
            ),
            (
                r#"{"recipients":["ico"],"kind":"threat_assessment","payload_base64":"!!"}"#,
                "payload_base64",
            ),
        ];
        for (i, (text, expected)) in cases.iter().enumerate() {
            let name = format!("{i}.json");
            fs::write(s.dir("outbox").join(&name), text).unwrap();
            let err = s.load(&name).unwrap_err().to_string();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }

    /// Loads `json` as outbox file `name` of spool `s`.
    fn load_json(s: &Spool, name: &str, json: &serde_json::Value) -> Result<OutboxItem, String> {
        fs::write(s.dir("outbox").join(name), json.to_string()).unwrap();
        s.load(name).map_err(|e| e.to_string())
    }

    #[test]
    fn outbox_files_carry_each_workflow_step() {
        use concordat_proto::workflow::{CommsAnswer, DsarAnswer, DsarOpen, Step};
        let (_d, s) = spool();
        let at = |t: &str| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).unwrap()
        };
        let transfer = "0b0f5a0e-7d3c-4f7e-9a55-1c2d3e4f5a6b";
        let rows = [
            (
                serde_json::json!({"dsar_open": {"reference": "DSAR-1", "concerns": [transfer],
                    "organisation": "acme-ltd", "respond_by": "2026-12-31"}}),
                None,
                Step::DsarOpen(DsarOpen {
                    reference: "DSAR-1".parse().unwrap(),
                    concerns: vec![transfer.parse().unwrap()],
                    organisation: Some("acme-ltd".parse().unwrap()),
                    respond_by: Some(at("2026-12-31T23:59:59Z")),
                }),
            ),
            (
                serde_json::json!({"dsar_open": {"reference": "DSAR-2"}}),
                Some("dsar_consultation"),
                Step::DsarOpen(DsarOpen {
                    reference: "DSAR-2".parse().unwrap(),
                    concerns: vec![],
                    organisation: None,
                    respond_by: None,
                }),
            ),
            (
                serde_json::json!({"dsar_answer": {"consultation_id": "nca:DSAR-1",
                    "no_objection": true}}),
                None,
                Step::DsarAnswer {
                    consultation: "nca:DSAR-1".parse().unwrap(),
                    answer: DsarAnswer::NoObjection,
                },
            ),
            (
                serde_json::json!({"dsar_answer": {"consultation_id": "nca:DSAR-1",
                    "objection": "Schedule 2"}}),
                None,
                Step::DsarAnswer {
                    consultation: "nca:DSAR-1".parse().unwrap(),
                    answer: DsarAnswer::Objection("Schedule 2".into()),
                },
            ),
            (
                serde_json::json!({"dsar_answer": {"consultation_id": "nca:DSAR-1",
                    "need_more_time": "2027-01-15T12:00:00+01:00"}}),
                None,
                Step::DsarAnswer {
                    consultation: "nca:DSAR-1".parse().unwrap(),
                    answer: DsarAnswer::NeedMoreTime(at("2027-01-15T11:00:00Z")),
                },
            ),
            (
                serde_json::json!({"dsar_close": {"consultation_id": "nca:DSAR-1"}}),
                None,
                Step::DsarClose {
                    consultation: "nca:DSAR-1".parse().unwrap(),
                },
            ),
            (
                serde_json::json!({"comms_propose": {"reference": "press-1",
                    "publish_after": "2026-12-05"}}),
                None,
                Step::CommsPropose {
                    reference: "press-1".parse().unwrap(),
                    publish_after: at("2026-12-05T00:00:00Z"),
                },
            ),
            (
                serde_json::json!({"comms_answer": {"statement_id": "ico:press-1",
                    "approve": true}}),
                Some("public_communication"),
                Step::CommsAnswer {
                    statement: "ico:press-1".parse().unwrap(),
                    answer: CommsAnswer::Approve,
                },
            ),
            (
                serde_json::json!({"comms_answer": {"statement_id": "ico:press-1",
                    "objection": "names a victim"}}),
                None,
                Step::CommsAnswer {
                    statement: "ico:press-1".parse().unwrap(),
                    answer: CommsAnswer::Objection("names a victim".into()),
                },
            ),
        ];
        for (i, (workflow, kind, expected)) in rows.into_iter().enumerate() {
            let mut file = serde_json::json!({"recipients": ["ico"], "payload": {"n": i},
                "workflow": workflow});
            if let Some(kind) = kind {
                file["kind"] = kind.into();
            }
            let item = load_json(&s, &format!("{i}.json"), &file).unwrap();
            let OutboxItem::Envelope(envelope) = item else {
                panic!("{file}: not an envelope: {item:?}");
            };
            assert_eq!(envelope.kind, expected.kind(), "{file}");
            assert_eq!(envelope.workflow, Some(expected), "{file}");
        }
    }

    #[test]
    fn malformed_workflow_steps_explain_themselves() {
        let (_d, s) = spool();
        let rows = [
            (
                serde_json::json!({"dsar_answer": {"consultation_id": "nca:D", "no_objection": true,
                    "objection": "x"}}),
                "give exactly one of",
            ),
            (
                serde_json::json!({"dsar_answer": {"consultation_id": "nca:D",
                    "no_objection": false}}),
                "give exactly one of",
            ),
            (
                serde_json::json!({"dsar_answer": {"consultation_id": "nca:D"}}),
                "give exactly one of",
            ),
            (
                serde_json::json!({"comms_answer": {"statement_id": "ico:p"}}),
                "give exactly one of",
            ),
            (
                serde_json::json!({"dsar_open": {"reference": "D", "respond_by": "soon"}}),
                "workflow.dsar_open.respond_by",
            ),
            (
                serde_json::json!({"comms_propose": {"reference": "p",
                    "publish_after": "31/12/2026"}}),
                "workflow.comms_propose.publish_after",
            ),
            (
                serde_json::json!({"comms_propose": {"reference": "p"}}),
                "missing field `publish_after`",
            ),
            (
                serde_json::json!({"dsar_close": {"consultation_id": "no-agency"}}),
                "consultation_id",
            ),
            (
                serde_json::json!({"dsar_open": {"reference": "has space"}}),
                "reference",
            ),
            (
                serde_json::json!({"dsar_open": {"reference": "D", "concerns": ["not-a-uuid"]}}),
                "concerns",
            ),
            (
                serde_json::json!({"dsar_close": {"consultation_id": "nca:D", "extra": 1}}),
                "unknown field `extra`",
            ),
            (serde_json::json!({"dsar_reopen": {}}), "unknown variant"),
            (
                serde_json::json!({"dsar_close": {"consultation_id": "nca:D"},
                    "dsar_open": {"reference": "D"}}),
                "not a valid outbox message",
            ),
        ];
        for (i, (workflow, expected)) in rows.into_iter().enumerate() {
            let file =
                serde_json::json!({"recipients": ["ico"], "payload": {}, "workflow": workflow});
            let err = load_json(&s, &format!("{i}.json"), &file).unwrap_err();
            assert!(err.contains(expected), "{file}: {err}");
        }
        // A kind that is not the step's, and no kind without a step.
        let err = load_json(
            &s,
            "kind.json",
            &serde_json::json!({"recipients": ["ico"], "payload": {}, "kind": "threat_assessment",
                "workflow": {"dsar_close": {"consultation_id": "nca:D"}}}),
        )
        .unwrap_err();
        assert!(err.contains("must be dsar_consultation"), "{err}");
        let err = load_json(
            &s,
            "nokind.json",
            &serde_json::json!({"recipients": ["ico"], "payload": {}}),
        )
        .unwrap_err();
        assert!(err.contains("kind is missing"), "{err}");
    }

    #[test]
    fn involvement_files_hold_one_incident_reference() {
        let (_d, s) = spool();
        let rows: [(serde_json::Value, Result<&str, &str>); 6] = [
            (
                serde_json::json!({"incident_involvement": "ico:INC-2026-0042"}),
                Ok("ico:INC-2026-0042"),
            ),
            (
                serde_json::json!({"incident_involvement": " INC-7 "}),
                Ok("INC-7"),
            ),
            (
                serde_json::json!({"incident_involvement": "has space"}),
                Err("incident_involvement"),
            ),
            (
                serde_json::json!({"incident_involvement": "a:b:c"}),
                Err("incident_involvement"),
            ),
            (
                serde_json::json!({"incident_involvement": "INC-7", "recipients": ["ico"]}),
                Err("holds nothing else"),
            ),
            (
                serde_json::json!({"incident_involvement": 7}),
                Err("holds nothing else"),
            ),
        ];
        for (i, (file, expected)) in rows.into_iter().enumerate() {
            let got = load_json(&s, &format!("{i}.json"), &file);
            match expected {
                Ok(r) => assert_eq!(got, Ok(OutboxItem::Involvement(r.into())), "{file}"),
                Err(e) => {
                    let err = got.unwrap_err();
                    assert!(err.contains(e), "{file}: {err}");
                }
            }
        }
        // The answer lands beside the file in sent/.
        let answer = pb::InvolveResponse {
            incident_ref: "ico:INC-2026-0042".into(),
            notified: vec!["nca".into()],
            duplicate: false,
        };
        let path = s.complete_involved("0.json", &answer, None).unwrap();
        assert_eq!(path, s.dir("sent").join("0.json"));
        let written: InvolvementAnswerFile = serde_json::from_slice(
            &fs::read(s.dir("sent").join("0.json.involvement.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(written.notified, ["nca"]);
        assert_eq!(written.incident_ref, "ico:INC-2026-0042");
    }

    #[test]
    fn completion_moves_the_file_with_its_sidecar() {
        let (_d, s) = spool();
        fs::write(s.dir("outbox").join("m.json"), "x").unwrap();
        let id = s.message_id_for("m.json", "x").unwrap();
        let path = s
            .complete_refused("m.json", id, "NO_AGREEMENT", "no", None)
            .unwrap();
        assert_eq!(path, s.dir("refused").join("m.json"));
        assert!(!s.dir("outbox").join("m.json").exists());
        assert!(!s.dir(".state/ids").join("m.json").exists());
        let reason: ReasonFile =
            serde_json::from_slice(&fs::read(s.dir("refused").join("m.json.reason.json")).unwrap())
                .unwrap();
        assert_eq!(reason.reason, "NO_AGREEMENT");
        // The same name again does not overwrite the first.
        fs::write(s.dir("outbox").join("m.json"), "y").unwrap();
        let second = s
            .complete_refused("m.json", id, "NO_AGREEMENT", "no", None)
            .unwrap();
        assert_ne!(second, path);
        assert_eq!(fs::read(&path).unwrap(), b"x");
    }

    /// A file of `name` in the outbox with `text`, written as the README asks (to a temporary
    /// name, then renamed into place).
    fn put(s: &Spool, name: &str, text: &str) {
        fs::write(s.dir("outbox").join(".put.tmp"), text).unwrap();
        fs::rename(s.dir("outbox").join(".put.tmp"), s.dir("outbox").join(name)).unwrap();
    }

    fn assessment_text(message_id: MessageId) -> String {
        serde_json::json!({
            "message_id": message_id.to_string(),
            "recipients": ["ico"],
            "kind": "threat_assessment",
            "payload": {"summary": "x"},
        })
        .to_string()
    }

    /// Every file and sidecar in `folder`, with their contents.
    fn filed(s: &Spool, folder: &str) -> Vec<(String, String)> {
        let mut all: Vec<(String, String)> = fs::read_dir(s.dir(folder))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let name = e.file_name().into_string().unwrap();
                (name, fs::read_to_string(e.path()).unwrap())
            })
            .collect();
        all.sort();
        all
    }

    #[test]
    fn completion_never_overwrites_an_earlier_file() {
        let (_d, s) = spool();
        // The same name and message id, refused three times (the id reused with new
        // contents): each file is kept.
        let id = MessageId::new_random();
        for text in ["one", "two", "three"] {
            put(&s, "d.json", text);
            s.complete_refused("d.json", id, "MESSAGE_ID_REUSED", "reused", None)
                .unwrap();
        }
        let kept: Vec<String> = filed(&s, "refused")
            .into_iter()
            .filter(|(name, _)| !name.ends_with(".reason.json"))
            .map(|(_, text)| text)
            .collect();
        assert_eq!(kept.len(), 3, "{kept:?}");
        for text in ["one", "two", "three"] {
            assert!(kept.iter().any(|k| k == text), "{text} lost: {kept:?}");
        }
        // A file named like another's sidecar, then that other: neither overwrites the other.
        let receipt = |id: MessageId| pb::Receipt {
            transfer_id: uuid::Uuid::new_v4().to_string(),
            message_id: id.to_string(),
            ..Default::default()
        };
        put(&s, "c.json.receipt.json", "the first message");
        s.complete_sent(
            "c.json.receipt.json",
            &receipt(MessageId::new_random()),
            None,
        )
        .unwrap();
        put(&s, "c.json", "the second message");
        s.complete_sent("c.json", &receipt(MessageId::new_random()), None)
            .unwrap();
        let sent = filed(&s, "sent");
        assert!(
            sent.iter().any(|(_, text)| text == "the first message"),
            "{sent:?}"
        );
        assert!(
            sent.iter().any(|(_, text)| text == "the second message"),
            "{sent:?}"
        );
        assert_eq!(sent.len(), 4, "{sent:?}");
    }

    /// A crash between writing the sidecar and moving the file leaves the sidecar alone in
    /// `sent/`; the file, sent again under its id, is filed beside it under its own name.
    #[test]
    fn a_file_sent_again_after_a_crash_is_filed_beside_its_own_sidecar() {
        let (_d, s) = spool();
        let id = MessageId::new_random();
        let receipt = pb::Receipt {
            transfer_id: uuid::Uuid::new_v4().to_string(),
            message_id: id.to_string(),
            ..Default::default()
        };
        let json = serde_json::to_vec(&serde_json::json!({"message_id": id.to_string()})).unwrap();
        atomic_write(&s.dir("sent"), "m.json.receipt.json", &json).unwrap();
        put(&s, "m.json", "x");
        let path = s.complete_sent("m.json", &receipt, None).unwrap();
        assert_eq!(path, s.dir("sent").join("m.json"));
        assert_eq!(filed(&s, "sent").len(), 2);
    }

    #[test]
    fn a_file_removed_while_it_is_sent_is_filed_without_it() {
        let (_d, s) = spool();
        put(&s, "m.json", &assessment_text(MessageId::new_random()));
        let (item, read) = s.load_file("m.json").unwrap();
        let id = envelope_of(item).message_id;
        fs::remove_file(s.dir("outbox").join("m.json")).unwrap();
        let path = s
            .complete_refused("m.json", id, "NO_AGREEMENT", "no", Some(read))
            .unwrap();
        assert_eq!(path, s.dir("refused").join("m.json"));
        assert!(s.dir("refused").join("m.json.reason.json").exists());
        assert!(!path.exists());
    }

    #[test]
    fn a_file_replaced_while_it_is_sent_stays_to_be_sent() {
        let (_d, s) = spool();
        let first = serde_json::json!({
            "recipients": ["ico"], "kind": "threat_assessment", "payload": {"v": 1},
        });
        put(&s, "r.json", &first.to_string());
        let (item, read) = s.load_file("r.json").unwrap();
        let sent_id = envelope_of(item).message_id;
        // Corrected while in flight, written and renamed into place.
        let corrected = serde_json::json!({
            "recipients": ["ico"], "kind": "threat_assessment", "payload": {"v": 2},
        })
        .to_string();
        put(&s, "r.json", &corrected);
        let receipt = pb::Receipt {
            transfer_id: uuid::Uuid::new_v4().to_string(),
            message_id: sent_id.to_string(),
            ..Default::default()
        };
        s.complete_sent("r.json", &receipt, Some(read)).unwrap();
        // The corrected file waits in the outbox, to go as a new message.
        assert_eq!(
            fs::read_to_string(s.dir("outbox").join("r.json")).unwrap(),
            corrected
        );
        assert_eq!(s.pending().unwrap(), ["r.json"]);
        let again = envelope_of(s.load("r.json").unwrap());
        assert_ne!(again.message_id, sent_id);
        // The receipt is filed; no file in sent/ claims the corrected contents.
        let sent = filed(&s, "sent");
        assert!(sent.iter().all(|(_, text)| *text != corrected), "{sent:?}");
        assert!(
            sent.iter().any(|(name, _)| name.ends_with(".receipt.json")),
            "{sent:?}"
        );
    }

    #[test]
    fn a_name_too_long_to_file_is_failed_under_a_shorter_one() {
        let (_d, s) = spool();
        for len in [MAX_NAME_BYTES + 1, 230, 250] {
            let name = format!("{}.json", "é".repeat((len - 5) / 2));
            put(&s, &name, &assessment_text(MessageId::new_random()));
            let e = s.load(&name).unwrap_err();
            assert!(matches!(e, OutboxError::NameTooLong(_)), "{e}");
            let path = s.complete_failed(&name, &e.to_string()).unwrap();
            assert!(path.exists());
            assert!(path.file_name().unwrap().len() < 200, "{}", path.display());
            assert!(s.pending().unwrap().is_empty());
        }
    }

    fn transfer(sender: &str, id: &str, payload: &[u8]) -> pb::Delivery {
        pb::Delivery {
            delivery_id: "7".into(),
            body: Some(pb::delivery::Body::Transfer(pb::Transfer {
                sender: sender.into(),
                message_id: id.into(),
                content_type: "application/json".into(),
                payload: payload.to_vec(),
                ..Default::default()
            })),
            audit: None,
        }
    }

    fn recall(sender: &str, id: &str) -> pb::Delivery {
        pb::Delivery {
            delivery_id: "9".into(),
            body: Some(pb::delivery::Body::RecallNotice(pb::RecallNotice {
                sender: sender.into(),
                message_id: id.into(),
                ..Default::default()
            })),
            audit: None,
        }
    }

    #[test]
    fn deliveries_are_written_once() {
        let (_d, s) = spool();
        let id = MessageId::new_random();
        let delivery = transfer("ncsc", &id.to_string(), br#"{"a":1}"#);
        let first = s.deliver(&delivery).unwrap();
        assert_eq!(
            first,
            Delivered::Written(s.dir("inbox").join(format!("ncsc.{id}.json")))
        );
        let again = s.deliver(&delivery).unwrap();
        assert_eq!(again, Delivered::AlreadyPresent(first.path().to_path_buf()));
        let v: serde_json::Value =
            serde_json::from_slice(&fs::read(first.path()).unwrap()).unwrap();
        assert_eq!(v["payload"]["a"], 1);
        assert_eq!(v["sender"], "ncsc");
        let notice = s.deliver(&recall("ncsc", &id.to_string())).unwrap();
        assert_eq!(
            notice,
            Delivered::Written(s.dir("inbox").join(format!("ncsc.{id}.recall.json")))
        );
        assert!(matches!(
            s.deliver(&recall("ncsc", &id.to_string())).unwrap(),
            Delivered::AlreadyPresent(_)
        ));
    }

    #[test]
    fn hostile_names_are_refused() {
        let (_d, s) = spool();
        let id = MessageId::new_random().to_string();
        for delivery in [
            transfer("ncsc", "../../etc/passwd", b"{}"),
            transfer("../ncsc", &id, b"{}"),
            transfer("", &id, b"{}"),
            transfer("nc.sc", &id, b"{}"),
            recall("ncsc", "not-a-uuid"),
            recall("NCSC/..", &id),
            pb::Delivery::default(),
        ] {
            assert!(
                matches!(s.deliver(&delivery), Err(DeliveryError::Invalid(_))),
                "{delivery:?}"
            );
        }
        assert_eq!(fs::read_dir(s.dir("inbox")).unwrap().count(), 0);
    }

    /// Two agencies may use the same message id (the broker scopes ids per sender): neither
    /// delivery is taken for the other.
    #[test]
    fn the_same_message_id_from_two_senders_lands_twice() {
        let (_d, s) = spool();
        let id = MessageId::new_random().to_string();
        let ncsc = s
            .deliver(&transfer("ncsc", &id, br#"{"from":"ncsc"}"#))
            .unwrap();
        let nca = s
            .deliver(&transfer("nca", &id, br#"{"from":"nca"}"#))
            .unwrap();
        assert!(matches!(ncsc, Delivered::Written(_)));
        assert!(matches!(nca, Delivered::Written(_)));
        assert_ne!(ncsc.path(), nca.path());
        for (delivered, from) in [(&ncsc, "ncsc"), (&nca, "nca")] {
            let v: serde_json::Value =
                serde_json::from_slice(&fs::read(delivered.path()).unwrap()).unwrap();
            assert_eq!(
                (v["sender"].as_str(), v["payload"]["from"].as_str()),
                (Some(from), Some(from))
            );
        }
        let r1 = s.deliver(&recall("ncsc", &id)).unwrap();
        let r2 = s.deliver(&recall("nca", &id)).unwrap();
        assert!(matches!(r1, Delivered::Written(_)) && matches!(r2, Delivered::Written(_)));
        assert_eq!(fs::read_dir(s.dir("inbox")).unwrap().count(), 4);
    }

    /// A transfer made under two consents is recalled twice, once per consent withdrawn: both
    /// notices land (before, the second was taken for the first, acknowledged and lost), and
    /// each is written once.
    #[test]
    fn each_consent_withdrawn_gets_its_own_recall_notice() {
        let (_d, s) = spool();
        let id = MessageId::new_random().to_string();
        let notice = |org: &str, jti: &str| {
            let mut d = recall("ncsc", &id);
            if let Some(pb::delivery::Body::RecallNotice(n)) = &mut d.body {
                n.organisation = org.into();
                n.consent_jti = jti.into();
                n.consent_issuer = "k4.pid.issuer".into();
            }
            d
        };
        let acme = notice("acme-ltd", "jti-acme");
        let globex = notice("globex-plc", "jti-globex");
        let first = s.deliver(&acme).unwrap();
        let second = s.deliver(&globex).unwrap();
        let (Delivered::Written(a), Delivered::Written(g)) = (&first, &second) else {
            panic!("{first:?} {second:?}");
        };
        assert_ne!(a, g);
        for (path, org) in [(a, "acme-ltd"), (g, "globex-plc")] {
            let v: serde_json::Value = serde_json::from_slice(&fs::read(path).unwrap()).unwrap();
            assert_eq!(v["organisation"], org);
        }
        assert_eq!(
            s.deliver(&acme).unwrap(),
            Delivered::AlreadyPresent(a.clone())
        );
        assert_eq!(
            s.deliver(&globex).unwrap(),
            Delivered::AlreadyPresent(g.clone())
        );
    }

    /// An inbox written by an earlier agent names files by message id alone. Such a file is this
    /// delivery only if it records the same sender; otherwise the delivery is written.
    #[test]
    fn old_style_inbox_files_count_only_for_their_own_sender() {
        let id = MessageId::new_random().to_string();
        let old_transfer = format!("{id}.json");
        let old_recall = format!("{id}.recall.json");
        let recorded = |sender: &str| format!(r#"{{"type":"transfer","sender":"{sender}"}}"#);
        // (old file name, its content, the delivery, written again?)
        let cases: [(&str, String, pb::Delivery, bool); 7] = [
            (
                &old_transfer,
                recorded("ncsc"),
                transfer("ncsc", &id, b"{}"),
                false,
            ),
            (
                &old_transfer,
                recorded("nca"),
                transfer("ncsc", &id, b"{}"),
                true,
            ),
            (
                &old_transfer,
                "not json".into(),
                transfer("ncsc", &id, b"{}"),
                true,
            ),
            (
                &old_transfer,
                r#"{"no":"sender"}"#.into(),
                transfer("ncsc", &id, b"{}"),
                true,
            ),
            (&old_recall, recorded("ncsc"), recall("ncsc", &id), false),
            (&old_recall, recorded("nca"), recall("ncsc", &id), true),
            // An old transfer file is not the recall notice of the same message.
            (&old_transfer, recorded("ncsc"), recall("ncsc", &id), true),
        ];
        for (i, (old_name, content, delivery, written)) in cases.into_iter().enumerate() {
            let (_d, s) = spool();
            let old = s.dir("inbox").join(old_name);
            fs::write(&old, &content).unwrap();
            let outcome = s.deliver(&delivery).unwrap();
            if written {
                assert!(
                    matches!(&outcome, Delivered::Written(p) if p.file_name().unwrap().to_string_lossy().starts_with("ncsc.")),
                    "case {i}: {outcome:?}"
                );
            } else {
                assert_eq!(outcome, Delivered::AlreadyPresent(old.clone()), "case {i}");
            }
            // The old file is never touched.
            assert_eq!(fs::read_to_string(&old).unwrap(), content, "case {i}");
        }
    }

    /// A write that fails leaves no temporary file behind (and the target does not appear).
    #[test]
    fn a_failed_atomic_write_removes_its_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        // The rename cannot replace a non-empty directory: the write fails after the
        // temporary file was written and synced.
        fs::create_dir_all(dir.path().join("taken").join("inside")).unwrap();
        let err = atomic_write(dir.path(), "taken", b"data").unwrap_err();
        assert_ne!(err.kind(), io::ErrorKind::NotFound, "{err}");
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["taken"]);
        assert!(dir.path().join("taken").is_dir());
    }

    /// `payload` delivered to ico as the transfer [`crate::witness::test_log::transfer`] with
    /// its proof: the inbox file's bytes and the log key.
    fn delivered(
        s: &Spool,
        payload: &[u8],
        content_type: &str,
    ) -> (Vec<u8>, concordat_proto::checkpoint::LogVerifier) {
        let (t, entry) = crate::witness::test_log::transfer(payload, content_type);
        let (key, proof) = crate::witness::test_log::prove(&entry);
        let delivery = pb::Delivery {
            delivery_id: "1".into(),
            body: Some(pb::delivery::Body::Transfer(t)),
            audit: Some(proof),
        };
        let path = s.deliver(&delivery).unwrap();
        (fs::read(path.path()).unwrap(), key)
    }

    /// An inbox file verifies only while every field the transfer's entry records is the
    /// entry's; a field it does not record (`content_type`) is said not to be verified, and a
    /// field no inbox file has is refused.
    #[test]
    fn an_edited_inbox_file_does_not_verify() {
        let (_d, s) = spool();
        let (bytes, key) = delivered(&s, br#"{"a":1}"#, "application/json");
        let verdict = verify_inbox_file(&bytes, &key).unwrap().unwrap();
        assert!(verdict.starts_with("VERIFIED"), "{verdict}");
        assert!(verdict.contains("content_type"), "{verdict}");
        let file: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let rows: [(&str, serde_json::Value); 13] = [
            ("tlp", "clear".into()),
            ("kind", "threat_assessment".into()),
            ("organisation", "someone-else".into()),
            ("organisation", "".into()),
            ("consent_jti", "forged-jti".into()),
            ("consent_issuer", "".into()),
            ("incident_ref", "nca:OTHER".into()),
            ("agreement_id", "other-mou".into()),
            ("clause", "9.9".into()),
            ("accepted_at", "2027-01-01T00:00:00Z".into()),
            ("recipients", serde_json::json!(["ico", "nca"])),
            ("sender", "nca".into()),
            ("approved_by", "the minister".into()),
        ];
        for (field, value) in rows {
            let mut forged = file.clone();
            forged[field] = value;
            let forged = serde_json::to_vec(&forged).unwrap();
            let err = verify_inbox_file(&forged, &key)
                .unwrap()
                .expect_err(&format!("an inbox file with another {field} verified"));
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    /// A receipt file verifies only while its authorities, acceptance time, consent and log
    /// index are its entry's. Its warnings are not in the log: the verdict says they are not
    /// verified, and a receipt without them still verifies.
    #[test]
    fn a_receipt_file_with_forged_fields_does_not_verify() {
        let (_d, s) = spool();
        let (t, entry) = crate::witness::test_log::transfer(b"{}", "application/json");
        let (key, proof) = crate::witness::test_log::prove(&entry);
        let receipt = pb::Receipt {
            transfer_id: t.transfer_id.clone(),
            message_id: t.message_id.clone(),
            accepted_at: t.accepted_at,
            authorities: vec![pb::Authority {
                recipient: "ico".into(),
                agreement_id: t.agreement_id.clone(),
                clause: t.clause.clone(),
            }],
            consent_jti: t.consent_jti.clone(),
            consent_issuer: t.consent_issuer.clone(),
            duplicate: false,
            audit: Some(proof),
            consents: t.consents.clone(),
            warnings: vec!["agreement ico-ncsc-2024 is due for review".into()],
        };
        fs::write(s.dir("outbox").join("a.json"), "{}").unwrap();
        s.complete_sent("a.json", &receipt, None).unwrap();
        let bytes = fs::read(s.dir("sent").join("a.json.receipt.json")).unwrap();
        let verdict = verify_receipt_file(&bytes, &key).unwrap();
        assert!(verdict.starts_with("VERIFIED"), "{verdict}");
        assert!(
            verdict.contains("warnings") && verdict.contains("not verified"),
            "{verdict}"
        );
        let file: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        type Forge = fn(&mut serde_json::Value);
        let rows: [(&str, Forge); 9] = [
            ("agreement_id", |f| {
                f["authorities"][0]["agreement_id"] = "other-mou".into()
            }),
            ("clause", |f| f["authorities"][0]["clause"] = "9.9".into()),
            ("recipient", |f| {
                f["authorities"][0]["recipient"] = "nca".into()
            }),
            ("authorities", |f| f["authorities"] = serde_json::json!([])),
            ("accepted_at", |f| {
                f["accepted_at"] = "2027-01-01T00:00:00Z".into()
            }),
            ("consent_jti", |f| f["consent_jti"] = "forged-jti".into()),
            ("consent_issuer", |f| {
                f["consent_issuer"] = "k4.pid.other".into()
            }),
            ("log_index", |f| f["log_index"] = 7.into()),
            ("transfer_id", |f| f["transfer_id"] = "other".into()),
        ];
        for (field, forge) in rows {
            let mut forged = file.clone();
            forge(&mut forged);
            let forged = serde_json::to_vec_pretty(&forged).unwrap();
            let err = verify_receipt_file(&forged, &key)
                .expect_err(&format!("a receipt with another {field} verified"));
            assert!(err.contains(field), "{field}: {err}");
        }
        // Warnings are not bound: emptied, the receipt still verifies, and says nothing of them.
        let mut quiet = file.clone();
        quiet.as_object_mut().unwrap().remove("warnings").unwrap();
        let verdict = verify_receipt_file(&serde_json::to_vec(&quiet).unwrap(), &key).unwrap();
        assert!(verdict.starts_with("VERIFIED"), "{verdict}");
        assert!(!verdict.contains("warnings"), "{verdict}");
    }
    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    /// A JSON payload is kept in the inbox file as the exact bytes received: a number beyond
    /// 64 bits keeps its digits and a repeated key stays, and the file verifies by hashing
    /// those bytes, so that an edit of the payload is caught.
    #[test]
    fn an_inbox_file_keeps_the_exact_bytes_of_a_json_payload() {
        let payload = br#"{"n":123456789012345678901234567890,"a":1,"a":2}"#;
        let (_d, s) = spool();
        let (bytes, key) = delivered(&s, payload, "application/json");
        assert!(
            contains(&bytes, payload),
            "{}",
            String::from_utf8_lossy(&bytes)
        );
        let verdict = verify_inbox_file(&bytes, &key).unwrap().unwrap();
        assert!(verdict.starts_with("VERIFIED"), "{verdict}");
        let edited = String::from_utf8(bytes).unwrap().replace(
            "123456789012345678901234567890",
            "123456789012345678901234567891",
        );
        let err = verify_inbox_file(edited.as_bytes(), &key)
            .unwrap()
            .unwrap_err();
        assert!(err.contains("payload"), "{err}");
        // JSON with whitespace around it is kept exactly too (as base64: an inline value
        // would lose the whitespace).
        let (_d, s) = spool();
        let (bytes, key) = delivered(&s, b" [1, 2]\n", "application/json");
        let verdict = verify_inbox_file(&bytes, &key).unwrap().unwrap();
        assert!(verdict.starts_with("VERIFIED"), "{verdict}");
    }

    /// A file written before inbox files kept a JSON payload's bytes (no `format`) holds a
    /// parsed view of it: its other fields are still held to the entry, but the verdict
    /// refuses to call the payload verified. Such a file with `payload_base64` verifies.
    #[test]
    fn an_old_inbox_file_with_an_inline_payload_is_refused_clearly() {
        let old = |bytes: &[u8]| {
            let mut v: serde_json::Value = serde_json::from_slice(bytes).unwrap();
            let fields = v.as_object_mut().unwrap();
            for field in ["format", "organisations", "consents"] {
                fields.remove(field);
            }
            // Earlier agents wrote the parsed payload back, pretty-printed.
            serde_json::to_vec_pretty(&v).unwrap()
        };
        let (_d, s) = spool();
        let (bytes, key) = delivered(&s, br#"{"a":1}"#, "application/json");
        let err = verify_inbox_file(&old(&bytes), &key).unwrap().unwrap_err();
        assert!(
            err.contains("payload") && err.contains("not verified"),
            "{err}"
        );
        let (_d, s) = spool();
        let (bytes, key) = delivered(&s, b"\x00\x01", "application/octet-stream");
        let verdict = verify_inbox_file(&old(&bytes), &key).unwrap().unwrap();
        assert!(verdict.starts_with("VERIFIED"), "{verdict}");
    }

    /// An inbox file is at most a small multiple of its payload, however deeply the payload
    /// nests: 63 levels of arrays around 100,000 zeros once took 65 times the payload's size.
    #[test]
    fn an_inbox_file_is_bounded_by_its_payload() {
        let mut nested = "[".repeat(63);
        nested.push_str(&vec!["0"; 100_000].join(","));
        nested.push_str(&"]".repeat(63));
        let cases = [
            (nested.into_bytes(), "application/json"),
            (vec![7u8; 200_000], "application/octet-stream"),
        ];
        for (payload, content_type) in cases {
            let (_d, s) = spool();
            let (bytes, key) = delivered(&s, &payload, content_type);
            assert!(
                bytes.len() <= payload.len() * 3 / 2 + 16 * 1024,
                "{content_type}: a payload of {} bytes took a file of {}",
                payload.len(),
                bytes.len()
            );
            let verdict = verify_inbox_file(&bytes, &key).unwrap().unwrap();
            assert!(verdict.starts_with("VERIFIED"), "{verdict}");
        }
    }

    /// A notice file verifies only while every field is the one its `notice_queued` entry
    /// holds; a changed field, or one the broker never wrote, is refused by name.
    #[test]
    fn an_edited_notice_file_does_not_verify() {
        let notice = pb::Notice {
            notice_id: "5b0d4a9e-3c2f-4d8e-9a51-0c6f7e2b1a99".into(),
            kind: pb::NoticeKind::DsarReminder as i32,
            subject: "nca:DSAR-1".into(),
            agencies: vec!["ico".into()],
            due: Some(prost_types::Timestamp {
                seconds: 1_796_000_000,
                nanos: 0,
            }),
            issued_at: Some(prost_types::Timestamp {
                seconds: 1_795_000_000,
                nanos: 0,
            }),
            message: "ico's answer to nca:DSAR-1 is due soon".into(),
        };
        let entry = pb::AuditEntry {
            time: notice.issued_at,
            event: Some(pb::audit_entry::Event::NoticeQueued(pb::NoticeQueued {
                recipient: "ico".into(),
                notice: Some(notice.clone()),
            })),
        };
        let (key, proof) = crate::witness::test_log::prove(&entry);
        let (_d, s) = spool();
        let delivered = s
            .deliver(&pb::Delivery {
                delivery_id: "1".into(),
                body: Some(pb::delivery::Body::Notice(notice)),
                audit: Some(proof),
            })
            .unwrap();
        let bytes = fs::read(delivered.path()).unwrap();
        let verdict = verify_inbox_file(&bytes, &key).unwrap().unwrap();
        assert!(verdict.starts_with("VERIFIED"), "{verdict}");
        let file: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let rows: [(&str, serde_json::Value); 3] = [
            ("message", "no answer is needed".into()),
            ("due", "2030-01-01T00:00:00Z".into()),
            ("approved_by", "the minister".into()),
        ];
        for (field, value) in rows {
            let mut forged = file.clone();
            forged[field] = value;
            let err = verify_inbox_file(&serde_json::to_vec(&forged).unwrap(), &key)
                .unwrap()
                .expect_err(&format!("a notice file with another {field} verified"));
            assert!(err.contains(field), "{field}: {err}");
        }
    }
}
