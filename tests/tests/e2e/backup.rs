//! Backup and restore as an operator runs them, with real processes: `concordat-broker backup`
//! of a broker under load (through its admin socket, nothing stopped), `concordat-broker
//! restore` into a new data directory, and a second broker on it whose log is consistent with
//! every checkpoint the agents held before the backup began, holds every transfer acknowledged
//! by then, and serves. A stopped broker is backed up directly; a damaged file and a used
//! directory are refused.

use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use base64::Engine as _;
use concordat_agent::spool::ReceiptFile;
use concordat_broker::{
    audit_log::DEFAULT_ORIGIN,
    config::Limits,
    store::{SledStorage, Storage},
};
use concordat_proto::{
    checkpoint::{self, LogVerifier},
    ids::{AgencyId, MessageId},
    merkle::Hash,
    pb,
};
use concordat_tests::{
    TestPki, binary,
    process::{AgentProcess, BrokerProcess, PkiFiles, SpoolDir, wait_for, write_broker_config},
};
use serde_json::json;

/// How long an ordinary outcome (files sent, a delivery) may take.
const OUTCOME_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a process may take to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// An outbox message for `recipient` carrying `seq`.
fn message(recipient: &str, seq: usize) -> serde_json::Value {
    json!({
        "recipients": [recipient],
        "kind": "threat_assessment",
        "payload": { "seq": seq, "summary": format!("assessment number {seq}") },
    })
}

/// What a spool's `sent/` folder holds: data file name → its receipt.
fn receipts(spool: &SpoolDir) -> BTreeMap<String, ReceiptFile> {
    let mut out = BTreeMap::new();
    for name in spool.files("sent").unwrap() {
        if let Some(data) = name.strip_suffix(".receipt.json") {
            // A receipt is written atomically; read it only once it parses.
            if let Ok(v) = spool.read_json("sent", &name)
                && let Ok(receipt) = serde_json::from_value::<ReceiptFile>(v)
            {
                out.insert(data.to_owned(), receipt);
            }
        }
    }
    out
}

/// Runs `concordat-broker` with `args`.
fn broker_cli(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(binary("concordat-broker").unwrap())
        .args(args)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn backup(config: &Path, data_dir: &Path, out: &Path) -> Output {
    broker_cli(&[
        "backup".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--data-dir".as_ref(),
        data_dir.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ])
}

fn restore(from: &Path, data_dir: &Path) -> Output {
    broker_cli(&[
        "restore".as_ref(),
        "--from".as_ref(),
        from.as_os_str(),
        "--data-dir".as_ref(),
        data_dir.as_os_str(),
    ])
}

/// The number after `audit log: ` in restore's output.
fn restored_size(out: &Output) -> u64 {
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("audit log: "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no log size in {}", text(out)))
}

/// A broker and its files in a temporary directory.
struct Setup {
    dir: tempfile::TempDir,
    pki: PkiFiles,
    config: PathBuf,
    data_dir: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let mut pki = TestPki::new().unwrap();
        let pki =
            PkiFiles::write(&mut pki, &dir.path().join("pki"), &["ico", "ncsc", "nca"]).unwrap();
        let config = dir.path().join("broker.toml");
        let data_dir = dir.path().join("data");
        write_broker_config(&config, &pki, &data_dir, &Limits::default()).unwrap();
        Setup {
            dir,
            pki,
            config,
            data_dir,
        }
    }

    fn agent(&self, name: &str, agency: &str, broker: &BrokerProcess) -> AgentProcess {
        AgentProcess::start(
            &self.dir.path().join(name),
            agency,
            broker.addr(),
            &self.pki,
        )
        .unwrap()
    }
}

/// Waits until `spool` has sent at least `n` files.
fn wait_sent(spool: &SpoolDir, n: usize, logs: &dyn Fn() -> String) -> usize {
    wait_for(
        &format!("{n} files sent"),
        OUTCOME_TIMEOUT,
        || match spool.count_moved("sent") {
            k if k >= n => Ok(k),
            k => Err(format!("{k} sent")),
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs()))
}

/// Under load (the NCA's agent sending continuously, the ICO's receiving), `backup` takes a
/// snapshot through the running broker's admin socket while sends go on; `restore` brings it
/// back into a new data directory; a second broker started on it has a log consistent with
/// every checkpoint the NCA's receipts held before the backup began, holds every transfer
/// acknowledged by then with its audit entry at the receipt's index, and serves: a new send is
/// accepted and delivered.
#[test]
fn a_backup_under_load_restores_a_broker_consistent_with_every_earlier_checkpoint() {
    let s = Setup::new();
    let mut broker = BrokerProcess::start(&s.config, &s.data_dir).unwrap();
    let socket = s.data_dir.join(concordat_broker::admin::SOCKET_FILE);
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the admin socket is the owner's only");
    let mut nca = s.agent("nca", "nca", &broker);
    let mut ico = s.agent("ico", "ico", &broker);
    let spool = nca.spool().clone();
    let logs = || {
        format!(
            "{}{}{}",
            broker.log_tail(15),
            nca.log_tail(10),
            ico.log_tail(10)
        )
    };

    // An agency sending continuously: a file every few milliseconds until the test says stop.
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let (spool, stop) = (spool.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seq = 0;
            while !stop.load(Ordering::Relaxed) {
                spool
                    .drop_message(&format!("m{seq:05}.json"), &message("ico", seq))
                    .unwrap();
                seq += 1;
                std::thread::sleep(Duration::from_millis(3));
            }
            seq
        })
    };
    wait_sent(&spool, 150, &logs);
    // Everything acknowledged before the backup begins, with the checkpoints it carries.
    let before = receipts(&spool);
    assert!(before.len() >= 150);

    let file = s.dir.path().join("broker.backup");
    let out = backup(&s.config, &s.data_dir, &file);
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("taken by the broker running on"),
        "{}",
        text(&out)
    );
    assert!(said.contains("signing key"), "{said}");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the backup holds the log key");
    // Nothing was stopped: sending goes on after the backup.
    wait_sent(&spool, before.len() + 100, &logs);
    stop.store(true, Ordering::Relaxed);
    let dropped = feeder.join().unwrap();
    assert!(broker.is_running());

    let restored = s.dir.path().join("restored");
    let out = restore(&file, &restored);
    assert!(out.status.success(), "{}", text(&out));
    let size = restored_size(&out);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!(
            "WARNING: this snapshot's audit log ends at {size} entries"
        )),
        "{said}"
    );

    // A second broker, on the restored directory, beside the first.
    let mut second = BrokerProcess::start(&s.config, &restored).unwrap();
    let key = broker_cli(&[
        "log-key".as_ref(),
        "--config".as_ref(),
        s.config.as_os_str(),
        "--data-dir".as_ref(),
        s.data_dir.as_os_str(),
    ]);
    let verifier: LogVerifier = String::from_utf8(key.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let checked = rt.block_on(async {
        let client = s
            .pki
            .client(second.addr(), "ico")
            .unwrap()
            .connect()
            .await
            .unwrap();
        let latest = client
            .audit()
            .checkpoint(pb::CheckpointRequest::default())
            .await
            .unwrap()
            .into_inner();
        let latest = checkpoint::open(&latest.checkpoint, &verifier).unwrap();
        assert!(latest.size() >= size, "the restored log lost entries");
        let mut checked = 0;
        for (name, receipt) in &before {
            let proof = receipt.proof.as_ref().expect("receipts keep their proof");
            let old = checkpoint::open(&proof.checkpoint, &verifier).unwrap();
            assert!(
                old.size() <= size,
                "{name}: a checkpoint from before the backup ({}) beyond the snapshot ({size})",
                old.size()
            );
            let answer = client
                .audit()
                .checkpoint(pb::CheckpointRequest {
                    from_size: old.size(),
                    to_size: latest.size(),
                })
                .await
                .unwrap()
                .into_inner();
            let hashes: Vec<Hash> = answer
                .consistency_proof
                .iter()
                .map(|h| Hash(h.as_slice().try_into().unwrap()))
                .collect();
            checkpoint::check_consistent(&old, &latest, &hashes).unwrap_or_else(|e| {
                panic!("{name}: checkpoint of {} not consistent: {e}", old.size())
            });
            checked += 1;
        }
        checked
    });
    assert_eq!(checked, before.len());

    // It serves: a new send through it is accepted and delivered.
    let mut nca2 = s.agent("nca-after", "nca", &second);
    let mut ico2 = s.agent("ico-after", "ico", &second);
    nca2.spool()
        .drop_message("after.json", &message("ico", dropped + 1))
        .unwrap();
    wait_sent(nca2.spool(), 1, &|| second.log_tail(20));
    let sent = receipts(nca2.spool());
    let id = sent["after.json"].message_id.clone();
    let inbox = ico2.spool().folder("inbox");
    wait_for("the new transfer delivered", OUTCOME_TIMEOUT, || {
        let found = std::fs::read_dir(&inbox)
            .map(|entries| {
                entries.filter_map(Result::ok).any(|e| {
                    std::fs::read(e.path())
                        .ok()
                        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                        .is_some_and(|v| v["message_id"] == id.as_str())
                })
            })
            .unwrap_or(false);
        if found { Ok(()) } else { Err("not yet".into()) }
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", second.log_tail(20)));
    for agent in [&mut nca, &mut ico, &mut nca2, &mut ico2] {
        let _ = agent.terminate(STOP_TIMEOUT);
    }
    let status = second.terminate(STOP_TIMEOUT).unwrap();
    assert!(status.success(), "{}", second.log_tail(20));
    assert!(
        !restored.join(concordat_broker::admin::SOCKET_FILE).exists(),
        "the admin socket is removed when the broker stops"
    );
    let _ = broker.terminate(STOP_TIMEOUT);

    // Every transfer acknowledged before the backup is in the restored store, its audit entry
    // at the receipt's index.
    let storage = SledStorage::open(&restored, DEFAULT_ORIGIN).unwrap();
    let nca_id: AgencyId = "nca".parse().unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    for (name, receipt) in &before {
        let id: MessageId = receipt.message_id.parse().unwrap();
        let (stored, _) = storage
            .receipt(&nca_id, &id)
            .unwrap()
            .unwrap_or_else(|| panic!("{name}: no receipt in the restored store"));
        assert_eq!(stored.transfer_id, receipt.transfer_id, "{name}");
        let proof = receipt.proof.as_ref().unwrap();
        assert_eq!(
            storage.log_entry(proof.log_index).unwrap(),
            Some(b64.decode(&proof.entry).unwrap()),
            "{name}: another entry at its index"
        );
    }
}

/// A stopped broker is backed up directly from its store. `restore` refuses a file with one
/// byte changed and a directory that holds something, each with a clear error and nothing
/// written; restored into a new directory, the store verifies offline.
#[test]
fn a_stopped_broker_is_backed_up_directly_and_restore_refuses_damage_and_a_used_directory() {
    let s = Setup::new();
    let mut broker = BrokerProcess::start(&s.config, &s.data_dir).unwrap();
    let mut nca = s.agent("nca", "nca", &broker);
    for seq in 0..5 {
        nca.spool()
            .drop_message(&format!("m{seq}.json"), &message("ico", seq))
            .unwrap();
    }
    wait_sent(nca.spool(), 5, &|| broker.log_tail(20));
    let _ = nca.terminate(STOP_TIMEOUT);
    assert!(broker.terminate(STOP_TIMEOUT).unwrap().success());
    assert!(
        !s.data_dir
            .join(concordat_broker::admin::SOCKET_FILE)
            .exists()
    );

    let file = s.dir.path().join("b.backup");
    let out = backup(&s.config, &s.data_dir, &file);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("read directly"),
        "{}",
        text(&out)
    );

    // One byte changed in the middle.
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    let damaged = s.dir.path().join("damaged.backup");
    std::fs::write(&damaged, &bytes).unwrap();
    let target = s.dir.path().join("new");
    let out = restore(&damaged, &target);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is damaged: its SHA-256 does not match"),
        "{}",
        text(&out)
    );
    assert!(!target.exists(), "a refused restore writes nothing");

    // A directory in use.
    let out = restore(&file, &s.data_dir);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("it is not empty"),
        "{}",
        text(&out)
    );

    let out = restore(&file, &target);
    assert!(out.status.success(), "{}", text(&out));
    let out = broker_cli(&[
        "verify".as_ref(),
        "--config".as_ref(),
        s.config.as_os_str(),
        "--data-dir".as_ref(),
        target.as_os_str(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    // The restored log is the original's.
    let original = SledStorage::open(&s.data_dir, DEFAULT_ORIGIN).unwrap();
    let copy = SledStorage::open(&target, DEFAULT_ORIGIN).unwrap();
    assert_eq!(
        copy.latest_checkpoint().unwrap(),
        original.latest_checkpoint().unwrap()
    );
}
