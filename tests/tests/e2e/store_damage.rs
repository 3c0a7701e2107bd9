//! A damaged database is never served: with a real broker process, forty receipted transfers,
//! then one byte flipped in sled's files or the tail of the largest one cut off, the restarted
//! broker either refuses to start, with one error naming the recovered log and the last
//! published checkpoint, or has every receipted transfer and signs only checkpoints consistent
//! with the last one its receipts carried. It never starts on a log that lost acknowledged
//! entries, and never signs a second checkpoint of one size.
//!
//! Also here: the offline `concordat-broker verify` of a stopped broker's store, and the log
//! key, which is never made anew for a data directory that already holds a log.

use std::{
    fs,
    io::{Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use concordat_agent::client::{Broker, ClientTls};
use concordat_broker::{
    audit_log::{self, DEFAULT_ORIGIN},
    config::Limits,
};
use concordat_proto::{
    checkpoint::{self, Checkpoint, LogVerifier},
    ids::MessageId,
    merkle::{self, Hash},
    pb,
};
use concordat_tests::{
    binary,
    process::{BrokerProcess, PkiFiles, write_broker_files},
};
use tokio::runtime::Runtime;

/// How many transfers are receipted before the damage.
const TRANSFERS: usize = 40;
/// How long the broker may take to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// One broker with its files, for one damage case.
struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    files: PkiFiles,
    config: PathBuf,
    data_dir: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let data_dir = root.join("data");
        let (files, config) = write_broker_files(
            &root,
            &["ico", "nca", "auditor"],
            &data_dir,
            &Limits::default(),
        )
        .unwrap();
        Setup {
            _dir: dir,
            root,
            files,
            config,
            data_dir,
        }
    }

    fn tls(&self, broker: &BrokerProcess, agency: &str) -> ClientTls {
        self.files.client(broker.addr(), agency).unwrap()
    }
}

fn envelope(seq: usize) -> pb::Envelope {
    pb::Envelope {
        message_id: MessageId::new_random().to_string(),
        recipients: vec!["ico".into()],
        kind: pb::MessageKind::ThreatAssessment as i32,
        content_type: "application/json".into(),
        tlp: pb::Tlp::Amber as i32,
        payload: format!(r#"{{"seq":{seq},"summary":"{}"}}"#, "x".repeat(400)).into_bytes(),
        ..Default::default()
    }
}

/// A receipted transfer: its log index and entry, as the receipt proved them.
struct Receipted {
    index: u64,
    entry: Vec<u8>,
}

/// Sends [`TRANSFERS`] transfers one by one; returns what their receipts proved and the
/// largest checkpoint they carried.
async fn send_all(client: &Broker, key: &LogVerifier) -> (Vec<Receipted>, Checkpoint) {
    let mut receipted = Vec::new();
    let mut newest: Option<Checkpoint> = None;
    for seq in 0..TRANSFERS {
        let r = client
            .exchange()
            .send(envelope(seq))
            .await
            .unwrap()
            .into_inner();
        let proof = r.audit.unwrap();
        let cp = checkpoint::open(&proof.checkpoint, key).unwrap();
        let path: Vec<Hash> = proof
            .inclusion_proof
            .iter()
            .map(|h| Hash::from_slice(h).unwrap())
            .collect();
        merkle::check_record(
            &path,
            cp.size(),
            cp.root(),
            proof.log_index,
            &merkle::leaf_hash(&proof.entry),
        )
        .unwrap();
        receipted.push(Receipted {
            index: proof.log_index,
            entry: proof.entry,
        });
        if newest.as_ref().is_none_or(|n| cp.size() > n.size()) {
            newest = Some(cp);
        }
    }
    (receipted, newest.unwrap())
}

/// The largest regular file under `dir`.
fn largest_file(dir: &Path) -> PathBuf {
    let mut best: Option<(u64, PathBuf)> = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                stack.push(e.path());
            } else if best.as_ref().is_none_or(|(len, _)| meta.len() > *len) {
                best = Some((meta.len(), e.path()));
            }
        }
    }
    best.unwrap().1
}

/// How the store is damaged while the broker is stopped.
#[derive(Debug, Clone, Copy)]
enum Damage {
    /// One byte flipped in the middle of the largest file.
    FlipMiddle,
    /// One byte flipped at this offset of the largest file.
    FlipAt(u64),
    /// The last 4 KiB of the largest file cut off.
    CutTail,
    /// One byte flipped in every 512 bytes of the largest file's second half: sled's
    /// recovery surely loses part of the log.
    FlipSecondHalf,
}

fn damage(db: &Path, how: Damage) -> String {
    let file = largest_file(db);
    let len = fs::metadata(&file).unwrap().len();
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .unwrap();
    match how {
        Damage::FlipMiddle | Damage::FlipAt(_) => {
            let at = match how {
                Damage::FlipAt(at) => at.min(len - 1),
                _ => len / 2,
            };
            let mut byte = [0u8; 1];
            f.seek(SeekFrom::Start(at)).unwrap();
            std::io::Read::read_exact(&mut f, &mut byte).unwrap();
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(&[byte[0] ^ 0xff]).unwrap();
        }
        Damage::CutTail => f.set_len(len.saturating_sub(4096)).unwrap(),
        Damage::FlipSecondHalf => {
            let mut at = len / 2;
            while at < len {
                let mut byte = [0u8; 1];
                f.seek(SeekFrom::Start(at)).unwrap();
                std::io::Read::read_exact(&mut f, &mut byte).unwrap();
                f.seek(SeekFrom::Start(at)).unwrap();
                f.write_all(&[byte[0] ^ 0xff]).unwrap();
                at += 512;
            }
        }
    }
    f.sync_all().unwrap();
    format!("{how:?} of {} ({len} bytes)", file.display())
}

/// Runs one case: returns a description of what the restarted broker did, or panics with what
/// it did wrong.
fn case(how: Damage) -> String {
    let s = Setup::new();
    let rt = Runtime::new().unwrap();
    let mut broker = BrokerProcess::start(&s.config, &s.data_dir).unwrap();
    let key = audit_log::load_key(&s.data_dir, DEFAULT_ORIGIN)
        .unwrap()
        .verifier();
    let nca = s.tls(&broker, "nca");
    let (receipted, newest) = rt.block_on(async {
        let client = nca.connect().await.unwrap();
        send_all(&client, &key).await
    });
    let status = broker.terminate(STOP_TIMEOUT).unwrap();
    assert!(status.success(), "{status}");
    let what = damage(&s.data_dir.join("db"), how);

    match broker.restart() {
        Err(e) => {
            // Refused: one clear error naming both logs and what to do.
            let text = format!("{e:#}");
            assert!(
                text.contains("refusing to serve") && text.contains("verify"),
                "{what}: the broker exited without the refusal:\n{text}"
            );
            format!("{what}: refused to start")
        }
        Ok(()) => {
            // Started: it must have every receipted entry and extend the receipts' checkpoint.
            let auditor = s.tls(&broker, "auditor");
            let problems = rt.block_on(async {
                let client = auditor.connect().await.unwrap();
                // Something new, so that the broker signs a new checkpoint.
                let nca = nca.connect().await.unwrap();
                let _ = nca.exchange().send(envelope(1000)).await;
                let response = client
                    .audit()
                    .checkpoint(pb::CheckpointRequest {
                        from_size: newest.size(),
                        to_size: 0,
                    })
                    .await;
                let mut problems = Vec::new();
                match response {
                    Err(status) => problems.push(format!(
                        "no consistency proof from the receipts' checkpoint ({}): {status:?}",
                        newest.size()
                    )),
                    Ok(r) => {
                        let r = r.into_inner();
                        let latest = checkpoint::open(&r.checkpoint, &key).unwrap();
                        let proof: Vec<Hash> = r
                            .consistency_proof
                            .iter()
                            .map(|h| Hash::from_slice(h).unwrap())
                            .collect();
                        if let Err(e) = checkpoint::check_consistent(&newest, &latest, &proof) {
                            problems.push(format!(
                                "signed a checkpoint of {} inconsistent with the receipts' \
                                 checkpoint of {}: {e}",
                                latest.size(),
                                newest.size()
                            ));
                        }
                    }
                }
                let mut lost = 0;
                for r in &receipted {
                    let export = client
                        .audit()
                        .export(pb::ExportRequest {
                            index_from: r.index,
                            index_to: r.index + 1,
                            ..Default::default()
                        })
                        .await;
                    let mut found = false;
                    if let Ok(stream) = export {
                        let mut stream = stream.into_inner();
                        while let Ok(Some(item)) = stream.message().await {
                            if let Some(pb::export_item::Item::Record(rec)) = item.item {
                                found |= rec.entry == r.entry;
                            }
                        }
                    }
                    if !found {
                        lost += 1;
                    }
                }
                if lost > 0 {
                    problems.push(format!(
                        "{lost} of {TRANSFERS} receipted transfers are lost"
                    ));
                }
                problems
            });
            assert!(
                problems.is_empty(),
                "{what}: the broker started on a damaged store: {problems:?}\n{}",
                broker.log_tail(10)
            );
            format!("{what}: started with nothing lost")
        }
    }
}

/// Every damage the issue describes, each on its own broker.
#[test]
fn a_damaged_database_is_never_served() {
    let mut outcomes = Vec::new();
    for how in [
        Damage::FlipMiddle,
        Damage::CutTail,
        Damage::FlipAt(64),
        Damage::FlipAt(4096),
        Damage::FlipSecondHalf,
    ] {
        outcomes.push(case(how));
    }
    eprintln!("damage outcomes:\n  {}", outcomes.join("\n  "));
}

fn broker_command(args: &[&str]) -> std::process::Output {
    Command::new(binary("concordat-broker").unwrap())
        .args(args)
        .output()
        .unwrap()
}

/// Starts a broker on `s`, receipts some transfers, and stops it.
fn run_once(s: &Setup) {
    let rt = Runtime::new().unwrap();
    let mut broker = BrokerProcess::start(&s.config, &s.data_dir).unwrap();
    let key = audit_log::load_key(&s.data_dir, DEFAULT_ORIGIN)
        .unwrap()
        .verifier();
    let nca = s.tls(&broker, "nca");
    rt.block_on(async {
        let client = nca.connect().await.unwrap();
        send_all(&client, &key).await
    });
    assert!(broker.terminate(STOP_TIMEOUT).unwrap().success());
}

/// `verify` passes on a whole store and fails, saying why, on a damaged one.
#[test]
fn verify_checks_a_stopped_brokers_store() {
    let s = Setup::new();
    run_once(&s);
    // A copy is checked whole; the original is damaged, unopened since the broker stopped
    // (opening a sled database may snapshot it, after which its log's tail is not needed).
    let copy = s.root.join("copy");
    let status = Command::new("cp")
        .arg("-a")
        .arg(&s.data_dir)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success());
    let out = broker_command(&["verify", "--data-dir", copy.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("entries/s"), "{stdout}");
    assert!(stdout.contains("ok"), "{stdout}");

    // Damage the log so that sled recovers less than was published: verify must say the store
    // is not whole.
    damage(&s.data_dir.join("db"), Damage::FlipSecondHalf);
    let out = broker_command(&["verify", "--data-dir", s.data_dir.to_str().unwrap()]);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "verify passed a damaged store:\n{all}"
    );
    assert!(all.contains("problem: "), "{all}");
}

/// A deleted or replaced log key is never replaced by a new one on a directory with a log.
#[test]
fn no_new_log_key_for_a_store_that_has_a_log() {
    let s = Setup::new();
    run_once(&s);
    let key_file = s.data_dir.join(audit_log::LOG_KEY_FILE);
    let original = fs::read_to_string(&key_file).unwrap();
    let dir = s.data_dir.to_str().unwrap();
    let config = s.config.to_str().unwrap();

    // Deleted: log-key and serve both refuse, and neither writes a key.
    fs::remove_file(&key_file).unwrap();
    let out = broker_command(&["log-key", "--config", config, "--data-dir", dir]);
    assert!(!out.status.success(), "log-key made a new key");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("missing"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!key_file.exists(), "log-key wrote a new key file");
    let out = broker_command(&[
        "serve",
        "--config",
        config,
        "--data-dir",
        dir,
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(!out.status.success(), "serve started without its key");
    assert!(!key_file.exists(), "serve wrote a new key file");

    // Replaced by another key: log-key refuses too.
    let other = concordat_proto::checkpoint::LogSigner::generate(DEFAULT_ORIGIN).unwrap();
    fs::write(&key_file, other.to_secret_string()).unwrap();
    let out = broker_command(&["log-key", "--config", config, "--data-dir", dir]);
    assert!(
        !out.status.success(),
        "log-key printed a replaced key: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The original key back: all is well again.
    fs::write(&key_file, original).unwrap();
    let out = broker_command(&["log-key", "--config", config, "--data-dir", dir]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
