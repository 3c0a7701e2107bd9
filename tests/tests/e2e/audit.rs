//! The tamper-evident audit log end to end: every receipt proves its entry under a signed
//! checkpoint; `concordat audit export` and `audit verify` round-trip full, CSV and filtered
//! exports; every kind of tampering with an export fails verification and names its line;
//! `audit explain` says why in words; the agent's witness raises an alarm when the broker shows
//! it a rewritten history signed with the right key (and stays quiet over an honest restart);
//! and `Audit.Checkpoint` proves consistency between sizes and refuses impossible ones.
//!
//! Every test starts its own broker with the federation of [`policy`] and most play the
//! exchange of [`play`], whose decisions land at known indices of the log (see [`History`]).

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration as StdDuration, Instant},
};

use concordat_agent::{
    client::Broker,
    daemon::{self, AgentEvent, AgentSettings},
    spool::{Spool, atomic_write},
};
use concordat_broker::{
    audit_log::{self, DEFAULT_ORIGIN},
    config::Config,
    policy::{Agreement, ConsentIssuer, Flow, Organisations, Policy},
    refusal::reason_of,
};
use concordat_cli::audit_file::{self, Format};
use concordat_proto::{
    audit,
    checkpoint::{self, Checkpoint, LogSigner, LogVerifier},
    consent::ConsentClaims,
    envelope::Kind,
    ids::{AgencyId, MessageId},
    merkle::{self, Hash},
    paserk::SecretKey,
    pb::{self, audit_entry::Event},
};
use concordat_tests::{BrokerHandle, TestPki, binary, federation_config, spawn_broker};
use serde_json::{Value, json};
use time::{Duration, OffsetDateTime};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tokio_stream::StreamExt;
use tonic::Code;

/// The organisation of the consented transfer and of the refusal for lack of consent.
const ORG: &str = "acme-ltd";
/// Another organisation, with a consented transfer of its own.
const OTHER_ORG: &str = "beta-plc";
/// The incident every organisation-specific envelope and token is bound to.
const INCIDENT: &str = "INC-7";
/// The payload of every envelope the tests send directly.
const PAYLOAD: &[u8] = br#"{"summary":"phishing campaign against payroll","hosts":3}"#;
/// The agreement permitting NCSC → ICO incident records and threat assessments.
const MOU_ICO_NCSC: &str = "mou-ico-ncsc-2024";
/// Its clause cited for NCSC → ICO.
const CLAUSE_NCSC_ICO: &str = "4.2";
/// The agreement permitting NCA → ICO threat assessments. Nothing permits NCA → NCSC.
const MOU_ICO_NCA: &str = "mou-ico-nca-2023";
/// How long any one outcome (an agent event, a CLI run, a restart) may take before the test
/// fails rather than hangs.
const TIMEOUT: StdDuration = StdDuration::from_secs(30);
/// How long a stopped agent is watched to show that it sends nothing. The honest-restart
/// control shows a working agent sends a file well within it.
const QUIET: StdDuration = StdDuration::from_secs(3);

// ---------------------------------------------------------------------------------------------
// The federation and its scripted exchange

/// Two agreements in force (NCSC → ICO under [`MOU_ICO_NCSC`], NCA → ICO under [`MOU_ICO_NCA`])
/// and the NCSC's consent desk, trusted for any organisation.
fn policy(desk: &SecretKey) -> Policy {
    let today = OffsetDateTime::now_utc().date();
    let agency = |id: &str| -> AgencyId { id.parse().unwrap() };
    let agreement = |id: &str, a: &str, b: &str, flow: Flow| Agreement {
        id: id.into(),
        title: format!("{a} and {b} memorandum of understanding"),
        parties: [agency(a), agency(b)].into_iter().collect(),
        signed: today - Duration::days(100),
        review_by: today + Duration::days(200),
        review: Default::default(),
        flows: vec![flow],
    };
    Policy {
        agreements: vec![
            agreement(
                MOU_ICO_NCSC,
                "ico",
                "ncsc",
                Flow {
                    from: agency("ncsc"),
                    to: agency("ico"),
                    kinds: [Kind::IncidentRecord, Kind::ThreatAssessment]
                        .into_iter()
                        .collect(),
                    clause: CLAUSE_NCSC_ICO.into(),
                    opaque: false,
                    max_tlp: None,
                    legal_bases: Default::default(),
                    consent_refusal_note: None,
                },
            ),
            agreement(
                MOU_ICO_NCA,
                "ico",
                "nca",
                Flow {
                    from: agency("nca"),
                    to: agency("ico"),
                    kinds: [Kind::ThreatAssessment].into_iter().collect(),
                    clause: "3.1".into(),
                    opaque: false,
                    max_tlp: None,
                    legal_bases: Default::default(),
                    consent_refusal_note: None,
                },
            ),
        ],
        issuers: HashMap::from([(
            desk.key_id(),
            ConsentIssuer {
                key: desk.public(),
                agency: Some(agency("ncsc")),
                organisations: Organisations::Any,
            },
        )]),
        clock_skew: Duration::seconds(60),
        enforce_review: false,
        ..Policy::default()
    }
}

fn config(pki: &TestPki, data_dir: &Path, desk: &SecretKey) -> Config {
    let mut config = federation_config(pki, data_dir, None).unwrap();
    config.policy = Policy {
        agencies: config.policy.agencies.clone(),
        ..policy(desk)
    };
    config
}

/// A broker with its PKI, consent desk and log key, in a temporary directory.
struct Site {
    pki: TestPki,
    dir: tempfile::TempDir,
    desk: SecretKey,
    broker: BrokerHandle,
    /// The verifier of the broker's log key.
    key: LogVerifier,
}

impl Site {
    async fn start() -> Site {
        let pki = TestPki::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let desk = SecretKey::generate();
        let data_dir = dir.path().join("broker");
        fs::create_dir_all(&data_dir).unwrap();
        // Created before the broker starts, which then loads it.
        let key = audit_log::load_or_create_key(&data_dir, DEFAULT_ORIGIN)
            .unwrap()
            .verifier();
        let broker = spawn_broker(config(&pki, &data_dir, &desk)).await.unwrap();
        Site {
            pki,
            dir,
            desk,
            broker,
            key,
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("broker")
    }

    async fn client(&mut self, cn: &str) -> Broker {
        self.pki.connect(self.broker.addr, cn).await.unwrap()
    }

    /// Stops the broker and starts another on the same data directory (and log key), on a new
    /// port. With `wipe`, the database and the checkpoint published beside it are deleted in
    /// between (a lost disk, the key restored from elsewhere): a new history under the same
    /// key, which the broker cannot tell from a first start.
    async fn restart(mut self, wipe: bool) -> Site {
        let data_dir = self.data_dir();
        self.broker.stop().await.unwrap();
        if wipe {
            fs::remove_dir_all(data_dir.join("db")).unwrap();
            fs::remove_file(data_dir.join(audit_log::PUBLISHED_CHECKPOINT_FILE)).unwrap();
            assert!(data_dir.join(audit_log::LOG_KEY_FILE).exists());
        }
        // The stopped broker's writer thread drops the database (and its file lock) just after
        // `stop` returns; until it has, the new broker fails to open it and is started again.
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let broker = spawn_broker(config(&self.pki, &data_dir, &self.desk))
                .await
                .unwrap();
            let up = async {
                let auditor = self.pki.connect(broker.addr, "auditor").await?;
                anyhow::Ok(checkpoint_rpc(&auditor, 0, 0).await?)
            };
            match tokio::time::timeout(TIMEOUT, up).await {
                Ok(Ok(_)) => {
                    self.broker = broker;
                    return self;
                }
                outcome => {
                    let stopped = broker.stop().await;
                    assert!(
                        Instant::now() < deadline,
                        "the restarted broker did not come up: {outcome:?}, {stopped:?}"
                    );
                    tokio::time::sleep(StdDuration::from_millis(50)).await;
                }
            }
        }
    }
}

/// What [`play`] did. The log then holds, in order: 0 the configuration, 1 `anonymised`,
/// 2 `consented`, 3 the refusal `consent_missing`, 4 the refusal `no_agreement`, 5 `other_org`,
/// 6 `from_nca`; 7 entries in all.
struct History {
    /// NCSC → ICO, an anonymised threat assessment: accepted without consent.
    anonymised: pb::Receipt,
    /// The envelope of `anonymised`, to send again.
    anonymised_envelope: pb::Envelope,
    /// NCSC → ICO, an incident record about [`ORG`] with the desk's consent: accepted.
    consented: pb::Receipt,
    /// The message id of NCSC → ICO about [`ORG`] without a token: `CONSENT_MISSING`.
    consent_missing: String,
    /// The message id of NCA → NCSC, which no agreement permits: `NO_AGREEMENT`.
    no_agreement: String,
    /// NCSC → ICO, an incident record about [`OTHER_ORG`] with consent: accepted.
    other_org: pb::Receipt,
    /// NCA → ICO, an anonymised threat assessment: accepted.
    from_nca: pb::Receipt,
}

/// The log size after [`play`].
const PLAYED: u64 = 7;

fn envelope(recipient: &str, kind: pb::MessageKind, org: &str, token: String) -> pb::Envelope {
    pb::Envelope {
        message_id: MessageId::new_random().to_string(),
        recipients: vec![recipient.into()],
        kind: kind as i32,
        organisation: org.into(),
        incident_ref: INCIDENT.into(),
        content_type: "application/json".into(),
        tlp: pb::Tlp::Amber as i32,
        payload: PAYLOAD.to_vec(),
        consent_token: token,
        ..Default::default()
    }
}

/// A token from the NCSC desk: `org` consents to NCSC sending the incident record to the ICO.
fn consent(desk: &SecretKey, org: &str) -> String {
    ConsentClaims::builder(org, "ncsc", "Joint response to the phishing incident INC-7")
        .recipient("ico")
        .kind(Kind::IncidentRecord)
        .incident_ref(INCIDENT)
        .payload(PAYLOAD)
        .valid_for(Duration::hours(1))
        .build(desk.key_id(), OffsetDateTime::now_utc())
        .unwrap()
        .sign(desk)
        .unwrap()
}

async fn accepted(client: &Broker, e: pb::Envelope) -> pb::Receipt {
    match client.exchange().send(e).await {
        Ok(receipt) => receipt.into_inner(),
        Err(status) => panic!(
            "expected acceptance, got {:?} {:?}: {}",
            status.code(),
            reason_of(&status),
            status.message()
        ),
    }
}

/// Sends `e`, expecting the refusal `reason`; returns the message id.
async fn refused(client: &Broker, e: pb::Envelope, reason: &str) -> String {
    let id = e.message_id.clone();
    match client.exchange().send(e).await {
        Ok(receipt) => panic!("expected {reason}, got receipt {receipt:?}"),
        Err(status) => assert_eq!(reason_of(&status).as_deref(), Some(reason), "{status:?}"),
    }
    id
}

/// Plays the exchange described at [`History`], one send at a time.
async fn play(site: &mut Site) -> History {
    use pb::MessageKind::{IncidentRecord, ThreatAssessment};
    let ncsc = site.client("ncsc").await;
    let nca = site.client("nca").await;
    let anonymised_envelope = envelope("ico", ThreatAssessment, "", String::new());
    let anonymised = accepted(&ncsc, anonymised_envelope.clone()).await;
    let consented = accepted(
        &ncsc,
        envelope("ico", IncidentRecord, ORG, consent(&site.desk, ORG)),
    )
    .await;
    let consent_missing = refused(
        &ncsc,
        envelope("ico", IncidentRecord, ORG, String::new()),
        "CONSENT_MISSING",
    )
    .await;
    let no_agreement = refused(
        &nca,
        envelope("ncsc", ThreatAssessment, "", String::new()),
        "NO_AGREEMENT",
    )
    .await;
    let other_org = accepted(
        &ncsc,
        envelope(
            "ico",
            IncidentRecord,
            OTHER_ORG,
            consent(&site.desk, OTHER_ORG),
        ),
    )
    .await;
    let from_nca = accepted(&nca, envelope("ico", ThreatAssessment, "", String::new())).await;
    History {
        anonymised,
        anonymised_envelope,
        consented,
        consent_missing,
        no_agreement,
        other_org,
        from_nca,
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the log

fn hashes(proof: &[Vec<u8>]) -> Vec<Hash> {
    proof.iter().map(|h| Hash::from_slice(h).unwrap()).collect()
}

/// The latest checkpoint note and the log's entries, through `Audit.Export`.
async fn export(client: &Broker, request: pb::ExportRequest) -> (String, Vec<pb::ExportRecord>) {
    let mut stream = client.audit().export(request).await.unwrap().into_inner();
    let mut note = None;
    let mut records = Vec::new();
    while let Some(item) = stream.next().await {
        match item.unwrap().item {
            Some(pb::export_item::Item::Checkpoint(n)) => {
                assert!(note.is_none(), "two checkpoints in one export");
                note = Some(n);
            }
            Some(pb::export_item::Item::Record(r)) => records.push(r),
            None => panic!("an empty export item"),
        }
    }
    (note.expect("the export has no checkpoint"), records)
}

/// The latest checkpoint and its consistency proof from `from_size`.
async fn checkpoint_rpc(
    client: &Broker,
    from_size: u64,
    to_size: u64,
) -> Result<pb::CheckpointResponse, tonic::Status> {
    client
        .audit()
        .checkpoint(pb::CheckpointRequest { from_size, to_size })
        .await
        .map(tonic::Response::into_inner)
}

/// The latest checkpoint note.
async fn latest(client: &Broker) -> String {
    checkpoint_rpc(client, 0, 0).await.unwrap().checkpoint
}

/// The index of the refusal of message `message_id`, and the refusal.
fn find_refusal(records: &[pb::ExportRecord], message_id: &str) -> (u64, pb::TransferRefused) {
    let found: Vec<_> = records
        .iter()
        .filter_map(|r| match audit::decode(&r.entry).unwrap().event {
            Some(Event::TransferRefused(t))
                if t.envelope.as_ref().unwrap().message_id == message_id =>
            {
                Some((r.index, t))
            }
            _ => None,
        })
        .collect();
    assert_eq!(found.len(), 1, "refusals of {message_id}: {found:?}");
    found.into_iter().next().unwrap()
}

// ---------------------------------------------------------------------------------------------
// 1. Receipts carry proofs

/// Every accepted send's receipt carries its entry (the transfer it names), a checkpoint signed
/// by the log key, and an inclusion proof that holds for exactly that entry and index; a retry
/// gets the same entry proved against the latest checkpoint; refusals are in the log with their
/// reason; and the whole log recomputes to the checkpoint's root.
#[tokio::test]
async fn receipts_prove_their_entry_under_a_signed_checkpoint() {
    let mut site = Site::start().await;
    let history = play(&mut site).await;
    let stranger = LogSigner::generate(DEFAULT_ORIGIN).unwrap().verifier();
    let receipts = [
        ("anonymised", &history.anonymised, 1),
        ("consented", &history.consented, 2),
        ("other organisation", &history.other_org, 5),
        ("from the NCA", &history.from_nca, 6),
    ];
    for (what, receipt, index) in receipts {
        let proof = receipt
            .audit
            .as_ref()
            .unwrap_or_else(|| panic!("{what}: the receipt carries no audit proof"));
        assert_eq!(proof.log_index, index, "{what}");
        let entry = audit::decode(&proof.entry).unwrap();
        let Some(Event::TransferAccepted(a)) = &entry.event else {
            panic!("{what}: the receipt's entry is {entry:?}");
        };
        assert_eq!(a.transfer_id, receipt.transfer_id, "{what}");
        let facts = a.envelope.as_ref().unwrap();
        assert_eq!(facts.message_id, receipt.message_id, "{what}");
        assert_eq!(facts.consent_jti, receipt.consent_jti, "{what}");
        assert_eq!(facts.payload_size, PAYLOAD.len() as u64, "{what}");
        assert_eq!(a.authorities, receipt.authorities, "{what}");

        let cp = checkpoint::open(&proof.checkpoint, &site.key).unwrap();
        assert_eq!(cp.origin(), DEFAULT_ORIGIN);
        assert!(proof.log_index < cp.size(), "{what}: {} entries", cp.size());
        assert!(
            checkpoint::open(&proof.checkpoint, &stranger).is_err(),
            "{what}: another key opened the checkpoint"
        );
        let path = hashes(&proof.inclusion_proof);
        let leaf = merkle::leaf_hash(&proof.entry);
        merkle::check_record(&path, cp.size(), cp.root(), proof.log_index, &leaf)
            .unwrap_or_else(|e| panic!("{what}: inclusion proof rejected: {e}"));
        // The proof holds for this entry at this index only.
        let mut other = proof.entry.clone();
        *other.last_mut().unwrap() ^= 1;
        assert!(
            merkle::check_record(
                &path,
                cp.size(),
                cp.root(),
                proof.log_index,
                &merkle::leaf_hash(&other)
            )
            .is_err(),
            "{what}: the proof holds for a changed entry"
        );
        assert!(
            merkle::check_record(&path, cp.size(), cp.root(), proof.log_index - 1, &leaf).is_err(),
            "{what}: the proof holds at another index"
        );
    }
    // The consented entry names the token and the agreement that allowed it.
    assert!(!history.consented.consent_jti.is_empty());
    assert_eq!(history.consented.authorities.len(), 1);
    assert_eq!(history.consented.authorities[0].agreement_id, MOU_ICO_NCSC);
    assert_eq!(history.consented.authorities[0].clause, CLAUSE_NCSC_ICO);

    // A retry is answered with the first receipt, its entry proved under the latest checkpoint.
    let ncsc = site.client("ncsc").await;
    let again = accepted(&ncsc, history.anonymised_envelope.clone()).await;
    assert!(again.duplicate);
    assert_eq!(again.transfer_id, history.anonymised.transfer_id);
    let proof = again.audit.as_ref().unwrap();
    let first = history.anonymised.audit.as_ref().unwrap();
    assert_eq!(
        (proof.log_index, &proof.entry),
        (first.log_index, &first.entry)
    );
    let cp = checkpoint::open(&proof.checkpoint, &site.key).unwrap();
    assert_eq!(
        cp.size(),
        PLAYED,
        "the retry's proof is not against the latest checkpoint"
    );
    merkle::check_record(
        &hashes(&proof.inclusion_proof),
        cp.size(),
        cp.root(),
        proof.log_index,
        &merkle::leaf_hash(&proof.entry),
    )
    .unwrap();

    // Refusals are logged with their reason, sender and organisation.
    let auditor = site.client("auditor").await;
    let (note, records) = export(&auditor, pb::ExportRequest::default()).await;
    let cp = checkpoint::open(&note, &site.key).unwrap();
    assert_eq!(cp.size(), PLAYED);
    let indices: Vec<u64> = records.iter().map(|r| r.index).collect();
    assert_eq!(indices, (0..PLAYED).collect::<Vec<_>>());
    let cases = [
        (&history.consent_missing, 3, "CONSENT_MISSING", "ncsc", ORG),
        (&history.no_agreement, 4, "NO_AGREEMENT", "nca", ""),
    ];
    for (message_id, index, reason, sender, org) in cases {
        let (found, refusal) = find_refusal(&records, message_id);
        assert_eq!(found, index, "{reason}");
        assert_eq!(refusal.reason, reason);
        assert!(!refusal.message.is_empty(), "{reason}: no message");
        let facts = refusal.envelope.unwrap();
        assert_eq!(
            (facts.sender.as_str(), facts.organisation.as_str()),
            (sender, org)
        );
        assert!(facts.consent_jti.is_empty());
    }
    // A full export carries no proofs; its leaves recompute to the checkpoint's root.
    assert!(records.iter().all(|r| r.inclusion_proof.is_empty()));
    let mut root = audit_file::RootBuilder::default();
    for r in &records {
        root.push(merkle::leaf_hash(&r.entry));
    }
    assert_eq!(&root.root(), cp.root());
    site.broker.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// The CLI

/// The PKI files the CLI needs to reach the broker as the auditor.
struct CliFiles {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    url: String,
}

impl CliFiles {
    fn write(site: &mut Site) -> CliFiles {
        CliFiles::write_for(site, "auditor")
    }

    /// The files of `cn`'s certificate (an agency's, or the auditor's).
    fn write_for(site: &mut Site, cn: &str) -> CliFiles {
        let dir = site.dir.path().join(format!("{cn}-pki"));
        fs::create_dir_all(&dir).unwrap();
        let issued = site.pki.client_cert(cn).unwrap();
        let files = CliFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{cn}.pem")),
            key: dir.join(format!("{cn}.key")),
            url: format!("https://localhost:{}", site.broker.addr.port()),
        };
        fs::write(&files.ca, site.pki.ca_pem()).unwrap();
        fs::write(&files.cert, &issued.cert_pem).unwrap();
        fs::write(&files.key, &issued.key_pem).unwrap();
        files
    }

    /// `concordat audit export --out OUT EXTRA… --broker … --ca … --cert … --key …`.
    async fn export(&self, out: &Path, extra: &[&str]) -> String {
        let mut args = vec!["audit".into(), "export".into(), "--out".into(), path(out)];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend([
            "--broker".into(),
            self.url.clone(),
            "--ca".into(),
            path(&self.ca),
            "--cert".into(),
            path(&self.cert),
            "--key".into(),
            path(&self.key),
        ]);
        let (status, stdout, stderr) = concordat(args).await;
        assert!(
            status.success(),
            "export {extra:?}: {status}\n{stdout}\n{stderr}"
        );
        stdout
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// Runs the `concordat` CLI; returns its exit status, standard output and standard error. Fails
/// the test (killing the process) if it runs longer than [`TIMEOUT`].
async fn concordat(args: Vec<String>) -> (ExitStatus, String, String) {
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Seek};
        let exe = binary("concordat").unwrap();
        let mut stdout = tempfile::tempfile().unwrap();
        let mut stderr = tempfile::tempfile().unwrap();
        let mut child = Command::new(&exe)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(stdout.try_clone().unwrap())
            .stderr(stderr.try_clone().unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("concordat {args:?} ran longer than {TIMEOUT:?}");
            }
            std::thread::sleep(StdDuration::from_millis(20));
        };
        let read = |f: &mut fs::File| {
            let mut s = String::new();
            f.rewind().unwrap();
            f.read_to_string(&mut s).unwrap();
            s
        };
        (status, read(&mut stdout), read(&mut stderr))
    })
    .await
    .unwrap()
}

/// `concordat audit verify FILE --log-key KEY`.
async fn cli_verify(file: &Path, key: &LogVerifier) -> (ExitStatus, String) {
    let (status, stdout, stderr) = concordat(vec![
        "audit".into(),
        "verify".into(),
        path(file),
        "--log-key".into(),
        key.to_string(),
    ])
    .await;
    (status, format!("{stdout}{stderr}"))
}

/// The head and entry lines of a JSON Lines export.
fn read_jsonl(file: &Path) -> (Value, Vec<Value>) {
    let text = fs::read_to_string(file).unwrap();
    let mut lines = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap());
    let head = lines.next().expect("an empty export");
    (head, lines.collect())
}

fn index_of(line: &Value) -> u64 {
    line["index"].as_u64().unwrap()
}

// ---------------------------------------------------------------------------------------------
// 2. Export and verify round trip

/// A full JSON Lines export holds every entry without proofs and verifies; so does a CSV export;
/// filtered exports (`--org`, `--agency`, `--reason`) hold exactly the matching entries, each with
/// an inclusion proof, and verify. The verifier refuses the wrong log key.
#[tokio::test]
async fn exports_round_trip_through_the_cli_verifier() {
    let mut site = Site::start().await;
    let history = play(&mut site).await;
    let cli = CliFiles::write(&mut site);
    let out = site.dir.path().join("exports");
    fs::create_dir_all(&out).unwrap();

    let full = out.join("full.jsonl");
    let said = cli.export(&full, &[]).await;
    assert!(said.contains("wrote 7 entries of a log of 7"), "{said}");
    let (head, lines) = read_jsonl(&full);
    assert_eq!(head["partial"], json!(false));
    let cp = checkpoint::open(head["checkpoint"].as_str().unwrap(), &site.key).unwrap();
    assert_eq!(cp.size(), PLAYED);
    assert_eq!(
        lines.iter().map(index_of).collect::<Vec<_>>(),
        (0..PLAYED).collect::<Vec<_>>()
    );
    assert!(lines.iter().all(|l| l.get("proof").is_none()));
    assert_eq!(lines[2]["decoded"]["event"], "transfer_accepted");
    assert_eq!(
        lines[2]["decoded"]["details"]["transfer_id"],
        json!(history.consented.transfer_id)
    );
    assert_eq!(lines[3]["decoded"]["details"]["reason"], "CONSENT_MISSING");
    let (status, said) = cli_verify(&full, &site.key).await;
    assert!(status.success(), "{said}");
    assert!(said.starts_with("OK:"), "{said}");
    assert!(
        said.contains("7 entries") && said.contains("root recomputed"),
        "{said}"
    );

    // The same file under another log key fails on its checkpoint line.
    let stranger = LogSigner::generate(DEFAULT_ORIGIN).unwrap().verifier();
    let (status, said) = cli_verify(&full, &stranger).await;
    assert_eq!(status.code(), Some(1), "{said}");
    assert!(
        said.contains("FAILED") && said.contains("line 1:"),
        "{said}"
    );

    // Every export is logged when it ends: the CSV export finds the JSON one's entry.
    let csv = out.join("full.csv");
    cli.export(&csv, &["--format", "csv"]).await;
    let text = fs::read_to_string(&csv).unwrap();
    assert!(
        text.starts_with("index,entry,proof,decoded\ncheckpoint,"),
        "{text}"
    );
    assert_eq!(text.lines().count(), 2 + PLAYED as usize + 1);
    assert!(text.lines().last().unwrap().contains("audit_exported"));
    let (status, said) = cli_verify(&csv, &site.key).await;
    assert!(status.success() && said.starts_with("OK:"), "{said}");
    assert!(said.contains("8 entries"), "{said}");

    let index = |r: &pb::Receipt| r.audit.as_ref().unwrap().log_index;
    let filters: [(&[&str], BTreeSet<u64>); 4] = [
        (&["--org", ORG], [index(&history.consented), 3].into()),
        (&["--agency", "nca"], [4, index(&history.from_nca)].into()),
        (&["--reason", "CONSENT_MISSING"], [3].into()),
        (&["--org", OTHER_ORG], [index(&history.other_org)].into()),
    ];
    // The refusals are where the History says.
    let (_, records) = export(&site.client("auditor").await, Default::default()).await;
    assert_eq!(find_refusal(&records, &history.consent_missing).0, 3);
    assert_eq!(find_refusal(&records, &history.no_agreement).0, 4);
    for (n, (args, expected)) in filters.iter().enumerate() {
        let file = out.join(format!("filtered-{n}.jsonl"));
        let said = cli.export(&file, args).await;
        assert!(said.contains("partial"), "{args:?}: {said}");
        let (head, lines) = read_jsonl(&file);
        assert_eq!(head["partial"], json!(true), "{args:?}");
        let found: BTreeSet<u64> = lines.iter().map(index_of).collect();
        assert_eq!(&found, expected, "{args:?}");
        assert_eq!(found.len(), lines.len(), "{args:?}: an entry appears twice");
        for line in &lines {
            let proof = line["proof"].as_array().map_or(0, Vec::len);
            assert!(proof > 0, "{args:?}: entry {} has no proof", index_of(line));
        }
        let (status, said) = cli_verify(&file, &site.key).await;
        assert!(
            status.success() && said.starts_with("OK:"),
            "{args:?}: {said}"
        );
        assert!(
            said.contains(&format!("{} entr", expected.len())),
            "{args:?}: {said}"
        );
    }
    site.broker.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 3. Tampering

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (RFC 4648 §4), as in exports.
fn b64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(BASE64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn b64_decode(text: &str) -> Vec<u8> {
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0u32);
    for c in text.bytes().filter(|c| *c != b'=') {
        let v = BASE64.iter().position(|x| *x == c).expect("not base64") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// Which export a tampering row starts from.
#[derive(Debug, Clone, Copy)]
enum Source {
    /// The whole log: head on line 1, entry `i` on line `i + 2`.
    Full,
    /// `agency = ncsc`: entries 1 to 5 on lines 2 to 6, each with a 3-hash proof.
    Partial,
}

/// `text` with the JSON of its (1-based) line `line` edited by `f`.
fn edit(text: &str, line: usize, f: impl FnOnce(&mut Value)) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let mut v: Value = serde_json::from_str(&lines[line - 1]).unwrap();
    f(&mut v);
    lines[line - 1] = serde_json::to_string(&v).unwrap();
    lines.join("\n") + "\n"
}

/// `text` with its lines rearranged by `f`.
fn relines(text: &str, f: impl FnOnce(&mut Vec<&str>)) -> String {
    let mut lines: Vec<&str> = text.lines().collect();
    f(&mut lines);
    lines.join("\n") + "\n"
}

/// Changes the last byte of an entry line's entry (within its last string or number, so the
/// entry still decodes); with `rederive`, rewrites `decoded` to match, so only the hashes can
/// tell.
fn flip_entry(v: &mut Value, rederive: bool) {
    let mut bytes = b64_decode(v["entry"].as_str().unwrap());
    *bytes.last_mut().unwrap() ^= 1;
    v["entry"] = json!(b64_encode(&bytes));
    if rederive {
        let entry = audit::decode(&bytes).expect("the changed entry still decodes");
        v["decoded"] = audit::to_json(&entry);
    }
}

fn flip_hash(h: &mut Value) {
    let mut bytes = b64_decode(h.as_str().unwrap());
    bytes[7] ^= 0x80;
    *h = json!(b64_encode(&bytes));
}

/// Every change to an export fails verification, naming the line (0: the file as a whole).
/// Rows run through the library verifier; two of them also through `concordat audit verify`.
#[tokio::test]
async fn every_tampering_fails_verification_and_names_its_line() {
    let mut site = Site::start().await;
    play(&mut site).await;
    let auditor = site.client("auditor").await;
    let dir = site.dir.path().join("tamper");
    fs::create_dir_all(&dir).unwrap();
    let full_path = dir.join("full.jsonl");
    let partial_path = dir.join("partial.jsonl");
    audit_file::export(
        &auditor,
        pb::ExportRequest::default(),
        &full_path,
        Format::Jsonl,
    )
    .await
    .unwrap();
    audit_file::export(
        &auditor,
        pb::ExportRequest {
            agency: "ncsc".into(),
            ..Default::default()
        },
        &partial_path,
        Format::Jsonl,
    )
    .await
    .unwrap();
    let full = fs::read_to_string(&full_path).unwrap();
    let partial = fs::read_to_string(&partial_path).unwrap();

    // The untouched exports verify, and are what the rows assume.
    let key = &site.key;
    let ok = audit_file::verify(&full_path, key).unwrap().unwrap();
    assert_eq!((ok.entries, ok.partial), (PLAYED, false));
    let ok = audit_file::verify(&partial_path, key).unwrap().unwrap();
    assert_eq!((ok.entries, ok.partial), (5, true));
    let (head, lines) = read_jsonl(&partial_path);
    assert_eq!(
        lines.iter().map(index_of).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert!(
        lines
            .iter()
            .all(|l| l["proof"].as_array().unwrap().len() == 3)
    );
    let entry = lines[0]["entry"].as_str().unwrap();
    assert_eq!(b64_encode(&b64_decode(entry)), entry);

    // The partial export came after the full one, whose own entry it sees: its tree has one
    // entry more.
    let partial_cp = checkpoint::open(head["checkpoint"].as_str().unwrap(), key).unwrap();
    assert_eq!(partial_cp.size(), PLAYED + 1);
    // Checkpoints of the full export's size: one by another key, and a fork by the log's own key.
    let (full_head, _) = read_jsonl(&full_path);
    let cp = checkpoint::open(full_head["checkpoint"].as_str().unwrap(), key).unwrap();
    let stranger = LogSigner::generate(DEFAULT_ORIGIN).unwrap();
    let same = Checkpoint::new(DEFAULT_ORIGIN, cp.size(), *cp.root()).unwrap();
    let by_stranger = checkpoint::sign(&same, &stranger).unwrap();
    let secret = fs::read_to_string(site.data_dir().join(audit_log::LOG_KEY_FILE)).unwrap();
    let log_signer = LogSigner::from_secret_string(secret.trim()).unwrap();
    let mut other_root = *cp.root();
    other_root.0[0] ^= 1;
    let fork = Checkpoint::new(DEFAULT_ORIGIN, cp.size(), other_root).unwrap();
    let forked = checkpoint::sign(&fork, &log_signer).unwrap();
    checkpoint::open(&forked, key).expect("the fork's signature is valid");

    type Tamper = Box<dyn Fn(&str) -> String>;
    let rows: Vec<(&str, Source, Tamper, u64, &str)> = vec![
        (
            "an entry's byte changed",
            Source::Full,
            Box::new(|t| edit(t, 4, |v| flip_entry(v, false))),
            4,
            "entry 2: the decoded fields do not match the entry bytes",
        ),
        (
            "an entry's byte changed, decoded fields to match",
            Source::Full,
            Box::new(|t| edit(t, 4, |v| flip_entry(v, true))),
            0,
            "the recomputed tree root differs from the checkpoint's",
        ),
        (
            "an entry's byte changed, decoded fields to match",
            Source::Partial,
            Box::new(|t| edit(t, 3, |v| flip_entry(v, true))),
            3,
            "entry 2 is not in the checkpoint's tree",
        ),
        (
            "a decoded field changed",
            Source::Full,
            Box::new(|t| {
                edit(t, 4, |v| {
                    v["decoded"]["details"]["envelope"]["organisation"] = json!(OTHER_ORG);
                })
            }),
            4,
            "entry 2: the decoded fields do not match the entry bytes",
        ),
        (
            "an entry dropped",
            Source::Full,
            Box::new(|t| {
                relines(t, |l| {
                    l.remove(4);
                })
            }),
            5,
            "expected entry 3 of a full export, found entry 4",
        ),
        (
            "an entry dropped, the index renumbered",
            Source::Full,
            Box::new(|t| {
                let t = relines(t, |l| {
                    l.remove(4);
                });
                let t = edit(&t, 5, |v| v["index"] = json!(3));
                let t = edit(&t, 6, |v| v["index"] = json!(4));
                edit(&t, 7, |v| v["index"] = json!(5))
            }),
            0,
            "a full export must hold 7 entries; this one holds 6",
        ),
        (
            "two entries swapped",
            Source::Full,
            Box::new(|t| relines(t, |l| l.swap(4, 5))),
            5,
            "expected entry 3 of a full export, found entry 4",
        ),
        (
            "two entries swapped",
            Source::Partial,
            Box::new(|t| relines(t, |l| l.swap(2, 3))),
            4,
            "entry 2 is out of order",
        ),
        (
            "an entry repeated",
            Source::Partial,
            Box::new(|t| relines(t, |l| l.insert(3, l[2]))),
            4,
            "entry 2 is out of order",
        ),
        (
            "the last entry cut off",
            Source::Full,
            Box::new(|t| {
                relines(t, |l| {
                    l.pop();
                })
            }),
            0,
            "a full export must hold 7 entries; this one holds 6",
        ),
        (
            "truncated in the middle of a line",
            Source::Full,
            Box::new(|t| t[..t.len() - 12].to_owned()),
            8,
            "not an entry record",
        ),
        (
            "truncated in the middle of a line",
            Source::Partial,
            Box::new(|t| t[..t.len() - 12].to_owned()),
            6,
            "not an entry record",
        ),
        (
            "truncated inside the head",
            Source::Full,
            Box::new(|t| t[..40].to_owned()),
            1,
            "not a checkpoint record",
        ),
        (
            "emptied",
            Source::Full,
            Box::new(|_| String::new()),
            0,
            "the file is empty",
        ),
        (
            "the checkpoint re-signed by another key",
            Source::Full,
            Box::new(move |t| edit(t, 1, |v| v["checkpoint"] = json!(by_stranger))),
            1,
            "the checkpoint does not verify with this log key",
        ),
        (
            "a forked checkpoint signed by the log key",
            Source::Full,
            Box::new({
                let forked = forked.clone();
                move |t| edit(t, 1, |v| v["checkpoint"] = json!(forked))
            }),
            0,
            "the recomputed tree root differs from the checkpoint's",
        ),
        (
            "a forked checkpoint signed by the log key",
            Source::Partial,
            Box::new(move |t| edit(t, 1, |v| v["checkpoint"] = json!(forked))),
            2,
            "entry 1 is not in the checkpoint's tree",
        ),
        (
            "a middle proof hash changed",
            Source::Partial,
            Box::new(|t| edit(t, 4, |v| flip_hash(&mut v["proof"][1]))),
            4,
            "entry 3 is not in the checkpoint's tree",
        ),
        (
            "a proof hash appended",
            Source::Partial,
            Box::new(|t| {
                edit(t, 4, |v| {
                    let first = v["proof"][0].clone();
                    v["proof"].as_array_mut().unwrap().push(first);
                })
            }),
            4,
            "entry 3 is not in the checkpoint's tree",
        ),
        (
            "a proof hash removed",
            Source::Partial,
            Box::new(|t| {
                edit(t, 4, |v| {
                    v["proof"].as_array_mut().unwrap().pop();
                })
            }),
            4,
            "entry 3 is not in the checkpoint's tree",
        ),
        (
            "a proof hash cut short",
            Source::Partial,
            Box::new(|t| edit(t, 4, |v| v["proof"][1] = json!("AAAA"))),
            4,
            "entry 3: a proof hash is malformed",
        ),
        (
            "an entry's index changed",
            Source::Partial,
            Box::new(|t| edit(t, 4, |v| v["index"] = json!(4))),
            4,
            "entry 4 is not in the checkpoint's tree",
        ),
        (
            "an index beyond the checkpoint",
            Source::Partial,
            Box::new(|t| edit(t, 6, |v| v["index"] = json!(PLAYED + 1))),
            6,
            "entry 8 is beyond the checkpoint's size 8",
        ),
        (
            "a full export marked partial",
            Source::Full,
            Box::new(|t| edit(t, 1, |v| v["partial"] = json!(true))),
            2,
            "entry 0 is not in the checkpoint's tree",
        ),
        (
            "a partial export marked full",
            Source::Partial,
            Box::new(|t| edit(t, 1, |v| v["partial"] = json!(false))),
            2,
            "expected entry 0 of a full export, found entry 1",
        ),
    ];
    let mut written = HashMap::new();
    for (n, (what, source, tamper, line, problem)) in rows.iter().enumerate() {
        let original = match source {
            Source::Full => &full,
            Source::Partial => &partial,
        };
        let changed = tamper(original);
        assert_ne!(&changed, original, "{what} ({source:?}): nothing changed");
        let file = dir.join(format!("row-{n}.jsonl"));
        fs::write(&file, &changed).unwrap();
        let err = match audit_file::verify(&file, key).unwrap() {
            Ok(v) => panic!("{what} ({source:?}) verified: {v:?}"),
            Err(e) => e,
        };
        assert_eq!(err.line, *line, "{what} ({source:?}): {err}");
        assert!(
            err.problem.contains(problem),
            "{what} ({source:?}): {err}; expected {problem:?}"
        );
        written.insert((*what, format!("{source:?}")), (file, *line));
    }

    // The CLI reports the same: exit status 1 and the line.
    for row in [
        (
            "an entry's byte changed, decoded fields to match",
            "Partial",
        ),
        ("the checkpoint re-signed by another key", "Full"),
        ("two entries swapped", "Full"),
    ] {
        let (file, line) = &written[&(row.0, row.1.to_owned())];
        let (status, said) = cli_verify(file, key).await;
        assert_eq!(status.code(), Some(1), "{row:?}: {said}");
        assert!(said.starts_with("FAILED:"), "{row:?}: {said}");
        assert!(said.contains(&format!("line {line}:")), "{row:?}: {said}");
    }

    // A CSV export names its records by line too: the header is line 1, the checkpoint line 2,
    // entry 1 (the first to cite a clause) line 4.
    let csv_path = dir.join("full.csv");
    audit_file::export(
        &auditor,
        pb::ExportRequest::default(),
        &csv_path,
        Format::Csv,
    )
    .await
    .unwrap();
    let csv = fs::read_to_string(&csv_path).unwrap();
    let clause = format!(r#"""clause"":""{CLAUSE_NCSC_ICO}"""#);
    assert!(csv.lines().nth(3).unwrap().contains(&clause), "{csv}");
    let changed = csv.replacen(&clause, r#"""clause"":""9.9"""#, 1);
    let tampered = dir.join("tampered.csv");
    fs::write(&tampered, changed).unwrap();
    let (status, said) = cli_verify(&tampered, key).await;
    assert_eq!(status.code(), Some(1), "{said}");
    assert!(
        said.contains("line 4: entry 1: the decoded fields do not match the entry bytes"),
        "{said}"
    );
    site.broker.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 4. Explain

/// `concordat audit explain --index N --file EXPORT` says, for the consented transfer, ACCEPTED,
/// the agreement and clause, and the consent token's jti and issuer; for the refusals, REFUSED
/// and the rule's reason code; and fails for an index the file does not hold.
#[tokio::test]
async fn explain_says_why_in_words() {
    let mut site = Site::start().await;
    let history = play(&mut site).await;
    let cli = CliFiles::write(&mut site);
    let file = site.dir.path().join("explain.jsonl");
    cli.export(&file, &[]).await;
    let explain = |index: u64| {
        let file = path(&file);
        async move {
            concordat(vec![
                "audit".into(),
                "explain".into(),
                "--index".into(),
                index.to_string(),
                "--file".into(),
                file,
            ])
            .await
        }
    };

    let consented = &history.consented;
    let (status, words, stderr) = explain(consented.audit.as_ref().unwrap().log_index).await;
    assert!(status.success(), "{words}{stderr}");
    for expected in [
        "ACCEPTED",
        consented.transfer_id.as_str(),
        consented.message_id.as_str(),
        MOU_ICO_NCSC,
        &format!("clause: {CLAUSE_NCSC_ICO}"),
        ORG,
        consented.consent_jti.as_str(),
        consented.consent_issuer.as_str(),
    ] {
        assert!(
            words.contains(expected),
            "{expected:?} missing from:\n{words}"
        );
    }
    assert!(!words.contains("REFUSED"), "{words}");

    let refusals = [
        (3, "CONSENT_MISSING", &history.consent_missing),
        (4, "NO_AGREEMENT", &history.no_agreement),
    ];
    for (index, reason, message_id) in refusals {
        let (status, words, stderr) = explain(index).await;
        assert!(status.success(), "{words}{stderr}");
        for expected in ["REFUSED", reason, message_id.as_str()] {
            assert!(
                words.contains(expected),
                "{expected:?} missing from:\n{words}"
            );
        }
        assert!(!words.contains("ACCEPTED"), "{words}");
    }

    let (status, words, stderr) = explain(PLAYED + 5).await;
    assert!(!status.success(), "an absent entry was explained: {words}");
    assert!(stderr.contains("entry 12 is not in"), "{stderr}");
    site.broker.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 5. The witness

/// An agent for `ncsc` running in this process.
struct Agent {
    spool: PathBuf,
    stop: watch::Sender<bool>,
    task: JoinHandle<anyhow::Result<()>>,
    events: mpsc::UnboundedReceiver<AgentEvent>,
}

impl Agent {
    /// Starts the NCSC's agent against the site's broker, over `spool`, checking receipts with
    /// the log key.
    fn start(site: &mut Site, spool: &Path) -> Agent {
        Agent::start_as(site, spool, "ncsc")
    }

    /// [`Agent::start`] for agency `cn`.
    fn start_as(site: &mut Site, spool: &Path, cn: &str) -> Agent {
        let cert = site.pki.client_cert(cn).unwrap();
        Spool::open(spool).unwrap();
        let settings = AgentSettings {
            tls: site.pki.client_tls(site.broker.addr, &cert),
            spool: spool.to_path_buf(),
            min_backoff: StdDuration::from_millis(50),
            max_backoff: StdDuration::from_secs(1),
            window: 16,
            log_key: Some(site.key.clone()),
        };
        let (stop, stop_rx) = watch::channel(false);
        let (tx, events) = mpsc::unbounded_channel();
        Agent {
            spool: spool.to_path_buf(),
            stop,
            task: tokio::spawn(daemon::run(settings, stop_rx, Some(tx))),
            events,
        }
    }

    /// Drops an anonymised threat assessment for the ICO into the outbox as `name`.
    fn drop_file(&self, name: &str) {
        let message = json!({
            "recipients": ["ico"],
            "kind": "threat_assessment",
            "tlp": "green",
            "payload": {"file": name},
        });
        atomic_write(
            &self.spool.join("outbox"),
            name,
            &serde_json::to_vec(&message).unwrap(),
        )
        .unwrap();
    }

    /// The next event, or `None` once `deadline` passes.
    async fn next_event(&mut self, deadline: tokio::time::Instant) -> Option<AgentEvent> {
        match tokio::time::timeout_at(deadline, self.events.recv()).await {
            Ok(Some(event)) => Some(event),
            Ok(None) => {
                let ended = (&mut self.task).await;
                panic!("the agent stopped: {ended:?}")
            }
            Err(_) => None,
        }
    }

    /// Waits for outbox file `name` to be sent; fails on an alarm or any other outcome for it.
    async fn sent(&mut self, name: &str, within: StdDuration) -> pb::Receipt {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match self.next_event(deadline).await {
                None => panic!("{name} was not sent within {within:?}"),
                Some(AgentEvent::Sent { file, receipt, .. }) if file == name => return *receipt,
                Some(AgentEvent::Alarm { message }) => panic!("unexpected alarm: {message}"),
                Some(e @ (AgentEvent::Refused { .. } | AgentEvent::Failed { .. })) => {
                    panic!("unexpected outcome: {e:?}")
                }
                Some(_) => {}
            }
        }
    }

    /// Waits for an alarm; returns its message.
    async fn alarm(&mut self) -> String {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            match self.next_event(deadline).await {
                None => panic!("no alarm within {TIMEOUT:?}"),
                Some(AgentEvent::Alarm { message }) => return message,
                Some(_) => {}
            }
        }
    }

    /// Watches for [`QUIET`]: nothing may become of outbox file `name`.
    async fn nothing_becomes_of(&mut self, name: &str) {
        let deadline = tokio::time::Instant::now() + QUIET;
        while let Some(event) = self.next_event(deadline).await {
            if let AgentEvent::Sent { file, .. }
            | AgentEvent::Refused { file, .. }
            | AgentEvent::Failed { file, .. } = &event
            {
                assert_ne!(file, name, "{name} was handled after the alarm: {event:?}");
            }
        }
        assert!(
            self.spool.join("outbox").join(name).exists(),
            "{name} left the outbox"
        );
        assert!(!self.spool.join("sent").join(name).exists());
    }

    /// The checkpoint the witness keeps in `.state/checkpoint`.
    fn witnessed(&self, key: &LogVerifier) -> Checkpoint {
        let note = fs::read_to_string(self.spool.join(".state").join("checkpoint")).unwrap();
        checkpoint::open(&note, key).unwrap()
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        tokio::time::timeout(TIMEOUT, self.task)
            .await
            .expect("the agent did not stop")
            .unwrap()
            .unwrap();
    }
}

fn receipt_checkpoint(receipt: &pb::Receipt, key: &LogVerifier) -> Checkpoint {
    checkpoint::open(&receipt.audit.as_ref().unwrap().checkpoint, key).unwrap()
}

/// The agent's witness after a rewritten history: it witnessed broker A's log after sending
/// `witnessed_files` files; A's database was then lost but its key kept, and a new broker on the
/// same data directory, signing with the same key, took `others` transfers from the NCA before
/// the agent's next file. Returns the agent (running, its next file `02.json` dropped), the new
/// site and the checkpoint witnessed before.
async fn rewritten_history(witnessed_files: usize, others: usize) -> (Agent, Site, Checkpoint) {
    let mut site = Site::start().await;
    let spool = site.dir.path().join("ncsc-spool");
    let mut agent = Agent::start(&mut site, &spool);
    let mut last = None;
    for n in 0..witnessed_files {
        let name = format!("01-{n}.json");
        agent.drop_file(&name);
        last = Some(agent.sent(&name, TIMEOUT).await);
    }
    let witnessed = agent.witnessed(&site.key);
    assert_eq!(witnessed, receipt_checkpoint(&last.unwrap(), &site.key));
    // The configuration entry and one per file.
    assert_eq!(witnessed.size(), 1 + witnessed_files as u64);
    agent.stop().await;

    let mut site = site.restart(true).await;
    let nca = site.client("nca").await;
    for _ in 0..others {
        accepted(
            &nca,
            envelope("ico", pb::MessageKind::ThreatAssessment, "", String::new()),
        )
        .await;
    }
    let auditor = site.client("auditor").await;
    let cp = checkpoint::open(&latest(&auditor).await, &site.key).unwrap();
    assert_eq!(cp.size(), 1 + others as u64, "a new history");

    let agent = Agent::start(&mut site, &spool);
    agent.drop_file("02.json");
    (agent, site, witnessed)
}

/// A rewritten history signed with the right key is caught whether the next receipt's checkpoint
/// is larger than the witnessed one (no consistency proof can exist) or of the same size (two
/// roots for one size): the agent raises an alarm, keeps the witnessed checkpoint, and sends
/// nothing more; files wait in the outbox.
#[tokio::test]
async fn the_witness_alarms_on_a_rewritten_history_and_stops_sending() {
    // (files A took, transfers B took before the agent's next file, the alarm's words)
    let cases = [
        (
            1,
            2,
            "checkpoint of size 4 is not consistent with the one of size 2",
        ),
        (
            1,
            0,
            "two checkpoints of size 2 with different roots (a fork)",
        ),
    ];
    for (witnessed_files, others, expected) in cases {
        let (mut agent, site, witnessed) = rewritten_history(witnessed_files, others).await;
        let alarm = agent.alarm().await;
        assert!(alarm.contains(expected), "{alarm}");
        assert_eq!(
            agent.witnessed(&site.key),
            witnessed,
            "the witness adopted the rewritten history"
        );
        agent.drop_file("03.json");
        agent.nothing_becomes_of("03.json").await;
        agent.stop().await;
        site.broker.stop().await.unwrap();
    }
}

/// A history rolled back below the witnessed checkpoint: the new broker's checkpoint is smaller
/// than the witnessed one, and the broker cannot prove the witnessed tree extends it (it refuses
/// `Audit.Checkpoint` with `to_size` beyond its log). That is a log that shrank, which an honest
/// broker never shows; the witness should raise an alarm at once rather than keep sending.
#[tokio::test]
async fn the_witness_alarms_on_a_history_rolled_back_below_its_checkpoint() {
    let (mut agent, site, witnessed) = rewritten_history(3, 0).await;
    assert_eq!(witnessed.size(), 4);
    // The witness checks a receipt before reporting the file sent: the alarm comes first.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        match agent.next_event(deadline).await {
            None => panic!("02.json had no outcome within {TIMEOUT:?}"),
            Some(AgentEvent::Alarm { .. }) => break,
            Some(AgentEvent::Sent { file, receipt, .. }) => panic!(
                "{file} went into a log of {} entries, without an alarm, after the witness saw {}",
                receipt_checkpoint(&receipt, &site.key).size(),
                witnessed.size()
            ),
            Some(_) => {}
        }
    }
    agent.drop_file("03.json");
    agent.nothing_becomes_of("03.json").await;
    agent.stop().await;
    site.broker.stop().await.unwrap();
}

/// The control: over an honest restart (database kept), the agent's next receipt extends the
/// witnessed checkpoint, there is no alarm, and a file dropped afterwards is sent within the
/// window in which the alarmed agent above sends nothing.
#[tokio::test]
async fn the_witness_accepts_an_honest_restart() {
    let mut site = Site::start().await;
    let spool = site.dir.path().join("ncsc-spool");
    let mut agent = Agent::start(&mut site, &spool);
    agent.drop_file("01.json");
    agent.sent("01.json", TIMEOUT).await;
    let witnessed = agent.witnessed(&site.key);
    agent.stop().await;

    let mut site = site.restart(false).await;
    let mut agent = Agent::start(&mut site, &spool);
    agent.drop_file("02.json");
    let second = agent.sent("02.json", TIMEOUT).await;
    let now = agent.witnessed(&site.key);
    assert_eq!(now, receipt_checkpoint(&second, &site.key));
    assert!(now.size() > witnessed.size(), "{now:?} after {witnessed:?}");
    let auditor = site.client("auditor").await;
    let proof = checkpoint_rpc(&auditor, witnessed.size(), now.size())
        .await
        .unwrap()
        .consistency_proof;
    checkpoint::check_consistent(&witnessed, &now, &hashes(&proof)).unwrap();

    agent.drop_file("03.json");
    agent.sent("03.json", TIMEOUT).await;
    agent.stop().await;
    site.broker.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 6. Audit.Checkpoint

/// `Audit.Checkpoint` returns the latest checkpoint and a consistency proof between the sizes
/// asked for, which `check_consistent` accepts for those checkpoints and no others; sizes out of
/// order or beyond the log are refused as `MALFORMED`.
#[tokio::test]
async fn checkpoint_rpc_proves_consistency_and_refuses_impossible_sizes() {
    let mut site = Site::start().await;
    let history = play(&mut site).await;
    let key = site.key.clone();
    let early = receipt_checkpoint(&history.anonymised, &key);
    let middle = receipt_checkpoint(&history.other_org, &key);
    assert_eq!((early.size(), middle.size()), (2, 6));
    let auditor = site.client("auditor").await;

    let to_latest = checkpoint_rpc(&auditor, early.size(), 0).await.unwrap();
    let newest = checkpoint::open(&to_latest.checkpoint, &key).unwrap();
    assert_eq!(newest.size(), PLAYED);
    let proof = hashes(&to_latest.consistency_proof);
    assert!(!proof.is_empty());
    checkpoint::check_consistent(&early, &newest, &proof).unwrap();
    // The proof is for those two trees only.
    assert!(checkpoint::check_consistent(&middle, &newest, &proof).is_err());
    let mut bent = proof.clone();
    bent[0].0[3] ^= 1;
    assert!(checkpoint::check_consistent(&early, &newest, &bent).is_err());
    assert!(checkpoint::check_consistent(&early, &newest, &proof[1..]).is_err());

    // Between two older sizes: the proof fits the receipts' checkpoints.
    let between = checkpoint_rpc(&auditor, early.size(), middle.size())
        .await
        .unwrap();
    let proof = hashes(&between.consistency_proof);
    checkpoint::check_consistent(&early, &middle, &proof).unwrap();
    assert!(checkpoint::check_consistent(&early, &newest, &proof).is_err());

    // Equal sizes need no proof.
    let same = checkpoint_rpc(&auditor, PLAYED, PLAYED).await.unwrap();
    assert!(same.consistency_proof.is_empty());
    checkpoint::check_consistent(&newest, &newest, &[]).unwrap();

    // Agencies ask too: the witness does.
    let ncsc = site.client("ncsc").await;
    checkpoint_rpc(&ncsc, early.size(), 0).await.unwrap();

    for case in 0..4 {
        // Each refusal is logged, so the log grows by one entry with each.
        let size = checkpoint::open(&latest(&auditor).await, &key)
            .unwrap()
            .size();
        let (from, to) = [(6, 3), (2, size + 1), (size + 1, 0), (size + 1, size + 2)][case];
        let status = checkpoint_rpc(&auditor, from, to).await.unwrap_err();
        assert_eq!(
            reason_of(&status).as_deref(),
            Some("MALFORMED"),
            "from {from} to {to}: {status:?}"
        );
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    site.broker.stop().await.unwrap();
}

/// Retries racing their first attempt all get the first receipt, its entry proved under a
/// signed checkpoint: a duplicate is never answered before the first attempt's batch is sealed
/// and flushed (else an agent's witness would raise an alarm against an honest broker, and the
/// retry would hold a receipt for a transfer not yet on disk).
#[tokio::test]
async fn racing_retries_all_get_a_proved_receipt() {
    let mut site = Site::start().await;
    let ncsc = site.client("ncsc").await;
    for round in 0..20 {
        let e = envelope("ico", pb::MessageKind::ThreatAssessment, "", String::new());
        let sends: Vec<JoinHandle<pb::Receipt>> = (0..16)
            .map(|_| {
                let (ncsc, e) = (ncsc.clone(), e.clone());
                tokio::spawn(async move { accepted(&ncsc, e).await })
            })
            .collect();
        let mut receipts = Vec::new();
        for send in sends {
            receipts.push(send.await.unwrap());
        }
        assert_eq!(receipts.iter().filter(|r| !r.duplicate).count(), 1);
        for r in &receipts {
            assert_eq!(r.transfer_id, receipts[0].transfer_id);
            let proof = r.audit.as_ref().unwrap();
            let cp = checkpoint::open(&proof.checkpoint, &site.key).unwrap_or_else(|e| {
                panic!(
                    "round {round}: a {} receipt for entry {} carries no valid checkpoint \
                     ({e}): {:?}",
                    if r.duplicate { "duplicate" } else { "first" },
                    proof.log_index,
                    proof.checkpoint
                )
            });
            merkle::check_record(
                &hashes(&proof.inclusion_proof),
                cp.size(),
                cp.root(),
                proof.log_index,
                &merkle::leaf_hash(&proof.entry),
            )
            .unwrap();
        }
    }
    site.broker.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Evidence an agency keeps: its own export, revocations by organisation, delivery proofs

/// The events of `records`, decoded.
fn decoded(records: &[pb::ExportRecord]) -> Vec<(u64, pb::AuditEntry)> {
    records
        .iter()
        .map(|r| (r.index, audit::decode(&r.entry).unwrap()))
        .collect()
}

/// Whether `entry` names `agency` anywhere an auditor's `--agency` filter looks.
fn involves(entry: &pb::AuditEntry, agency: &str) -> bool {
    audit::Filter {
        agency: Some(agency.into()),
        ..Default::default()
    }
    .matches(entry)
}

/// An agency exports, with its own certificate, exactly the entries it is a party to, each
/// with its inclusion proof against the export's checkpoint, and `concordat audit verify`
/// checks the file offline. A third agency's transfers never appear (NCA → ICO), nor a refused
/// send merely addressed to it (NCA → NCSC, `NO_AGREEMENT`); asking for another agency's
/// entries is refused with `NOT_AUTHORISED`, and logged; the auditor still gets everything.
#[tokio::test]
async fn an_agency_exports_its_own_entries_and_no_others() {
    let mut site = Site::start().await;
    let history = play(&mut site).await;
    let ncsc = site.client("ncsc").await;
    let auditor = site.client("auditor").await;

    let (note, records) = export(&ncsc, pb::ExportRequest::default()).await;
    let cp = checkpoint::open(&note, &site.key).unwrap();
    let entries = decoded(&records);
    let indexes: Vec<u64> = entries.iter().map(|(i, _)| *i).collect();
    // Its three accepted sends (anonymised, consented, other_org) and its refused one.
    let accepted_ids: BTreeSet<&str> = entries
        .iter()
        .filter_map(|(_, e)| match &e.event {
            Some(Event::TransferAccepted(a)) => Some(a.transfer_id.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        accepted_ids,
        BTreeSet::from([
            history.anonymised.transfer_id.as_str(),
            history.consented.transfer_id.as_str(),
            history.other_org.transfer_id.as_str(),
        ])
    );
    assert_eq!(indexes, vec![1, 2, 3, 5], "{entries:?}");
    let (_, refusal) = find_refusal(&records, &history.consent_missing);
    assert_eq!(refusal.reason, "CONSENT_MISSING");
    for (record, (index, entry)) in records.iter().zip(&entries) {
        assert!(involves(entry, "ncsc"), "{index}: {entry:?}");
        merkle::check_record(
            &hashes(&record.inclusion_proof),
            cp.size(),
            cp.root(),
            *index,
            &merkle::leaf_hash(&record.entry),
        )
        .unwrap_or_else(|e| panic!("entry {index}: {e}"));
    }
    // The NCA's own view: its accepted transfer and its refused send, never the NCSC's.
    let nca = site.client("nca").await;
    let (_, nca_records) = export(&nca, pb::ExportRequest::default()).await;
    let nca_indexes: Vec<u64> = nca_records.iter().map(|r| r.index).collect();
    assert_eq!(nca_indexes, vec![4, 6]);
    // The ICO, recipient of every accepted transfer, sees those and no refusal.
    let ico = site.client("ico").await;
    let (_, ico_records) = export(&ico, pb::ExportRequest::default()).await;
    let ico_indexes: Vec<u64> = ico_records.iter().map(|r| r.index).collect();
    assert_eq!(ico_indexes, vec![1, 2, 5, 6]);
    // Naming itself changes nothing; naming another agency is refused.
    let (_, own) = export(
        &ncsc,
        pb::ExportRequest {
            agency: "ncsc".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        own.iter().map(|r| r.index).collect::<Vec<_>>()[..4],
        [1, 2, 3, 5]
    );
    let status = ncsc
        .audit()
        .export(pb::ExportRequest {
            agency: "nca".into(),
            ..Default::default()
        })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(
        reason_of(&status).as_deref(),
        Some("NOT_AUTHORISED"),
        "{status:?}"
    );
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    // The refusal and the agencies' exports are in the log, which the auditor reads whole.
    let (_, all) = export(&auditor, pb::ExportRequest::default()).await;
    let all = decoded(&all);
    assert!(all.iter().any(|(_, e)| matches!(&e.event,
        Some(Event::CallRefused(c)) if c.caller == "ncsc" && c.reason == "NOT_AUTHORISED" && c.rpc == "Audit.Export")));
    assert!(all.iter().any(|(_, e)| matches!(&e.event,
        Some(Event::AuditExported(x)) if x.auditor == "nca" && x.complete)));
    // A later export of the NCSC holds its own exports and its refused call, still no NCA entry.
    let (_, later) = export(&ncsc, pb::ExportRequest::default()).await;
    for (index, entry) in decoded(&later) {
        assert!(involves(&entry, "ncsc"), "{index}: {entry:?}");
        assert!(
            !matches!(&entry.event, Some(Event::TransferAccepted(a)) if a.transfer_id == history.from_nca.transfer_id),
            "the NCA's transfer leaked into the NCSC's export"
        );
    }

    // Through the CLI with the agency's certificate, and verified offline.
    let cli = CliFiles::write_for(&mut site, "ncsc");
    let out = site.dir.path().join("ncsc-export.jsonl");
    let said = cli.export(&out, &[]).await;
    assert!(said.contains("partial"), "{said}");
    let (head, lines) = read_jsonl(&out);
    assert_eq!(head["partial"], json!(true));
    assert!(lines.iter().all(|l| l["proof"].is_array()));
    assert!(
        lines
            .iter()
            .all(|l| l["decoded"]["event"] != json!("transfer_accepted")
                || l["decoded"]["details"]["envelope"]["sender"] == json!("ncsc")),
        "{lines:?}"
    );
    let (status, said) = cli_verify(&out, &site.key).await;
    assert!(status.success(), "{said}");
    assert!(said.starts_with("OK"), "{said}");
    site.broker.stop().await.unwrap();
}

/// `--org` keeps the revocation of that organisation's consent and the recall notices it
/// queued, and leaves out the revocation of another organisation's.
#[tokio::test]
async fn an_organisation_export_includes_revocations_of_its_consents() {
    let mut site = Site::start().await;
    let history = play(&mut site).await;
    let ncsc = site.client("ncsc").await;
    let auditor = site.client("auditor").await;
    let revoke = |org_receipt: &pb::Receipt| {
        let jti = org_receipt.consent_jti.parse().unwrap();
        concordat_proto::consent::Revocation::new(
            site.desk.key_id(),
            concordat_proto::consent::RevocationTarget::Token(jti),
            OffsetDateTime::now_utc(),
        )
        .unwrap()
        .sign(&site.desk)
        .unwrap()
    };
    for receipt in [&history.consented, &history.other_org] {
        let answer = ncsc
            .consent()
            .revoke(pb::RevokeRequest {
                revocation: revoke(receipt),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.recall_notices, 1);
    }
    let (_, records) = export(
        &auditor,
        pb::ExportRequest {
            organisation: ORG.into(),
            ..Default::default()
        },
    )
    .await;
    let entries = decoded(&records);
    let revocations: Vec<&pb::ConsentRevoked> = entries
        .iter()
        .filter_map(|(_, e)| match &e.event {
            Some(Event::ConsentRevoked(r)) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(revocations.len(), 1, "{entries:?}");
    assert_eq!(revocations[0].jti, history.consented.consent_jti);
    assert_eq!(revocations[0].organisations, vec![ORG.to_owned()]);
    assert!(entries.iter().any(|(_, e)| matches!(&e.event,
        Some(Event::RecallQueued(q)) if q.transfer_id == history.consented.transfer_id)));
    assert!(!entries.iter().any(|(_, e)| matches!(&e.event,
        Some(Event::RecallQueued(q)) if q.transfer_id == history.other_org.transfer_id)));
    // The decoded view names the organisations, and explain says whose consent it was.
    let index = entries
        .iter()
        .find(|(_, e)| matches!(e.event, Some(Event::ConsentRevoked(_))))
        .unwrap()
        .0;
    let entry = &entries.iter().find(|(i, _)| *i == index).unwrap().1;
    assert_eq!(
        audit::to_json(entry)["details"]["organisations"],
        json!([ORG])
    );
    assert!(audit::explain(index, entry).contains(&format!("of {ORG}")));
    site.broker.stop().await.unwrap();
}

/// Every delivery carries the proof of the entry it was queued under, under one signed
/// checkpoint: a transfer its `transfer_accepted` entry (naming this payload's SHA-256, sender
/// and recipients), a recall notice its `recall_queued` entry; each verifies offline with the
/// log key, and the proof of one delivery does not verify another.
#[tokio::test]
async fn deliveries_carry_the_proof_of_their_entry() {
    use concordat_agent::witness::{DeliveryClaim, verify_delivery};
    let mut site = Site::start().await;
    let history = play(&mut site).await;
    let ncsc = site.client("ncsc").await;
    let jti = history.consented.consent_jti.parse().unwrap();
    let revocation = concordat_proto::consent::Revocation::new(
        site.desk.key_id(),
        concordat_proto::consent::RevocationTarget::Token(jti),
        OffsetDateTime::now_utc(),
    )
    .unwrap()
    .sign(&site.desk)
    .unwrap();
    ncsc.consent()
        .revoke(pb::RevokeRequest { revocation })
        .await
        .unwrap();
    let ico = site.client("ico").await;
    let mut stream = ico
        .exchange()
        .subscribe(pb::SubscribeRequest { window: 16 })
        .await
        .unwrap()
        .into_inner();
    // Four transfers (anonymised, consented, other_org, from_nca) and one recall notice.
    let mut deliveries = Vec::new();
    while deliveries.len() < 5 {
        let next = tokio::time::timeout(TIMEOUT, stream.next())
            .await
            .expect("a delivery")
            .unwrap()
            .unwrap();
        deliveries.push(next);
    }
    let mut transfers = BTreeSet::new();
    let mut recalls = 0;
    for d in &deliveries {
        let body = d.body.as_ref().unwrap();
        let proof = d.audit.as_ref().expect("every delivery carries a proof");
        let claim = DeliveryClaim::of(body);
        verify_delivery(&site.key, &claim, proof).unwrap_or_else(|e| panic!("{d:?}: {e}"));
        match body {
            pb::delivery::Body::Transfer(t) => {
                transfers.insert(t.transfer_id.clone());
                let receipt = [
                    &history.anonymised,
                    &history.consented,
                    &history.other_org,
                    &history.from_nca,
                ]
                .into_iter()
                .find(|r| r.transfer_id == t.transfer_id)
                .unwrap();
                // The same entry as the sender's receipt.
                assert_eq!(proof.log_index, receipt.audit.as_ref().unwrap().log_index);
                // Another payload, or another sender, does not verify with this proof.
                let mut other = t.clone();
                other.payload.push(b' ');
                let forged = DeliveryClaim::of(&pb::delivery::Body::Transfer(other));
                assert!(verify_delivery(&site.key, &forged, proof).is_err());
                let mut other = t.clone();
                other.sender = if t.sender == "nca" { "ncsc" } else { "nca" }.into();
                let forged = DeliveryClaim::of(&pb::delivery::Body::Transfer(other));
                assert!(verify_delivery(&site.key, &forged, proof).is_err());
            }
            pb::delivery::Body::RecallNotice(n) => {
                recalls += 1;
                assert_eq!(n.transfer_id, history.consented.transfer_id);
                let entry = audit::decode(&proof.entry).unwrap();
                assert!(matches!(entry.event, Some(Event::RecallQueued(_))));
            }
            pb::delivery::Body::Notice(n) => panic!("an unexpected notice {n:?}"),
        }
    }
    assert_eq!(transfers.len(), 4);
    assert_eq!(recalls, 1);
    // All proved against one checkpoint, and a stranger's key verifies none.
    let notes: BTreeSet<&str> = deliveries
        .iter()
        .map(|d| d.audit.as_ref().unwrap().checkpoint.as_str())
        .collect();
    assert_eq!(notes.len(), 1, "one checkpoint per batch");
    let stranger = LogSigner::generate(DEFAULT_ORIGIN).unwrap().verifier();
    let d = &deliveries[0];
    assert!(
        verify_delivery(
            &stranger,
            &DeliveryClaim::of(d.body.as_ref().unwrap()),
            d.audit.as_ref().unwrap()
        )
        .is_err()
    );
    site.broker.stop().await.unwrap();
}

/// The recipient's agent is a witness too: it checks each delivery's proof against the
/// checkpoints it has seen before writing and acknowledging it. Deliveries from an honest broker
/// land in the inbox with their proofs; after the broker's history is rewritten under the same
/// key, the next delivery raises an alarm and is neither written nor acknowledged.
#[tokio::test]
async fn the_recipients_witness_refuses_a_delivery_from_a_rewritten_history() {
    let mut site = Site::start().await;
    let spool = site.dir.path().join("ico-spool");
    let ncsc = site.client("ncsc").await;
    for _ in 0..2 {
        accepted(
            &ncsc,
            envelope("ico", pb::MessageKind::ThreatAssessment, "", String::new()),
        )
        .await;
    }
    let mut ico = Agent::start_as(&mut site, &spool, "ico");
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let mut stored = Vec::new();
    while stored.len() < 2 {
        match ico.next_event(deadline).await {
            Some(AgentEvent::Delivered { path, .. }) => stored.push(path),
            Some(AgentEvent::Alarm { message }) => panic!("unexpected alarm: {message}"),
            Some(_) => {}
            None => panic!("the deliveries were not stored within {TIMEOUT:?}"),
        }
    }
    for path in &stored {
        let file: Value = serde_json::from_slice(&fs::read(path).unwrap()).unwrap();
        assert!(file["proof"]["entry"].is_string(), "{file}");
    }
    let witnessed = ico.witnessed(&site.key);
    ico.stop().await;

    let mut site = site.restart(true).await;
    let nca = site.client("nca").await;
    let rewritten = accepted(
        &nca,
        envelope("ico", pb::MessageKind::ThreatAssessment, "", String::new()),
    )
    .await;
    let mut ico = Agent::start_as(&mut site, &spool, "ico");
    let alarm = ico.alarm().await;
    assert!(alarm.contains("size"), "{alarm}");
    assert_eq!(ico.witnessed(&site.key), witnessed);
    let inbox: Vec<String> = fs::read_dir(spool.join("inbox"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(inbox.len(), 2, "{inbox:?}");
    ico.stop().await;
    // Not acknowledged: the new history holds no acknowledgement of it.
    let auditor = site.client("auditor").await;
    let (_, records) = export(&auditor, pb::ExportRequest::default()).await;
    assert!(!decoded(&records).iter().any(|(_, e)| matches!(&e.event,
        Some(Event::Acknowledged(a)) if a.transfer_id == rewritten.transfer_id)));
    site.broker.stop().await.unwrap();
}
