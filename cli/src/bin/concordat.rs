//! `concordat`: the operator CLI. Argument parsing and printing only; the work is in the
//! `concordat_cli` library (and the agent's client).

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use concordat_agent::{
    client::{BrokerUrls, ClientTls},
    config::AgentConfig,
};
use concordat_cli::{
    audit_file::{self, Format},
    operator::{self, ConsentRequest, SendOutcome},
    workflows,
};
use concordat_proto::{
    checkpoint::LogVerifier,
    consent::{RevocationTarget, TokenId},
    envelope::{Kind, Tlp},
    ids::{AgencyId, MessageId, OrgId},
    paserk::PublicKey,
};
use time::OffsetDateTime;

/// gRPC, TLS and sled allocate heavily from several threads; mimalloc is cheaper and fragments
/// less than the system allocator there (measured with `concordat bench relay`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status of `concordat send` when the broker refused the envelope.
const EXIT_REFUSED: u8 = 3;

#[derive(Parser)]
#[command(name = "concordat", version, about = "Concordat operator tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prints a shell completion script for this command (bash, zsh, fish, elvish,
    /// powershell).
    Completions {
        /// The shell.
        shell: concordat_support::cli_docs::Shell,
    },
    /// Writes man pages, one per command and subcommand, into a directory.
    Man {
        /// The directory (created if missing).
        #[arg(long)]
        out_dir: std::path::PathBuf,
    },
    /// Certificates for development federations.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Generates a key pair (a consent issuer's or a significance officer's): the secret key to
    /// FILE (mode 0600) and the public key beside it with the extension .pub in place of FILE's
    /// own (desk.key -> desk.pub); prints both files, the public key and its key id.
    Keygen {
        /// Where to write the secret key (the public key goes to the same name with extension .pub).
        #[arg(long)]
        out: PathBuf,
    },
    /// Consent tokens: issue, inspect, revoke.
    Consent {
        #[command(subcommand)]
        command: ConsentCommand,
    },
    /// National-significance designations: the two-person rule (docs/national-significance.md).
    Significance {
        #[command(subcommand)]
        command: SignificanceCommand,
    },
    /// Sends one envelope and prints the receipt or the refusal. Exit status: 0 accepted,
    /// 3 refused, 1 error.
    Send(SendArgs),
    /// The federation as the broker sees it now: agencies and their connections, queues, the
    /// audit log and its checkpoint, agreements and their reviews, decisions of the last hour.
    /// An agency's certificate sees its own queue and its own agreements; an auditor's, all.
    Status {
        /// Print JSON (field names documented in the README, "Status").
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Agreements in the broker's configuration: recording their reviews.
    Agreement {
        #[command(subcommand)]
        command: AgreementCommand,
    },
    /// Benchmarks that print figures (build with --release).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Receipts the agent saved (`sent/<name>.receipt.json`): offline verification.
    Receipt {
        #[command(subcommand)]
        command: ReceiptCommand,
    },
    /// The audit log: export, offline verification, explanation.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Subject-access consultations (docs/workflows.md): open, respond, close, status, find.
    /// Steps exit 0 accepted, 3 refused, 1 error.
    Dsar {
        #[command(subcommand)]
        command: DsarCommand,
    },
    /// Public communications agreed in advance (docs/workflows.md): propose, approve, object,
    /// status. Steps exit 0 accepted, 3 refused, 1 error.
    Comms {
        #[command(subcommand)]
        command: CommsCommand,
    },
    /// Incident coordination (docs/workflows.md).
    Incident {
        #[command(subcommand)]
        command: IncidentCommand,
    },
    /// Runs the broker and an agent per agency in this process on loopback, plays a short
    /// scripted exchange, prints each decision and where each file landed, and exits.
    Demo {
        /// Keep the spools and the broker's data in this (new or empty) directory instead of a
        /// temporary one.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AgreementCommand {
    /// Records a completed review of an agreement in the broker's configuration file (edited in
    /// place, comments kept): sets `reviewed = DATE`, which moves its review date two years on,
    /// and removes an explicit `review_by` that would override it. Prints the old and new
    /// review dates. The file is checked with the broker's loader before it is written.
    Reviewed {
        /// The agreement's id.
        #[arg(long)]
        id: String,
        /// The day the review was completed (YYYY-MM-DD): not before the agreement was signed,
        /// not in the future.
        #[arg(long, value_parser = parse_date)]
        on: time::Date,
        /// The broker's configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Then asks the running broker to reload it (as `concordat-broker reload` does) and
        /// prints the outcome.
        #[arg(long)]
        reload: bool,
    },
}

/// A calendar date, YYYY-MM-DD.
fn parse_date(s: &str) -> Result<time::Date, String> {
    time::Date::parse(s, time::macros::format_description!("[year]-[month]-[day]"))
        .map_err(|e| format!("{s:?} is not a date such as 2026-11-30: {e}"))
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Generates a development PKI: a CA, the broker's certificate (SANs localhost and
    /// 127.0.0.1), one client certificate per agency and auditor (CN = id), and a consent
    /// issuer key per agency under consent/.
    Dev {
        /// Where to write the files.
        #[arg(long)]
        out: PathBuf,
        /// Comma-separated agency ids.
        #[arg(long, value_delimiter = ',', required = true)]
        agencies: Vec<AgencyId>,
        /// Comma-separated auditor ids.
        #[arg(long, value_delimiter = ',')]
        auditors: Vec<AgencyId>,
    },
}

#[derive(Subcommand)]
enum ConsentCommand {
    /// Issues a consent token and prints it.
    Issue {
        /// The issuer's secret key file (PASERK k4.secret).
        #[arg(long)]
        issuer_key: PathBuf,
        /// The organisation that consents.
        #[arg(long)]
        org: OrgId,
        /// The agency that may send.
        #[arg(long)]
        from: AgencyId,
        /// The agencies that may receive, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        to: Vec<AgencyId>,
        /// The kinds of message, comma-separated: threat_assessment, incident_record,
        /// dsar_consultation.
        #[arg(long, value_delimiter = ',', required = true)]
        kind: Vec<Kind>,
        /// Why the organisation consents.
        #[arg(long)]
        purpose: String,
        /// Binds the token to an incident reference (repeatable).
        #[arg(long)]
        incident: Vec<String>,
        /// Binds the token to this exact payload (its SHA-256).
        #[arg(long)]
        payload: Option<PathBuf>,
        /// How long the token is valid, e.g. 30d, 12h.
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        expires: std::time::Duration,
        /// How many transfers the token may authorise.
        #[arg(long)]
        max_uses: Option<u32>,
    },
    /// Shows a token's claims and, with --public-key, whether it verifies (exit 1 if not).
    Inspect {
        /// The token, or @FILE.
        token: String,
        /// The issuer's public key (PASERK k4.public), or @FILE.
        #[arg(long)]
        public_key: Option<String>,
    },
    /// Lists the consents the broker has relied on: those your consent desk issued and those
    /// of your transfers (an auditor: all), with their uses, expiry and revocation. Open ones
    /// only, unless --all.
    List {
        /// Only consents of this organisation.
        #[arg(long)]
        org: Option<OrgId>,
        /// Also expired, revoked and used-up consents.
        #[arg(long)]
        all: bool,
        /// Only those touching this agency (an agency may name only itself).
        #[arg(long)]
        agency: Option<AgencyId>,
        /// Print JSON (field names documented in the README, "Status").
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Signs a revocation and sends it to the broker.
    Revoke {
        /// The issuer's secret key file.
        #[arg(long)]
        issuer_key: PathBuf,
        /// Revokes the token with this jti.
        #[arg(long, conflicts_with = "before", required_unless_present = "before")]
        jti: Option<String>,
        /// Revokes every token of this key issued before this RFC 3339 time.
        #[arg(long)]
        before: Option<String>,
        #[command(flatten)]
        broker: BrokerArgs,
    },
}

#[derive(Subcommand)]
enum SignificanceCommand {
    /// The first officer designates an incident of national significance: writes the first
    /// half to --out. A second officer countersigns it before it can be used.
    Designate {
        /// The designating officer's secret key file (PASERK k4.secret, `concordat keygen`).
        #[arg(long)]
        officer_key: PathBuf,
        /// The agency the officer designates for (the sender).
        #[arg(long)]
        agency: AgencyId,
        /// The incident reference, exactly as the records carry it.
        #[arg(long)]
        incident: String,
        /// The agencies it may go to, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        to: Vec<AgencyId>,
        /// Why the incident is of national significance.
        #[arg(long)]
        grounds: String,
        /// How long the designation is valid, e.g. 7d, 12h.
        #[arg(long, default_value = "7d", value_parser = parse_timeout)]
        expires: std::time::Duration,
        /// Where to write the first half.
        #[arg(long)]
        out: PathBuf,
    },
    /// A second, different officer countersigns a designation: shows what it says, and writes
    /// the designation file (both halves) that senders attach to envelopes.
    Countersign {
        /// The countersigning officer's secret key file.
        #[arg(long)]
        officer_key: PathBuf,
        /// The first half, as `designate` wrote it.
        #[arg(long)]
        designation: PathBuf,
        /// Where to write the designation file.
        #[arg(long)]
        out: PathBuf,
    },
}

/// The storage engines `bench relay --storage` runs the full broker on.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchStorage {
    /// sled only.
    Sled,
    /// sled, then PostgreSQL.
    Postgres,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Accepted transfers per second and latency through the full broker, against a bare mTLS
    /// relay in the same process.
    Relay {
        /// Seconds per run.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Requests in flight.
        #[arg(long, default_value_t = 64)]
        in_flight: usize,
        /// Payload bytes (default 512; 4096 with --content stix).
        #[arg(long)]
        payload: Option<usize>,
        /// The payloads: json (a JSON document), opaque (bytes on a flow with opaque = true),
        /// or stix (STIX 2.1 bundles: the full broker runs alternately with opaque payloads of
        /// the same size and with the bundles, four rounds, and the STIX/opaque throughput
        /// ratio is printed).
        #[arg(long, default_value = "json")]
        content: concordat_cli::bench::RelayContent,
        /// Synthetic organisations registered in the full broker besides the default ones.
        #[arg(long, default_value_t = 10_000)]
        organisations: usize,
        /// Client connections.
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Deliveries in flight to the subscriber (the broker's max_window is set to match).
        #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=4096))]
        window: u32,
        /// Also run the full broker with a new consent token for every message.
        #[arg(long)]
        fresh_tokens: bool,
        /// Where the full broker runs: sled (the embedded default, when not given), or
        /// postgres, which runs it on sled and then on PostgreSQL, printing both (a primary and
        /// a synchronous standby that the benchmark starts and stops, from the installed
        /// PostgreSQL, unless --postgres names a server).
        #[arg(long, value_enum)]
        storage: Option<BenchStorage>,
        /// The PostgreSQL server of --storage postgres (which it implies): its URL without a
        /// database (e.g. postgres://postgres@127.0.0.1:5432); the benchmark makes a database
        /// concordat_bench on it, dropping any of that name.
        #[arg(long, value_name = "URL")]
        postgres: Option<String>,
        /// How the senders send: stream (SendStream, one stream per connection, as the agent
        /// sends; the bare relay then runs both ways, so that both baselines are printed) or
        /// unary (one Send call per envelope).
        #[arg(long, default_value = "stream")]
        send: concordat_cli::bench::SendMode,
    },
    /// The content gate's organisation matcher: MB/s over 4 KiB and 1 MiB payloads.
    Gate {
        /// Registered organisations.
        #[arg(long, default_value_t = 10_000)]
        organisations: usize,
    },
    /// Export and offline verification of a log of this many entries.
    Audit {
        /// Entries in the log.
        #[arg(long, default_value_t = 1_000_000)]
        entries: u64,
    },
    /// A legitimate agency's Hello latency (p50/p99) without and with a flood of idle and
    /// slow connections from another loopback address.
    Flood {
        /// Connections the flood holds (half idle, half sending one byte per second).
        #[arg(long, default_value_t = 2000)]
        connections: usize,
        /// Legitimate Hello calls per run, each on a fresh connection.
        #[arg(long, default_value_t = 100)]
        hellos: usize,
        /// The flood's source address (any of 127.0.0.0/8 is loopback).
        #[arg(long, default_value = "127.0.0.2")]
        from: std::net::IpAddr,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Exports the audit log (an auditor's certificate: every entry; an agency's: the entries
    /// it is a party to): one line per entry, with the checkpoint and, for a filtered export,
    /// an inclusion proof per entry.
    Export {
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
        /// jsonl or csv.
        #[arg(long, value_enum, default_value = "jsonl")]
        format: Format,
        /// Only entries about this organisation (subject-access consultations).
        #[arg(long)]
        org: Option<OrgId>,
        /// Only entries involving this agency (with an agency's certificate: its own id only).
        #[arg(long)]
        agency: Option<AgencyId>,
        /// Only refusals with this reason code.
        #[arg(long)]
        reason: Option<String>,
        /// Only entries at or after this RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// Only entries before this RFC 3339 time.
        #[arg(long)]
        until: Option<String>,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Verifies an export offline: every entry hash, every proof, the checkpoint's signature,
    /// and for a full export the recomputed root. Prints a one-line verdict; exit 1 on failure.
    Verify {
        /// The export file (.jsonl or .csv).
        file: PathBuf,
        /// The log's verifier key (concordat-broker log-key), or @FILE.
        #[arg(long)]
        log_key: String,
    },
    /// Prints an entry's decision in words: which rule, which agreement clause, which token.
    /// With --workflow, the story of a consultation, statement or incident: a one-line summary,
    /// then every entry that belongs to it, in log order.
    Explain {
        /// The entry's index.
        #[arg(
            long,
            required_unless_present = "workflow",
            conflicts_with = "workflow"
        )]
        index: Option<u64>,
        /// A workflow id (AGENCY:REFERENCE): every entry of that consultation, statement or
        /// incident.
        #[arg(long)]
        workflow: Option<String>,
        /// Read the entry from this export instead of the broker.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Verify the entry against the broker's checkpoint with this key, or @FILE.
        #[arg(long)]
        log_key: Option<String>,
        #[command(flatten)]
        broker: BrokerArgs,
    },
}

#[derive(Subcommand)]
enum DsarCommand {
    /// Opens a consultation with the agencies that shared the information, before answering a
    /// data-subject-rights request; prints its id (AGENCY:REF, your agency's) and the deadlines.
    Open {
        /// The agencies to consult, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        with: Vec<AgencyId>,
        /// Your reference for the request, e.g. DSAR-2026-0012 (no spaces, no ':').
        #[arg(long = "ref")]
        reference: String,
        /// The transfers (ids) the request concerns, comma-separated.
        #[arg(long, value_delimiter = ',')]
        concerns: Vec<uuid::Uuid>,
        /// The organisation the request concerns (one the transfers already identified).
        #[arg(long)]
        org: Option<OrgId>,
        /// The deadline for answers: a DATE (YYYY-MM-DD, the end of that day UTC) or an RFC 3339
        /// time (default: the agreement's dsar_response_days).
        #[arg(long)]
        respond_by: Option<String>,
        /// A payload to send with it (default: a small JSON document describing the step).
        #[arg(long, requires = "content_type")]
        payload: Option<PathBuf>,
        /// The payload's media type.
        #[arg(long, requires = "payload")]
        content_type: Option<String>,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Answers a consultation you were consulted on (ID: REQUESTER:REFERENCE).
    #[command(group(clap::ArgGroup::new("answer").required(true).multiple(false)))]
    Respond {
        /// The consultation id.
        id: String,
        /// No objection to the requester's answering.
        #[arg(long, group = "answer")]
        no_objection: bool,
        /// An objection, with the exemption ground relied on.
        #[arg(long, group = "answer", value_name = "TEXT")]
        objection: Option<String>,
        /// Not yet: you will answer by then (a DATE, the end of that day UTC, or an RFC 3339 time).
        #[arg(long, group = "answer", value_name = "DATE")]
        need_more_time: Option<String>,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Closes your consultation (ID, or your own reference), telling every consulted agency.
    /// Refused (CONSULTATION_OPEN) until each has answered or its deadline has passed.
    Close {
        /// The consultation id.
        id: String,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// The consultations you are a party to (open ones, unless --all or an ID is given): their
    /// state, each consulted agency's answer and deadline, and whether they may be closed.
    Status {
        /// One consultation.
        id: Option<String>,
        /// Include closed consultations.
        #[arg(long)]
        all: bool,
        /// Print JSON (field names documented in the README, "Workflows").
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Your own transfers with another agency, either way, that identify an organisation or
    /// carry an incident reference: what a consultation may concern.
    #[command(group(clap::ArgGroup::new("about").required(true).multiple(false)))]
    Find {
        /// The other agency.
        #[arg(long)]
        with: AgencyId,
        /// Transfers identifying this organisation.
        #[arg(long, group = "about")]
        org: Option<OrgId>,
        /// Transfers with this incident reference (AGENCY:REFERENCE, or your own).
        #[arg(long, group = "about")]
        incident: Option<String>,
        /// Only transfers accepted on or after this DATE (YYYY-MM-DD) or RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// Print JSON (field names documented in the README, "Workflows").
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        broker: BrokerArgs,
    },
}

#[derive(Subcommand)]
enum CommsCommand {
    /// Proposes a draft public statement to the other parties, to be published only once each
    /// approves and not before --publish-after.
    Propose {
        /// The parties asked to approve, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        to: Vec<AgencyId>,
        /// The draft (text/markdown for .md, text/plain for .txt).
        #[arg(long)]
        file: PathBuf,
        /// Not to be published before this DATE (YYYY-MM-DD, the start of that day UTC) or
        /// RFC 3339 time.
        #[arg(long)]
        publish_after: String,
        /// Your reference for it (default: stmt-YYYYMMDD-XXXXXXXX, from the message id).
        #[arg(long = "ref")]
        reference: Option<String>,
        /// The draft's media type, for files other than .md and .txt.
        #[arg(long)]
        content_type: Option<String>,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Approves a statement proposed to you (ID: PROPOSER:REFERENCE).
    Approve {
        /// The statement id.
        id: String,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Objects to a statement proposed to you (a later answer replaces this one).
    Object {
        /// The statement id.
        id: String,
        /// Why.
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// The statements you are a party to: each party's answer and whether it may be published.
    Status {
        /// One statement (ID, or your own reference).
        id: Option<String>,
        /// Print JSON (field names documented in the README, "Workflows").
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        broker: BrokerArgs,
    },
}

#[derive(Subcommand)]
enum IncidentCommand {
    /// Declares your agency involved in an incident (REF: AGENCY:REFERENCE, or your own
    /// reference). When another agency you share an agreement with has declared it too, both
    /// are sent a coordination notice naming each other.
    Involve {
        /// The incident reference.
        reference: String,
        /// Print JSON (field names documented in the README, "Workflows").
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        broker: BrokerArgs,
    },
}

#[derive(Subcommand)]
enum ReceiptCommand {
    /// Checks a receipt file offline: its checkpoint is signed by the log key, its entry is
    /// the transfer's acceptance and records every field of the file as the file states it
    /// (all but `warnings`, which are not in the log), and the inclusion proof places the entry
    /// in the checkpoint's tree. An inbox file is checked the same way against the entry it was
    /// delivered under (all its fields but a transfer's `content_type` and a recall notice's
    /// `revoked_at`). Prints a one-line verdict naming what is not verified, or the fields that
    /// differ from the entry; exit 1 on failure.
    Verify {
        /// The receipt file (`sent/<name>.receipt.json`) or inbox file
        /// (`inbox/<sender>.<message_id>.json`).
        file: PathBuf,
        /// The log's verifier key (concordat-broker log-key), or @FILE.
        #[arg(long)]
        log_key: String,
    },
}

/// `concordat receipt verify`: the verdict, or why the receipt does not prove anything.
fn verify_receipt(file: &std::path::Path, key: &LogVerifier) -> anyhow::Result<String> {
    let text = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    // An inbox file (a delivery or recall notice) keeps its proof too.
    if let Some(verdict) = concordat_agent::spool::verify_inbox_file(&text, key) {
        return verdict.map_err(|e| anyhow::anyhow!("{}: {e}", file.display()));
    }
    concordat_agent::spool::verify_receipt_file(&text, key)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
}

fn rfc3339(flag: &str, value: Option<String>) -> anyhow::Result<Option<prost_types::Timestamp>> {
    value
        .map(|v| {
            let t = OffsetDateTime::parse(&v, &time::format_description::well_known::Rfc3339)
                .with_context(|| format!("{flag} {v:?} is not an RFC 3339 time"))?;
            Ok(prost_types::Timestamp {
                seconds: t.unix_timestamp(),
                nanos: 0,
            })
        })
        .transpose()
}

fn log_key(value: &str) -> anyhow::Result<LogVerifier> {
    operator::inline_or_file(value)?.parse().map_err(|e| {
        anyhow::anyhow!("--log-key is not a log verifier key (name+keyid+base64): {e}")
    })
}

async fn audit(command: AuditCommand) -> anyhow::Result<ExitCode> {
    match command {
        AuditCommand::Export {
            out,
            format,
            org,
            agency,
            reason,
            since,
            until,
            broker,
        } => {
            let request = concordat_proto::pb::ExportRequest {
                since: rfc3339("--since", since)?,
                until: rfc3339("--until", until)?,
                agency: agency.map(String::from).unwrap_or_default(),
                organisation: org.map(String::from).unwrap_or_default(),
                reason: reason.unwrap_or_default(),
                ..Default::default()
            };
            let client = broker.tls()?.connect().await?;
            let summary = audit_file::export(&client, request, &out, format).await?;
            println!(
                "wrote {} entr{} of a log of {} to {} ({})",
                summary.entries,
                if summary.entries == 1 { "y" } else { "ies" },
                summary.tree_size,
                out.display(),
                if summary.partial {
                    "partial: each entry with its inclusion proof"
                } else {
                    "full"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Verify { file, log_key: key } => {
            let key = log_key(&key)?;
            match audit_file::verify(&file, &key)? {
                Ok(v) => {
                    println!(
                        "OK: {} entr{} verified against the checkpoint of {} (size {}, root {}){}",
                        v.entries,
                        if v.entries == 1 { "y" } else { "ies" },
                        v.checkpoint.origin(),
                        v.checkpoint.size(),
                        v.checkpoint.root(),
                        if v.partial {
                            ""
                        } else {
                            "; full log, root recomputed"
                        }
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    println!("FAILED: {}: {e}", file.display());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        AuditCommand::Explain {
            index: None,
            workflow: Some(id),
            file,
            log_key: key,
            broker,
        } => {
            let key = key.as_deref().map(log_key).transpose()?;
            let keep = |e: &concordat_proto::pb::AuditEntry| {
                concordat_proto::audit::workflow_subject(e).as_deref() == Some(id.as_str())
            };
            let entries = match file {
                Some(file) => audit_file::entries_from_file(&file, keep)?,
                None => {
                    let client = broker.tls()?.connect().await?;
                    audit_file::entries_from_broker(&client, key.as_ref(), keep).await?
                }
            };
            match concordat_cli::workflows::story(&id, &entries) {
                Some(story) => {
                    print!("{story}");
                    Ok(ExitCode::SUCCESS)
                }
                None => anyhow::bail!("no entry of the log belongs to workflow {id}"),
            }
        }
        AuditCommand::Explain {
            index,
            file,
            log_key: key,
            broker,
            ..
        } => {
            let index = index.context("give --index or --workflow")?;
            let entry = match file {
                Some(file) => audit_file::entry_from_file(&file, index)?,
                None => {
                    let key = key.as_deref().map(log_key).transpose()?;
                    let client = broker.tls()?.connect().await?;
                    audit_file::entry_from_broker(&client, index, key.as_ref()).await?
                }
            };
            println!("{}", concordat_proto::audit::explain(index, &entry));
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// How to reach the broker: explicit files, or an agent's configuration.
#[derive(Args)]
struct BrokerArgs {
    /// The broker's URL, e.g. https://localhost:7443. With several broker nodes, repeat it
    /// (or separate the URLs with commas): they are tried in turn and the first that connects
    /// is used.
    #[arg(long, value_delimiter = ',', requires_all = ["ca", "cert", "key"], conflicts_with = "config")]
    broker: Vec<String>,
    /// The federation CA certificate.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// This agency's client certificate.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Read broker URL and TLS files from an agent configuration instead.
    #[arg(long)]
    config: Option<PathBuf>,
    /// How long to wait for the broker to connect and for each answer, e.g. 5s, 2m (default:
    /// the configuration's timeouts.rpc_ms, or 30s).
    #[arg(long, value_parser = parse_timeout)]
    timeout: Option<std::time::Duration>,
}

/// A `--timeout`: a human duration, more than zero.
fn parse_timeout(value: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(value) {
        Ok(d) if d.is_zero() => Err("must be more than zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

impl BrokerArgs {
    fn tls(&self) -> anyhow::Result<ClientTls> {
        let mut tls = match (
            &self.config,
            self.broker.first(),
            &self.ca,
            &self.cert,
            &self.key,
        ) {
            (Some(path), ..) => AgentConfig::load(path)?.client_tls()?,
            (None, Some(url), Some(ca), Some(cert), Some(key)) => {
                let mut tls = ClientTls::from_files(url, ca, cert, key)?;
                if let Some(brokers) = BrokerUrls::new(self.broker.clone()) {
                    tls.brokers = brokers;
                }
                tls
            }
            _ => anyhow::bail!("give --broker, --ca, --cert and --key, or --config"),
        };
        // One deadline the operator can reason about: no single wait, connecting included,
        // is longer than --timeout.
        if let Some(timeout) = self.timeout {
            tls.timeouts.rpc = timeout;
            tls.timeouts.connect = tls.timeouts.connect.min(timeout);
        }
        Ok(tls)
    }
}

#[derive(Args)]
struct SendArgs {
    /// Recipient agencies, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    to: Vec<AgencyId>,
    /// The kind: threat_assessment, incident_record or dsar_consultation.
    #[arg(long)]
    kind: Kind,
    /// The organisation the payload identifies (needs --consent).
    #[arg(long, requires = "consent")]
    org: Option<OrgId>,
    /// The consent token, or @FILE.
    #[arg(long)]
    consent: Option<String>,
    /// A further organisation the payload identifies (repeatable; each needs --also-consent).
    #[arg(long)]
    also_org: Vec<OrgId>,
    /// A further consent token, or @FILE, one per further organisation the payload identifies
    /// (repeatable); the broker matches each to its organisation.
    #[arg(long)]
    also_consent: Vec<String>,
    /// The incident reference.
    #[arg(long)]
    incident: Option<String>,
    /// A designation file (`concordat significance countersign`) to attach.
    #[arg(long)]
    designation: Option<PathBuf>,
    /// The TLP marking: clear, green, amber, amber+strict, red.
    #[arg(long, default_value = "amber")]
    tlp: Tlp,
    /// The payload's media type.
    #[arg(long, default_value = "application/json")]
    content_type: String,
    /// The message id (a UUID); a fresh one if not given. Reuse it to retry safely.
    #[arg(long)]
    message_id: Option<MessageId>,
    /// The payload file.
    #[arg(long)]
    payload: PathBuf,
    #[command(flatten)]
    broker: BrokerArgs,
}

fn main() -> ExitCode {
    concordat_support::memory::no_transparent_huge_pages();
    let cli = Cli::parse();
    // The demo and the benchmarks print their own account; only errors are worth adding.
    let default_filter = if matches!(cli.command, Command::Demo { .. } | Command::Bench { .. }) {
        "error"
    } else {
        "warn"
    };
    // The CLI's log is for the person at the terminal: always text (coloured only there).
    if let Err(e) =
        concordat_agent::logging::init(concordat_agent::logging::LogFormat::Text, default_filter)
    {
        eprintln!("error: installing the log subscriber: {e}");
        return ExitCode::FAILURE;
    }
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        eprintln!("error: a TLS crypto provider was already installed");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", concordat_support::report(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Completions { shell } => {
            concordat_support::cli_docs::completions(
                <Cli as clap::CommandFactory>::command(),
                shell,
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { out_dir } => {
            let files = concordat_support::cli_docs::man_pages(
                <Cli as clap::CommandFactory>::command(),
                &out_dir,
            )
            .with_context(|| format!("writing man pages into {}", out_dir.display()))?;
            for f in files {
                println!("{}", f.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs {
            command:
                CertsCommand::Dev {
                    out,
                    agencies,
                    auditors,
                },
        } => {
            let ids = |v: &[AgencyId]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
            let files =
                concordat_cli::pki::write_dev_pki(&out, &ids(&agencies), &ids(&auditors))
                    .with_context(|| format!("writing the development PKI to {}", out.display()))?;
            for f in files {
                println!("wrote {}", f.display());
            }
            let consent_dir = out.join("consent");
            std::fs::create_dir_all(&consent_dir)
                .with_context(|| format!("creating {}", consent_dir.display()))?;
            for agency in &agencies {
                let path = consent_dir.join(format!("{agency}.key"));
                if path.exists() {
                    std::fs::remove_file(&path)
                        .with_context(|| format!("replacing {}", path.display()))?;
                }
                let (_, key_id) = operator::keygen(&path)?;
                println!(
                    "wrote {} and {} ({key_id})",
                    path.display(),
                    path.with_extension("pub").display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Keygen { out } => {
            let (public, key_id) = operator::keygen(&out)?;
            println!("secret key: {} (mode 0600)", out.display());
            println!(
                "public key: {} ({public})",
                operator::public_key_file(&out).display()
            );
            println!("key id:     {key_id}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Consent { command } => consent(command).await,
        Command::Significance { command } => significance(command),
        Command::Send(args) => send(args).await,
        Command::Status { json, broker } => {
            let report = concordat_cli::status::status(&broker.tls()?).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.text());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Receipt {
            command: ReceiptCommand::Verify { file, log_key: key },
        } => {
            let key = log_key(&key)?;
            match verify_receipt(&file, &key) {
                Ok(verdict) => {
                    println!("{verdict}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    println!("FAILED: {}", concordat_support::report(e.as_ref()));
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Audit { command } => audit(command).await,
        Command::Agreement {
            command:
                AgreementCommand::Reviewed {
                    id,
                    on,
                    config,
                    reload,
                },
        } => {
            let today = OffsetDateTime::now_utc().date();
            let done = concordat_cli::agreement::record_review(&config, &id, on, today)?;
            println!(
                "agreement {}: reviewed {on}; review by {} -> {}",
                done.id, done.old_review_by, done.new_review_by
            );
            if let Some(old) = &done.removed_review_by {
                println!("removed review_by = {old}, which would have overridden it");
            }
            println!("wrote {}", config.display());
            if reload {
                let data_dir = done.data_dir.clone();
                let outcome = tokio::task::spawn_blocking(move || {
                    concordat_cli::agreement::reload(&data_dir)
                })
                .await
                .context("waiting for the reload")??;
                print!("{outcome}");
            } else {
                println!("the running broker applies it on reload (concordat-broker reload)");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { command } => {
            let mut out = std::io::stdout();
            match command {
                BenchCommand::Relay {
                    seconds,
                    in_flight,
                    payload,
                    connections,
                    window,
                    fresh_tokens,
                    content,
                    organisations,
                    storage,
                    postgres,
                    send,
                } => {
                    use concordat_cli::bench::PostgresServer;
                    let postgres = match (storage, postgres) {
                        (Some(BenchStorage::Sled), Some(_)) => {
                            anyhow::bail!(
                                "--postgres names the server of --storage postgres; with \
                                 --storage sled there is none to name"
                            )
                        }
                        (_, Some(url)) => Some(PostgresServer::Url(url)),
                        (Some(BenchStorage::Postgres), None) => Some(PostgresServer::Throwaway),
                        (Some(BenchStorage::Sled) | None, None) => None,
                    };
                    let settings = concordat_cli::bench::RelayBench {
                        duration: std::time::Duration::from_secs(seconds),
                        in_flight: in_flight.max(1),
                        payload: payload.unwrap_or(content.default_payload()),
                        connections: connections.max(1),
                        window,
                        fresh_tokens,
                        content,
                        organisations,
                        postgres,
                        send,
                    };
                    concordat_cli::bench::relay(settings, &mut out).await?;
                }
                BenchCommand::Audit { entries } => {
                    concordat_cli::bench::audit(entries, &mut out).await?
                }
                BenchCommand::Flood {
                    connections,
                    hellos,
                    from,
                } => {
                    let settings = concordat_cli::bench::FloodBench {
                        connections,
                        hellos: hellos.max(1),
                        from,
                    };
                    concordat_cli::bench::flood(settings, &mut out).await?;
                }
                BenchCommand::Gate { organisations } => {
                    concordat_cli::bench::gate(organisations, &mut out)?
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dsar { command } => dsar(command).await,
        Command::Comms { command } => comms(command).await,
        Command::Incident {
            command:
                IncidentCommand::Involve {
                    reference,
                    json,
                    broker,
                },
        } => {
            let answer = workflows::incident_involve(&broker.tls()?, &reference).await?;
            print_or_refused(answer, json, workflows::involvement_text)
        }
        Command::Demo { dir } => {
            let mut out = std::io::stdout();
            concordat_cli::demo::run(dir, &mut out).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Prints a workflow step's report; exit 3 when the broker refused it.
fn report(r: workflows::Report) -> anyhow::Result<ExitCode> {
    print!("{}", r.text);
    Ok(if r.refused {
        ExitCode::from(EXIT_REFUSED)
    } else {
        ExitCode::SUCCESS
    })
}

/// Prints a `Workflows` answer as JSON or text, or the refusal (exit 3).
fn print_or_refused<T: serde::Serialize>(
    answer: Result<T, workflows::Report>,
    json: bool,
    text: impl Fn(&T) -> String,
) -> anyhow::Result<ExitCode> {
    match answer {
        Ok(value) if json => {
            println!("{}", serde_json::to_string_pretty(&value)?);
            Ok(ExitCode::SUCCESS)
        }
        Ok(value) => {
            print!("{}", text(&value));
            Ok(ExitCode::SUCCESS)
        }
        Err(refused) => report(refused),
    }
}

async fn dsar(command: DsarCommand) -> anyhow::Result<ExitCode> {
    match command {
        DsarCommand::Open {
            with,
            reference,
            concerns,
            org,
            respond_by,
            payload,
            content_type,
            broker,
        } => {
            let payload = match (payload, content_type) {
                (Some(path), Some(t)) => Some(workflows::Payload::read(&path, &t)?),
                _ => None,
            };
            let request = workflows::OpenRequest {
                with,
                reference,
                concerns,
                organisation: org,
                respond_by,
                payload,
            };
            report(workflows::dsar_open(&broker.tls()?, request).await?)
        }
        DsarCommand::Respond {
            id,
            no_objection,
            objection,
            need_more_time,
            broker,
        } => {
            let answer = match (no_objection, objection, need_more_time) {
                (true, None, None) => workflows::RespondWith::NoObjection,
                (false, Some(text), None) => workflows::RespondWith::Objection(text),
                (false, None, Some(date)) => workflows::RespondWith::NeedMoreTime(date),
                _ => anyhow::bail!("give one of --no-objection, --objection and --need-more-time"),
            };
            report(workflows::dsar_respond(&broker.tls()?, &id, answer).await?)
        }
        DsarCommand::Close { id, broker } => {
            report(workflows::dsar_close(&broker.tls()?, &id).await?)
        }
        DsarCommand::Status {
            id,
            all,
            json,
            broker,
        } => {
            let answer = workflows::dsar_status(&broker.tls()?, id.as_deref(), all).await?;
            print_or_refused(answer, json, |list| workflows::consultations_text(list))
        }
        DsarCommand::Find {
            with,
            org,
            incident,
            since,
            json,
            broker,
        } => {
            let request = workflows::FindRequest {
                with: Some(with),
                organisation: org,
                incident,
                since,
            };
            let answer = workflows::dsar_find(&broker.tls()?, request).await?;
            print_or_refused(answer, json, workflows::found_text)
        }
    }
}

async fn comms(command: CommsCommand) -> anyhow::Result<ExitCode> {
    match command {
        CommsCommand::Propose {
            to,
            file,
            publish_after,
            reference,
            content_type,
            broker,
        } => {
            let request = workflows::ProposeRequest {
                to,
                statement: workflows::Payload::statement(&file, content_type.as_deref())?,
                publish_after,
                reference,
            };
            report(workflows::comms_propose(&broker.tls()?, request).await?)
        }
        CommsCommand::Approve { id, broker } => {
            report(workflows::comms_answer(&broker.tls()?, &id, None).await?)
        }
        CommsCommand::Object { id, reason, broker } => {
            report(workflows::comms_answer(&broker.tls()?, &id, Some(reason)).await?)
        }
        CommsCommand::Status { id, json, broker } => {
            let answer = workflows::comms_status(&broker.tls()?, id.as_deref()).await?;
            print_or_refused(answer, json, |list| workflows::statements_text(list))
        }
    }
}

async fn consent(command: ConsentCommand) -> anyhow::Result<ExitCode> {
    match command {
        ConsentCommand::Issue {
            issuer_key,
            org,
            from,
            to,
            kind,
            purpose,
            incident,
            payload,
            expires,
            max_uses,
        } => {
            let key = operator::read_secret_key(&issuer_key)?;
            let payload = payload
                .map(|p| std::fs::read(&p).with_context(|| format!("reading {}", p.display())))
                .transpose()?;
            let request = ConsentRequest {
                organisation: org,
                from,
                to,
                kinds: kind,
                purpose,
                incidents: incident,
                payload,
                valid_for: expires,
                max_uses,
            };
            println!(
                "{}",
                operator::issue_consent(&key, &request, OffsetDateTime::now_utc())?
            );
            Ok(ExitCode::SUCCESS)
        }
        ConsentCommand::Inspect { token, public_key } => {
            let token = operator::inline_or_file(&token)?;
            let key = public_key
                .map(|k| -> anyhow::Result<PublicKey> {
                    operator::inline_or_file(&k)?
                        .parse()
                        .context("--public-key is not a PASERK k4.public key")
                })
                .transpose()?;
            let (report, verified) = operator::inspect(&token, key.as_ref())?;
            print!("{report}");
            Ok(if verified == Some(false) {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        ConsentCommand::List {
            org,
            all,
            agency,
            json,
            broker,
        } => {
            let request = concordat_proto::pb::ConsentsRequest {
                organisation: org.map(String::from).unwrap_or_default(),
                all,
                agency: agency.map(String::from).unwrap_or_default(),
            };
            let list = concordat_cli::status::consents(&broker.tls()?, request).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", list.text());
            }
            Ok(ExitCode::SUCCESS)
        }
        ConsentCommand::Revoke {
            issuer_key,
            jti,
            before,
            broker,
        } => {
            let key = operator::read_secret_key(&issuer_key)?;
            let now = OffsetDateTime::now_utc();
            let target = match (jti, before) {
                (Some(jti), None) => {
                    RevocationTarget::Token(jti.parse::<TokenId>().context("--jti")?)
                }
                (None, Some(before)) => RevocationTarget::IssuedBefore(
                    OffsetDateTime::parse(&before, &time::format_description::well_known::Rfc3339)
                        .with_context(|| format!("--before {before:?} is not an RFC 3339 time"))?,
                ),
                _ => anyhow::bail!("give exactly one of --jti and --before"),
            };
            let statement = operator::revocation(&key, target, now)?;
            let response = operator::send_revocation(&broker.tls()?, statement).await?;
            println!(
                "revoked{}; {} recall notice(s) queued",
                if response.duplicate {
                    " (already recorded)"
                } else {
                    ""
                },
                response.recall_notices
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn significance(command: SignificanceCommand) -> anyhow::Result<ExitCode> {
    let write = |path: &PathBuf, text: &str| {
        if path.exists() {
            anyhow::bail!(
                "{} already exists; refusing to overwrite it",
                path.display()
            );
        }
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    };
    match command {
        SignificanceCommand::Designate {
            officer_key,
            agency,
            incident,
            to,
            grounds,
            expires,
            out,
        } => {
            let key = operator::read_secret_key(&officer_key)?;
            let request = operator::DesignationRequest {
                agency,
                incident,
                to,
                grounds,
                valid_for: expires,
            };
            let (token, claims) = operator::designate(&key, &request, OffsetDateTime::now_utc())?;
            write(&out, &format!("{token}\n"))?;
            print!("{}", operator::describe_designation(&claims));
            println!(
                "wrote the first half to {}; a second officer must countersign it",
                out.display()
            );
        }
        SignificanceCommand::Countersign {
            officer_key,
            designation,
            out,
        } => {
            let key = operator::read_secret_key(&officer_key)?;
            let first = std::fs::read_to_string(&designation)
                .with_context(|| format!("reading {}", designation.display()))?;
            let (file, claims) =
                operator::countersign_designation(&first, &key, OffsetDateTime::now_utc())?;
            write(&out, &file)?;
            print!("{}", operator::describe_designation(&claims));
            println!(
                "countersigned by {}; wrote the designation file {}",
                key.key_id(),
                out.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn send(args: SendArgs) -> anyhow::Result<ExitCode> {
    let payload = std::fs::read(&args.payload)
        .with_context(|| format!("reading {}", args.payload.display()))?;
    let consent = args
        .consent
        .as_deref()
        .map(operator::inline_or_file)
        .transpose()?;
    let also_consent = args
        .also_consent
        .iter()
        .map(|t| operator::inline_or_file(t))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let significance = args
        .designation
        .as_ref()
        .map(|path| {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            operator::read_designation(&text)
        })
        .transpose()?;
    let mut envelope = operator::envelope(
        args.message_id,
        args.to,
        args.kind,
        args.org,
        consent,
        args.incident,
        args.tlp,
        args.content_type,
        payload,
    );
    envelope.organisations = args.also_org;
    envelope.consent_tokens = also_consent;
    envelope.significance = significance;
    match operator::send(&args.broker.tls()?, envelope).await? {
        SendOutcome::Accepted(receipt) => {
            print!("{}", operator::describe_receipt(&receipt));
            Ok(ExitCode::SUCCESS)
        }
        SendOutcome::Refused { reason, message } => {
            println!("refused: {reason}: {message}");
            Ok(ExitCode::from(EXIT_REFUSED))
        }
    }
}
