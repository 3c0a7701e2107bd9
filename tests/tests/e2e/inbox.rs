//! The agent's spool, with real processes. Its inbox: two senders' messages that share a
//! message id both land (ids are scoped per sender, so one agency cannot suppress another's
//! delivery), and a full disk holds deliveries back until space returns, without partial files
//! and without a reconnect. Its outbox: a file that cannot be filed under its own name does not
//! stop the files after it, and an agent that can no longer file what it sent stops, naming the
//! file, instead of receiving on with its sending half dead.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use concordat_agent::client::Broker;
use concordat_broker::config::Limits;
use concordat_proto::{ids::MessageId, pb};
use concordat_tests::{
    TestPki,
    process::{
        AgentProcess, BrokerProcess, PkiFiles, SpoolDir, Tmpfs, wait_for, write_broker_config,
    },
};
use tempfile::TempDir;

/// How long an ordinary outcome (a delivery stored) may take.
const OUTCOME_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the agent may take to store held-back deliveries once space returns: its retry
/// backoff tops out at a few seconds, far below its reconnect path.
const SPACE_RETURNED_TIMEOUT: Duration = Duration::from_secs(20);

/// A broker process and the PKI files of the three agencies, in a temporary directory.
struct Federation {
    dir: TempDir,
    pki: PkiFiles,
    broker: BrokerProcess,
}

impl Federation {
    fn start() -> Federation {
        let dir = tempfile::tempdir().unwrap();
        let mut pki = TestPki::new().unwrap();
        let pki =
            PkiFiles::write(&mut pki, &dir.path().join("pki"), &["ico", "ncsc", "nca"]).unwrap();
        let config = dir.path().join("broker.toml");
        let data_dir = dir.path().join("data");
        write_broker_config(&config, &pki, &data_dir, &Limits::default()).unwrap();
        let broker = BrokerProcess::start(&config, &data_dir).unwrap();
        Federation { dir, pki, broker }
    }

    /// The spool directory of `agency`'s agent.
    fn spool_dir(&self, agency: &str) -> PathBuf {
        self.dir.path().join(agency)
    }

    fn agent(&self, agency: &str) -> AgentProcess {
        AgentProcess::start(
            &self.spool_dir(agency),
            agency,
            self.broker.addr(),
            &self.pki,
        )
        .unwrap()
    }

    /// A connection to the broker as `agency`.
    async fn connect(&self, agency: &str) -> Broker {
        self.pki
            .client(self.broker.addr(), agency)
            .unwrap()
            .connect()
            .await
            .unwrap()
    }
}

/// A threat assessment for the ICO with message id `id`.
fn assessment(id: MessageId, text: &str) -> pb::Envelope {
    pb::Envelope {
        message_id: id.to_string(),
        recipients: vec!["ico".into()],
        kind: pb::MessageKind::ThreatAssessment as i32,
        content_type: "application/json".into(),
        tlp: pb::Tlp::Green as i32,
        payload: serde_json::to_vec(&serde_json::json!({ "summary": text })).unwrap(),
        ..Default::default()
    }
}

/// The transfers in an inbox (not recall notices), as (sender, message id, summary).
fn inbox_transfers(inbox: &Path) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    // The agent creates its spool's folders once it runs: until then the inbox is empty.
    let Ok(entries) = fs::read_dir(inbox) else {
        return out;
    };
    for entry in entries {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !name.ends_with(".json") || name.ends_with(".recall.json") {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_slice(&fs::read(inbox.join(&name)).unwrap()).unwrap();
        out.push((
            v["sender"].as_str().unwrap_or_default().to_owned(),
            v["message_id"].as_str().unwrap_or_default().to_owned(),
            v["payload"]["summary"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        ));
    }
    out.sort();
    out
}

/// The leftovers of interrupted writes in a directory: dot-files ending in `.tmp`.
fn partial_files(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && n.ends_with(".tmp"))
        .collect();
    out.sort();
    out
}

/// The NCSC and then the NCA send the ICO a message under the same message id. The broker
/// accepts both (message ids are scoped per sender); the ICO's agent must write both to its
/// inbox, not take the second for a redelivery of the first and acknowledge it unwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_senders_using_the_same_message_id_both_land() {
    let fed = Federation::start();
    let ico = fed.agent("ico");
    let inbox = fed.spool_dir("ico").join("inbox");
    let id = MessageId::new_random();

    let ncsc = fed.connect("ncsc").await;
    let first = ncsc
        .exchange()
        .send(assessment(id, "from the NCSC"))
        .await
        .unwrap()
        .into_inner();
    let nca = fed.connect("nca").await;
    let second = nca
        .exchange()
        .send(assessment(id, "from the NCA"))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.duplicate && !second.duplicate);
    assert_ne!(first.transfer_id, second.transfer_id);

    let expected = vec![
        ("nca".to_owned(), id.to_string(), "from the NCA".to_owned()),
        (
            "ncsc".to_owned(),
            id.to_string(),
            "from the NCSC".to_owned(),
        ),
    ];
    let inbox_for_wait = inbox.clone();
    let waited = tokio::task::spawn_blocking(move || {
        wait_for("both transfers in the ICO's inbox", OUTCOME_TIMEOUT, || {
            let got = inbox_transfers(&inbox_for_wait);
            if got.len() == 2 {
                Ok(got)
            } else {
                Err(format!("{got:?}"))
            }
        })
    })
    .await
    .unwrap();
    let got =
        waited.unwrap_or_else(|e| panic!("{e:#}\n{}{}", fed.broker.log_tail(10), ico.log_tail(20)));
    assert_eq!(got, expected);
    assert!(partial_files(&inbox).is_empty());
}

/// The ICO's inbox is on a 2 MiB tmpfs that is full. Deliveries cannot be written: none lands,
/// none is half-written, and none is acknowledged. Once the filler is deleted, the agent
/// stores them on its own, on the subscription it already has: it must not wait for a
/// reconnect (which, with the broker up and the connection alive, would never come).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_holds_deliveries_until_space_returns_without_a_reconnect() {
    const COUNT: usize = 3;
    let fed = Federation::start();
    let spool = fed.spool_dir("ico");
    let inbox = spool.join("inbox");
    let tmpfs = match Tmpfs::mount(&inbox, 2) {
        Ok(t) => t,
        Err(why) => {
            eprintln!(
                "SKIPPED a_full_disk_holds_deliveries_until_space_returns_without_a_reconnect: \
                 {why} (it needs root and permission to mount a tmpfs)"
            );
            return;
        }
    };
    let filler = tmpfs.fill(".filler");
    let ico = fed.agent("ico");
    let log = spool.join("agent.log");

    let ncsc = fed.connect("ncsc").await;
    for n in 0..COUNT {
        ncsc.exchange()
            .send(assessment(MessageId::new_random(), &format!("number {n}")))
            .await
            .unwrap();
    }

    // The agent tries, and says it cannot store them.
    let log_for_wait = log.clone();
    tokio::task::spawn_blocking(move || {
        wait_for("the agent to report a full disk", OUTCOME_TIMEOUT, || {
            let text = fs::read_to_string(&log_for_wait).unwrap_or_default();
            if text.contains("cannot store a delivery") {
                Ok(())
            } else {
                Err("no error logged yet".into())
            }
        })
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("{e:#}\n{}", ico.log_tail(20)));
    assert!(
        inbox_transfers(&inbox).is_empty(),
        "written to a full disk?"
    );
    assert_eq!(
        partial_files(&inbox),
        Vec::<String>::new(),
        "a failed write left its temporary file\n{}",
        ico.log_tail(20)
    );

    // Space returns: everything lands, on the same subscription.
    fs::remove_file(&filler).unwrap();
    let space_returned = Instant::now();
    let inbox_for_wait = inbox.clone();
    let landed = tokio::task::spawn_blocking(move || {
        wait_for(
            "the held-back deliveries once space returned",
            SPACE_RETURNED_TIMEOUT,
            || match inbox_transfers(&inbox_for_wait).len() {
                COUNT => Ok(()),
                n => Err(format!("{n} of {COUNT} in the inbox")),
            },
        )
    })
    .await
    .unwrap();
    landed.unwrap_or_else(|e| panic!("{e:#}\n{}", ico.log_tail(20)));
    eprintln!(
        "full disk: {COUNT} deliveries landed {:?} after space returned",
        space_returned.elapsed()
    );
    assert!(partial_files(&inbox).is_empty());
    let text = fs::read_to_string(&log).unwrap();
    let subscriptions = text
        .lines()
        .filter(|l| l.contains("connected to the broker") && l.contains("inbox"))
        .count();
    assert_eq!(
        subscriptions,
        1,
        "the inbox loop reconnected:\n{}",
        ico.log_tail(30)
    );
    drop(ico);
    drop(tmpfs);
}

/// A threat assessment for the ICO, as an outbox file.
fn outbox_assessment(text: &str) -> serde_json::Value {
    serde_json::json!({
        "recipients": ["ico"],
        "kind": "threat_assessment",
        "payload": {"summary": text},
    })
}

/// A file whose name is too long to be filed under (`sent/<name>.receipt.json` and its
/// temporary file would pass the file system's 255 bytes) goes to `failed/` under a shorter
/// name, and the outbox goes on: a file dropped after it is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_file_named_too_long_is_failed_and_the_outbox_goes_on() {
    let fed = Federation::start();
    let ncsc = fed.agent("ncsc");
    let long = format!("{}.json", "b".repeat(240));
    ncsc.spool()
        .drop_message(&long, &outbox_assessment("long"))
        .unwrap();
    let spool = SpoolDir::new(ncsc.spool().root());
    let failed = tokio::task::spawn_blocking(move || {
        wait_for("the long name to leave the outbox", OUTCOME_TIMEOUT, || {
            let left = spool.files("outbox").map_err(|e| e.to_string())?;
            let failed = spool.files("failed").map_err(|e| e.to_string())?;
            if left.is_empty() && !failed.is_empty() {
                Ok(failed)
            } else {
                Err(format!("outbox {left:?}, failed {failed:?}"))
            }
        })
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("{e:#}\n{}", ncsc.log_tail(20)));
    assert!(failed.iter().all(|f| f.len() < 200), "{failed:?}");
    let reason = failed
        .iter()
        .find(|f| f.ends_with(".error.txt"))
        .map(|f| fs::read_to_string(ncsc.spool().folder("failed").join(f)).unwrap())
        .unwrap();
    assert!(reason.contains("give it a shorter name"), "{reason}");

    ncsc.spool()
        .drop_message("after.json", &outbox_assessment("after"))
        .unwrap();
    let outcome = tokio::task::spawn_blocking(move || ncsc.outcome("after.json", OUTCOME_TIMEOUT))
        .await
        .unwrap();
    assert_eq!(outcome, "sent");
}

/// When the agent cannot file a file it sent (here `sent/` is replaced by a plain file, as a
/// full or failing disk would refuse the write), it stops with an error that names the file:
/// before, its outbox loop ended silently while the process went on receiving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_cannot_file_what_it_sent_stops_and_says_which_file() {
    let fed = Federation::start();
    let mut ncsc = fed.agent("ncsc");
    let sent = ncsc.spool().folder("sent");
    wait_for("the agent to make its spool", OUTCOME_TIMEOUT, || {
        if sent.is_dir() {
            Ok(())
        } else {
            Err("no sent/ yet".into())
        }
    })
    .unwrap();
    fs::remove_dir_all(&sent).unwrap();
    fs::write(&sent, "not a directory").unwrap();
    ncsc.spool()
        .drop_message("stuck.json", &outbox_assessment("stuck"))
        .unwrap();
    let stopped = wait_for("the agent to stop", OUTCOME_TIMEOUT, || {
        if ncsc.is_running() {
            Err("still running".into())
        } else {
            Ok(())
        }
    });
    let log = ncsc.log_text();
    stopped.unwrap_or_else(|e| panic!("{e:#}\n{}", ncsc.log_tail(20)));
    assert!(log.contains("stuck.json"), "{log}");
    assert!(log.contains("the outbox loop failed"), "{log}");
}
