//! The audit log across crashes, with a real broker process: killed with SIGKILL while sixteen
//! senders keep it busy and restarted on the same data directory, it has lost no acknowledged
//! transfer's entry, its tree still verifies, and its new checkpoints extend the last one any
//! sender saw before the crash.
//!
//! The senders are in-process gRPC clients of the `nca` agency, each sending threat assessments
//! to the ICO under fresh message ids, one at a time, until a send fails. A receipt is an
//! acknowledgement: its proof is checked as it arrives. A send that got no receipt is retried,
//! as an agent would, after the restart: whether or not its first attempt reached the disk, the
//! message must end with exactly one `transfer_accepted` entry.
//!
//! SIGKILL leaves the kernel's page cache intact, and sled hands each transaction's log buffer
//! to the kernel when the next one starts: this test shows that nothing is answered before its
//! transaction committed and that recovery keeps the log consistent, not that the flush reached
//! the disk (with the writer's `sync` removed it still passes; that needs power-loss testing).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use concordat_agent::client::Broker;
use concordat_broker::{
    audit_log::{self, DEFAULT_ORIGIN},
    config::Limits,
    refusal::reason_of,
    store::{SledStorage, Storage},
};
use concordat_cli::audit_file::{self, Format};
use concordat_proto::{
    audit,
    checkpoint::{self, Checkpoint, LogVerifier},
    ids::MessageId,
    merkle::{self, Hash},
    pb::{self, audit_entry::Event},
};
use concordat_tests::{
    TestPki,
    process::{BrokerProcess, PkiFiles, wait_for, write_broker_config},
};
use serde_json::Value;
use tokio::{runtime::Runtime, task::JoinHandle};

/// How many sends are in flight at once.
const SENDERS: usize = 16;
/// How many times the broker is killed.
const KILLS: usize = 3;
/// How many new receipts each round waits for before the kill.
const RECEIPTS_PER_ROUND: usize = 400;
/// Fresh sends after each restart, besides the retries, so that new checkpoints are signed.
const FRESH_AFTER_RESTART: usize = 8;
/// How long one send may take while the broker is up.
const SEND_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the senders may take to produce a round's receipts.
const LOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the broker may take to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// An acknowledged transfer, as its receipt described it (after checking its proof).
#[derive(Debug, Clone)]
struct Acked {
    transfer_id: String,
    log_index: u64,
    /// The entry's bytes, as the receipt carried them.
    entry: Vec<u8>,
}

/// What the senders have seen.
#[derive(Default)]
struct Load {
    /// Every message id ever sent.
    sent: BTreeSet<String>,
    /// The acknowledged transfers, by message id.
    acked: BTreeMap<String, Acked>,
    /// Envelopes whose send got no receipt, to be retried after the restart.
    unanswered: Vec<pb::Envelope>,
    /// The checkpoint of the largest size carried by any receipt so far.
    newest: Option<Checkpoint>,
    /// What went wrong: receipts that do not verify, refusals, sends that failed while the
    /// broker was up. The test fails if any.
    problems: Vec<String>,
}

impl Load {
    /// Checks `receipt` for the message `message_id` and records it.
    fn record(&mut self, key: &LogVerifier, message_id: &str, receipt: &pb::Receipt) {
        match check_receipt(key, message_id, receipt) {
            Ok((acked, cp)) => {
                if self.newest.as_ref().is_none_or(|n| cp.size() > n.size()) {
                    self.newest = Some(cp);
                }
                if let Some(earlier) = self.acked.insert(message_id.to_owned(), acked) {
                    self.problems.push(format!(
                        "{message_id}: a second receipt (first {earlier:?})"
                    ));
                }
            }
            Err(e) => self.problems.push(format!("{message_id}: {e}")),
        }
    }

    fn lock(load: &Mutex<Load>) -> std::sync::MutexGuard<'_, Load> {
        load.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn hashes(proof: &[Vec<u8>]) -> Result<Vec<Hash>, String> {
    proof
        .iter()
        .map(|h| Hash::from_slice(h).map_err(|e| format!("a proof hash: {e}")))
        .collect()
}

/// Checks a receipt as an agent's witness would: its checkpoint is signed by the log key, its
/// inclusion proof holds for its entry at its index, and its entry is the acceptance of this
/// message as the transfer the receipt names.
fn check_receipt(
    key: &LogVerifier,
    message_id: &str,
    r: &pb::Receipt,
) -> Result<(Acked, Checkpoint), String> {
    if r.message_id != message_id {
        return Err(format!("the receipt is for message {}", r.message_id));
    }
    let proof = r.audit.as_ref().ok_or("the receipt has no audit proof")?;
    let cp = checkpoint::open(&proof.checkpoint, key)
        .map_err(|e| format!("the receipt's checkpoint does not verify: {e}"))?;
    merkle::check_record(
        &hashes(&proof.inclusion_proof)?,
        cp.size(),
        cp.root(),
        proof.log_index,
        &merkle::leaf_hash(&proof.entry),
    )
    .map_err(|e| {
        format!(
            "entry {} is not proved in the tree of {}: {e}",
            proof.log_index,
            cp.size()
        )
    })?;
    check_acceptance(&proof.entry, message_id, &r.transfer_id)?;
    Ok((
        Acked {
            transfer_id: r.transfer_id.clone(),
            log_index: proof.log_index,
            entry: proof.entry.clone(),
        },
        cp,
    ))
}

/// Checks that `bytes` decode to the acceptance of `message_id` from the NCA as `transfer_id`.
fn check_acceptance(bytes: &[u8], message_id: &str, transfer_id: &str) -> Result<(), String> {
    let entry = audit::decode(bytes).map_err(|e| format!("the entry does not decode: {e}"))?;
    let Some(Event::TransferAccepted(t)) = entry.event else {
        return Err(format!("the entry is not an acceptance: {entry:?}"));
    };
    let facts = t.envelope.unwrap_or_default();
    if t.transfer_id != transfer_id || facts.message_id != message_id || facts.sender != "nca" {
        return Err(format!(
            "the entry accepts {} from {} as {}, not {message_id} from nca as {transfer_id}",
            facts.message_id, facts.sender, t.transfer_id
        ));
    }
    Ok(())
}

/// A threat assessment from the NCA to the ICO under a fresh message id.
fn envelope(seq: usize) -> pb::Envelope {
    pb::Envelope {
        message_id: MessageId::new_random().to_string(),
        recipients: vec!["ico".into()],
        kind: pb::MessageKind::ThreatAssessment as i32,
        content_type: "application/json".into(),
        tlp: pb::Tlp::Amber as i32,
        payload: format!(r#"{{"seq":{seq},"summary":"assessment under load"}}"#).into_bytes(),
        ..Default::default()
    }
}

/// Sends one envelope, giving up after [`SEND_TIMEOUT`].
async fn send(client: &Broker, e: pb::Envelope) -> Result<pb::Receipt, String> {
    match tokio::time::timeout(SEND_TIMEOUT, client.exchange().send(e)).await {
        Ok(Ok(receipt)) => Ok(receipt.into_inner()),
        Ok(Err(status)) => Err(format!(
            "{:?} {:?}: {}",
            status.code(),
            reason_of(&status),
            status.message()
        )),
        Err(_) => Err(format!("no answer within {SEND_TIMEOUT:?}")),
    }
}

/// One sender: sends fresh envelopes one after another until a send fails, which must happen
/// only once `killed` is set (and then ends the sender).
async fn sender(
    client: Broker,
    key: LogVerifier,
    load: Arc<Mutex<Load>>,
    killed: Arc<AtomicBool>,
    first_seq: usize,
) {
    for seq in first_seq.. {
        let e = envelope(seq);
        let id = e.message_id.clone();
        Load::lock(&load).sent.insert(id.clone());
        match send(&client, e.clone()).await {
            Ok(receipt) => {
                let mut load = Load::lock(&load);
                load.record(&key, &id, &receipt);
                if receipt.duplicate {
                    load.problems
                        .push(format!("{id}: a fresh message id got a duplicate receipt"));
                }
            }
            Err(e_text) => {
                let mut load = Load::lock(&load);
                if !killed.load(Ordering::SeqCst) {
                    load.problems
                        .push(format!("{id}: failed while the broker was up: {e_text}"));
                }
                load.unanswered.push(e);
                return;
            }
        }
    }
}

/// The latest checkpoint (opened with `key`) and a consistency proof to it from `from`.
async fn consistency(
    client: &Broker,
    key: &LogVerifier,
    from: &Checkpoint,
    to_size: u64,
) -> (Checkpoint, Vec<Hash>) {
    let response = client
        .audit()
        .checkpoint(pb::CheckpointRequest {
            from_size: from.size(),
            to_size,
        })
        .await
        .unwrap()
        .into_inner();
    let latest = checkpoint::open(&response.checkpoint, key).unwrap();
    (latest, hashes(&response.consistency_proof).unwrap())
}

/// A round's numbers, for the summary.
struct Round {
    acked_before_kill: usize,
    unanswered: usize,
    committed_unanswered: usize,
    last_seen: u64,
    after_restart: u64,
}

/// Sixteen senders keep the broker busy; it is killed with SIGKILL mid-load (three times) and
/// restarted on the same data directory and port. After each restart, the unanswered sends are
/// retried and each gets a receipt whose proof holds, and the broker's latest checkpoint is
/// proved consistent with the largest checkpoint any receipt carried before the crash. At the
/// end, a full export verifies offline (every entry, recomputed root equal to the signed one),
/// is consistent with every pre-crash checkpoint, and holds every acknowledged transfer's entry
/// byte for byte at the index its receipt gave; every message sent has exactly one
/// `transfer_accepted` entry, and no other message has one; the stopped broker's own store
/// agrees on the size and the checkpoint.
#[test]
fn sigkill_under_load_keeps_every_acknowledged_entry_and_never_forks() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let mut pki = TestPki::new().unwrap();
    let files = PkiFiles::write(
        &mut pki,
        &dir.path().join("pki"),
        &["ico", "ncsc", "nca", "auditor"],
    )
    .unwrap();
    let data_dir = dir.path().join("data");
    fs::create_dir_all(&data_dir).unwrap();
    // Created before the broker starts, which then loads it.
    let key = audit_log::load_or_create_key(&data_dir, DEFAULT_ORIGIN)
        .unwrap()
        .verifier();
    let config = dir.path().join("broker.toml");
    write_broker_config(&config, &files, &data_dir, &Limits::default()).unwrap();
    let mut broker = BrokerProcess::start(&config, &data_dir).unwrap();
    let addr = broker.addr();
    let tls = |agency: &str| files.client(addr, agency).unwrap();
    let (nca, auditor) = (tls("nca"), tls("auditor"));
    let rt = Runtime::new().unwrap();
    let load = Arc::new(Mutex::new(Load::default()));
    let mut rounds = Vec::new();
    let mut seen_before_crashes: Vec<Checkpoint> = Vec::new();

    for round in 0..KILLS {
        // Load: the senders run on the runtime's workers while this thread waits and kills.
        let killed = Arc::new(AtomicBool::new(false));
        let target = Load::lock(&load).acked.len() + RECEIPTS_PER_ROUND;
        let senders: Vec<JoinHandle<()>> = rt.block_on(async {
            let mut senders = Vec::new();
            for i in 0..SENDERS {
                let client = nca.connect().await.unwrap();
                senders.push(tokio::spawn(sender(
                    client,
                    key.clone(),
                    load.clone(),
                    killed.clone(),
                    (round * SENDERS + i) * 1_000_000,
                )));
            }
            senders
        });
        wait_for(
            &format!("{target} receipts in round {round}"),
            LOAD_TIMEOUT,
            || {
                let load = Load::lock(&load);
                match load.acked.len() {
                    _ if !load.problems.is_empty() => Ok(()),
                    n if n >= target => Ok(()),
                    n => Err(format!("{n} receipts")),
                }
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", broker.log_tail(20)));
        assert_eq!(
            Load::lock(&load).problems,
            Vec::<String>::new(),
            "before the kill in round {round}\n{}",
            broker.log_tail(20)
        );

        killed.store(true, Ordering::SeqCst);
        broker.kill().unwrap();
        rt.block_on(async {
            for s in senders {
                tokio::time::timeout(SEND_TIMEOUT + Duration::from_secs(5), s)
                    .await
                    .expect("a sender did not stop after the kill")
                    .unwrap();
            }
        });
        let (old, retries, acked_before_kill) = {
            let mut load = Load::lock(&load);
            assert_eq!(load.problems, Vec::<String>::new(), "round {round}");
            assert_eq!(
                load.unanswered.len(),
                SENDERS,
                "every sender ends unanswered"
            );
            let retries = std::mem::take(&mut load.unanswered);
            (load.newest.clone().unwrap(), retries, load.acked.len())
        };
        seen_before_crashes.push(old.clone());

        // Restart on the same port and data; retry what got no answer, send a few more.
        broker.restart().unwrap();
        assert_eq!(broker.addr(), addr);
        let (latest, committed_unanswered) = rt.block_on(async {
            let client = nca.connect().await.unwrap();
            let retried: BTreeSet<String> = retries.iter().map(|e| e.message_id.clone()).collect();
            let mut sends = Vec::new();
            let fresh = (0..FRESH_AFTER_RESTART).map(|i| envelope(1_000_000_000 + round * 100 + i));
            for e in retries.into_iter().chain(fresh) {
                let client = client.clone();
                let id = e.message_id.clone();
                Load::lock(&load).sent.insert(id.clone());
                sends.push(tokio::spawn(async move { (id, send(&client, e).await) }));
            }
            let mut committed = 0;
            for s in sends {
                let (id, outcome) = s.await.unwrap();
                let receipt = outcome.unwrap_or_else(|e| {
                    panic!(
                        "{id} was refused after the restart: {e}\n{}",
                        broker.log_tail(20)
                    )
                });
                Load::lock(&load).record(&key, &id, &receipt);
                if receipt.duplicate {
                    // Only a retry can be a duplicate: its first attempt reached the disk but
                    // its answer never left the broker.
                    assert!(
                        retried.contains(&id),
                        "{id}: a fresh message is a duplicate"
                    );
                    committed += 1;
                }
            }
            let (latest, proof) = consistency(&client, &key, &old, 0).await;
            assert!(
                latest.size() > old.size(),
                "round {round}: the log did not grow past {} after the restart: {}",
                old.size(),
                latest.size()
            );
            checkpoint::check_consistent(&old, &latest, &proof).unwrap_or_else(|e| {
                panic!(
                    "round {round}: the checkpoint after the restart ({}) is not consistent \
                     with the last one seen before the crash ({}): {e}",
                    latest.size(),
                    old.size()
                )
            });
            (latest, committed)
        });
        let problems = std::mem::take(&mut Load::lock(&load).problems);
        assert_eq!(problems, Vec::<String>::new(), "after restart {round}");
        rounds.push(Round {
            acked_before_kill,
            unanswered: SENDERS,
            committed_unanswered,
            last_seen: old.size(),
            after_restart: latest.size(),
        });
    }

    // The whole log, exported by the auditor and verified offline.
    let path = dir.path().join("audit.jsonl");
    let (exported, consistent_with) = rt.block_on(async {
        let client = auditor.connect().await.unwrap();
        let summary =
            audit_file::export(&client, pb::ExportRequest::default(), &path, Format::Jsonl)
                .await
                .unwrap();
        assert!(!summary.partial, "{summary:?}");
        let mut proofs = Vec::new();
        for old in &seen_before_crashes {
            proofs.push(consistency(&client, &key, old, summary.tree_size).await);
        }
        (summary, proofs)
    });
    let verified = audit_file::verify(&path, &key)
        .unwrap()
        .unwrap_or_else(|e| panic!("the export does not verify: {e}"));
    assert!(!verified.partial);
    let head = verified.checkpoint;
    assert_eq!(head.size(), exported.tree_size);
    assert_eq!(
        verified.entries,
        head.size(),
        "a full export holds every entry"
    );
    for (old, (latest, proof)) in seen_before_crashes.iter().zip(&consistent_with) {
        // The export itself is logged when it ends: one entry more, nothing else.
        assert_eq!(
            latest.size(),
            head.size() + 1,
            "the log grew after the export by more than the export's own entry"
        );
        checkpoint::check_consistent(old, &head, proof).unwrap_or_else(|e| {
            panic!(
                "the export's checkpoint ({}) is not consistent with one seen before a crash \
                 ({}): {e}",
                head.size(),
                old.size()
            )
        });
    }

    // The export's entries, byte for byte.
    let text = fs::read_to_string(&path).unwrap();
    let mut lines = text.lines();
    let head_note: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    let mut entries: Vec<Vec<u8>> = Vec::new();
    for line in lines {
        let record: Value = serde_json::from_str(line).unwrap();
        assert_eq!(record["index"].as_u64(), Some(entries.len() as u64));
        entries.push(B64.decode(record["entry"].as_str().unwrap()).unwrap());
    }
    assert_eq!(entries.len() as u64, head.size());

    let load = Load::lock(&load);
    for (id, acked) in &load.acked {
        let index = usize::try_from(acked.log_index).unwrap();
        let stored = entries.get(index).unwrap_or_else(|| {
            panic!(
                "{id}: acknowledged at index {index}, beyond the log ({})",
                entries.len()
            )
        });
        assert!(
            *stored == acked.entry,
            "{id}: the entry at {index} differs from the one its receipt carried"
        );
        check_acceptance(stored, id, &acked.transfer_id).unwrap_or_else(|e| panic!("{id}: {e}"));
    }
    let mut accepted: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (index, bytes) in entries.iter().enumerate() {
        if let Some(Event::TransferAccepted(t)) = audit::decode(bytes).unwrap().event {
            accepted
                .entry(t.envelope.unwrap_or_default().message_id)
                .or_default()
                .push(index as u64);
        }
    }
    let twice: Vec<_> = accepted.iter().filter(|(_, at)| at.len() > 1).collect();
    assert!(twice.is_empty(), "accepted more than once: {twice:?}");
    let accepted_ids: BTreeSet<String> = accepted.keys().cloned().collect();
    let acked_ids: BTreeSet<String> = load.acked.keys().cloned().collect();
    assert_eq!(
        load.sent, acked_ids,
        "a message sent was never acknowledged"
    );
    assert_eq!(
        accepted_ids, load.sent,
        "the accepted entries and the messages sent differ"
    );

    // The broker's own store, once it is stopped, agrees with the export.
    let status = broker.terminate(STOP_TIMEOUT).unwrap();
    assert!(status.success(), "broker exited with {status}");
    // (It holds one entry more: the export's own, logged when the export ended.)
    let store = SledStorage::open(&data_dir, DEFAULT_ORIGIN).unwrap();
    assert_eq!(store.log_size().unwrap(), head.size() + 1);
    let last = audit::decode(&store.log_entry(head.size()).unwrap().unwrap()).unwrap();
    assert!(
        matches!(last.event, Some(Event::AuditExported(_))),
        "{last:?}"
    );
    let latest = store.latest_checkpoint().unwrap().unwrap();
    assert_eq!(latest.size, head.size() + 1);
    let exported_size = checkpoint::open(head_note["checkpoint"].as_str().unwrap(), &key)
        .unwrap()
        .size();
    assert_eq!(exported_size, head.size());
    let stored = store
        .log_entries(0, usize::try_from(head.size()).unwrap())
        .unwrap();
    assert!(
        stored == entries,
        "the store's entries differ from the export's"
    );

    let summary: Vec<String> = rounds
        .iter()
        .map(|r| {
            format!(
                "{} acked, killed with {} unanswered ({} of them committed), last seen {} -> {}",
                r.acked_before_kill,
                r.unanswered,
                r.committed_unanswered,
                r.last_seen,
                r.after_restart
            )
        })
        .collect();
    eprintln!(
        "audit crash test: {} messages, {} entries, {:?}; {}",
        load.sent.len(),
        head.size(),
        started.elapsed(),
        summary.join("; ")
    );
}
