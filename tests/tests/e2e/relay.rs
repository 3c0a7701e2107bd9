//! Relaying, with real processes where crashes matter: the broker and the agents killed with
//! SIGKILL mid-run lose and duplicate nothing; an offline recipient gets everything once it
//! connects; a slow consumer holds only its window; a full queue refuses and recovers; and the
//! agent files malformed, oversized and interrupted outbox files where they belong.
//!
//! The process tests run `concordat-broker` and `concordat-agent` through
//! [`concordat_tests::process`]; the window and queue tests run a broker in-process and speak to
//! it as an agency would. Waiting is always for an outcome, under a deadline.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    time::{Duration, Instant},
};

use concordat_agent::{
    client::Broker,
    spool::{ReasonFile, ReceiptFile},
};
use concordat_broker::{
    audit_log::DEFAULT_ORIGIN,
    config::{Config, Limits},
    policy::{Agreement, Flow},
    refusal::reason_of,
    store::{SledStorage, Storage},
};
use concordat_proto::{
    envelope::Kind,
    ids::{AgencyId, MessageId},
    pb,
};
use concordat_tests::{
    TestPki, federation_config,
    process::{
        AgentProcess, BrokerProcess, PkiFiles, SpoolDir, wait_for, wait_while_progressing,
        write_broker_config,
    },
    spawn_broker,
};
use serde_json::json;
use tempfile::TempDir;
use tonic::{Code, Streaming};

/// How long an ordinary outcome (a file sent, a delivery stored) may take.
const OUTCOME_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the crash test may take to drain everything after its last restart.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(150);
/// How long the crash test waits without any progress before it calls a message lost.
const STALL_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a process may take to stop after SIGTERM before the test calls it a failure.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an in-process test waits for one delivery.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a subscription must stay quiet to show that nothing more is coming.
const QUIET: Duration = Duration::from_millis(500);

// ---------------------------------------------------------------------------------------------
// Process fixtures

/// A broker process with its PKI and configuration in a temporary directory.
struct Federation {
    dir: TempDir,
    pki: PkiFiles,
    broker: BrokerProcess,
}

impl Federation {
    /// Starts a broker process with these limits.
    fn start(limits: &Limits) -> Federation {
        let dir = tempfile::tempdir().unwrap();
        let mut pki = TestPki::new().unwrap();
        let pki =
            PkiFiles::write(&mut pki, &dir.path().join("pki"), &["ico", "ncsc", "nca"]).unwrap();
        let config = dir.path().join("broker.toml");
        let data_dir = dir.path().join("data");
        write_broker_config(&config, &pki, &data_dir, limits).unwrap();
        let broker = BrokerProcess::start(&config, &data_dir).unwrap();
        Federation { dir, pki, broker }
    }

    /// Starts the agent of `agency`, with its spool in `<tmp>/<agency>`.
    fn agent(&self, agency: &str) -> AgentProcess {
        AgentProcess::start(
            &self.dir.path().join(agency),
            agency,
            self.broker.addr(),
            &self.pki,
        )
        .unwrap()
    }

    /// Stops the agents and then the broker with SIGTERM, asserting that each exits cleanly, and
    /// opens the broker's database (which only one process may hold at a time).
    fn stop_and_open_store(&mut self, agents: &mut [&mut AgentProcess]) -> SledStorage {
        for agent in agents.iter_mut() {
            let status = agent.terminate(STOP_TIMEOUT).unwrap();
            assert!(status.success(), "agent exited with {status}");
        }
        let status = self.broker.terminate(STOP_TIMEOUT).unwrap();
        assert!(
            status.success(),
            "broker exited with {status}\n{}",
            self.broker.log_tail(20)
        );
        SledStorage::open(self.broker.data_dir(), DEFAULT_ORIGIN).unwrap()
    }
}

/// The tails of the logs, for failure messages.
pub(crate) fn logs(broker: &BrokerProcess, agents: &[&AgentProcess]) -> String {
    let mut out = broker.log_tail(15);
    for agent in agents {
        out.push_str(&agent.log_tail(15));
    }
    out
}

/// An outbox message: a threat assessment for `recipient` carrying `seq` in its JSON payload.
pub(crate) fn message(recipient: &str, seq: usize) -> serde_json::Value {
    json!({
        "recipients": [recipient],
        "kind": "threat_assessment",
        "payload": { "seq": seq, "summary": format!("assessment number {seq}") },
    })
}

/// What a spool's `sent/` folder holds: data file name → its receipt.
pub(crate) fn receipts(spool: &SpoolDir) -> BTreeMap<String, ReceiptFile> {
    let mut out = BTreeMap::new();
    for name in spool.files("sent").unwrap() {
        if let Some(data) = name.strip_suffix(".receipt.json") {
            let receipt: ReceiptFile =
                serde_json::from_value(spool.read_json("sent", &name).unwrap()).unwrap();
            out.insert(data.to_owned(), receipt);
        }
    }
    out
}

/// The outbox files moved into a folder (without their sidecars).
fn moved(spool: &SpoolDir, folder: &str) -> BTreeSet<String> {
    spool.moved(folder).unwrap().into_iter().collect()
}

/// The message ids in an inbox: `<sender>.<message_id>.json` files.
pub(crate) fn inbox_ids(spool: &SpoolDir) -> BTreeSet<String> {
    spool
        .files("inbox")
        .unwrap()
        .into_iter()
        .filter_map(|n| {
            let (_sender, id) = n.strip_suffix(".json")?.split_once('.')?;
            Some(id.to_owned())
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Crashes

/// A point in the crash test's run.
#[derive(Debug, Clone, Copy)]
enum Progress {
    /// This many files in the sender's `sent/`.
    Sent(usize),
    /// This many messages in the receiver's inbox.
    Delivered(usize),
}

/// What the crash test does at that point.
#[derive(Debug, Clone, Copy)]
enum Crash {
    /// SIGKILL the broker and restart it on the same port and data directory.
    KillBroker,
    /// SIGKILL the sending agent and restart it.
    KillSender,
    /// SIGKILL the receiving agent, and restart it or leave it down.
    KillReceiver { restart: bool },
    /// Restart the receiving agent, left down by an earlier step.
    RestartReceiver,
}

/// 1,000 files from the NCA to the ICO while the broker, the sending agent and the receiving
/// agent are each killed with SIGKILL mid-run and restarted: every file ends in `sent/` with a
/// receipt or in `refused/`, every accepted message is in the ICO's inbox exactly once, no two
/// files share a transfer, and the broker's own records agree.
#[test]
fn sigkill_of_broker_and_agents_mid_run_loses_and_duplicates_nothing() {
    const TOTAL: usize = 1000;
    let started = Instant::now();
    let mut fed = Federation::start(&Limits::default());
    let mut ico = fed.agent("ico");
    let mut nca = fed.agent("nca");
    let outbox = nca.spool().clone();
    let inbox = ico.spool().clone();

    // Every 50th file goes where no agreement allows (refused); every 10th names its own id.
    let mut expected_refused = BTreeSet::new();
    let mut expected_sent = BTreeMap::new();
    let mut explicit_ids = BTreeMap::new();
    for seq in 0..TOTAL {
        let name = format!("m{seq:04}.json");
        let mut msg = message("ico", seq);
        if seq % 50 == 49 {
            msg["recipients"] = json!(["ncsc"]);
            expected_refused.insert(name.clone());
        } else {
            expected_sent.insert(name.clone(), seq);
        }
        if seq % 10 == 3 {
            let id = MessageId::new_random().to_string();
            msg["message_id"] = json!(id);
            explicit_ids.insert(name.clone(), id);
        }
        outbox.drop_message(&name, &msg).unwrap();
    }
    let accepted_total = expected_sent.len();
    let sent = || outbox.count_moved("sent");
    let delivered = || inbox_ids(&inbox).len();

    // Each step waits for progress, then kills one process with SIGKILL while work remains for
    // it, and restarts it (the broker on the same port and data) unless the step says otherwise.
    use Crash::*;
    use Progress::*;
    let plan = [
        (Sent(150), KillBroker),
        (Sent(400), KillSender),
        (Delivered(200), KillReceiver { restart: true }),
        (Delivered(350), KillReceiver { restart: false }),
        (Sent(800), KillBroker),
        (Sent(0), RestartReceiver),
        (Delivered(600), KillReceiver { restart: true }),
        (Delivered(800), KillBroker),
    ];
    let mut kills: Vec<String> = Vec::new();
    for (progress, crash) in plan {
        let (what, n, count): (&str, usize, &dyn Fn() -> usize) = match progress {
            Sent(n) => ("files sent", n, &sent),
            Delivered(n) => ("deliveries", n, &delivered),
        };
        wait_for(&format!("{n} {what}"), OUTCOME_TIMEOUT, || match count() {
            c if c >= n => Ok(()),
            c => Err(c.to_string()),
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&fed.broker, &[&nca, &ico])));
        let (s, d) = (sent(), delivered());
        match crash {
            KillBroker => {
                fed.broker.kill().unwrap();
                assert!(
                    d < accepted_total,
                    "all relayed before the broker was killed"
                );
                let addr = fed.broker.addr();
                fed.broker.restart().unwrap();
                assert_eq!(fed.broker.addr(), addr);
            }
            KillSender => {
                nca.kill().unwrap();
                assert!(
                    s < accepted_total,
                    "nca sent everything before it was killed"
                );
                nca.restart().unwrap();
            }
            KillReceiver { restart } => {
                ico.kill().unwrap();
                assert!(
                    d < accepted_total,
                    "ico had everything before it was killed"
                );
                if restart {
                    ico.restart().unwrap();
                }
            }
            RestartReceiver => ico.restart().unwrap(),
        }
        kills.push(format!("{crash:?} at {s} sent, {d} delivered"));
    }

    // A lost message shows as a count that stops short: give up once nothing has moved for a
    // while rather than waiting out the whole deadline.
    wait_while_progressing(
        "every file handled and delivered",
        STALL_TIMEOUT,
        DRAIN_TIMEOUT,
        || {
            let waiting = outbox.files("outbox").map_err(|e| e.to_string())?.len();
            let (s, r, d) = (sent(), outbox.count_moved("refused"), delivered());
            if waiting == 0 && s + r == TOTAL && d >= accepted_total {
                Ok(())
            } else {
                Err(format!(
                    "{waiting} in outbox, {s} sent, {r} refused, {d} delivered"
                ))
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&fed.broker, &[&nca, &ico])));
    let drained = started.elapsed();

    // The spool of the sender: every file in exactly one place, with its sidecar.
    assert!(outbox.files("outbox").unwrap().is_empty());
    assert!(outbox.files("failed").unwrap().is_empty());
    let sent_files = moved(&outbox, "sent");
    let expected_names: BTreeSet<String> = expected_sent.keys().cloned().collect();
    assert_eq!(sent_files, expected_names, "sent/ holds other files");
    let receipts = receipts(&outbox);
    assert_eq!(
        receipts.keys().cloned().collect::<BTreeSet<_>>(),
        expected_names,
        "receipts and sent files differ"
    );
    assert_eq!(moved(&outbox, "refused"), expected_refused);
    for name in &expected_refused {
        let reason: ReasonFile = serde_json::from_value(
            outbox
                .read_json("refused", &format!("{name}.reason.json"))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(reason.reason, "NO_AGREEMENT", "{name}: {}", reason.message);
    }

    // One transfer per file, under the id the file named where it named one.
    let mut transfers = BTreeSet::new();
    let mut ids = BTreeMap::new();
    for (name, receipt) in &receipts {
        assert!(
            transfers.insert(receipt.transfer_id.clone()),
            "transfer {} appears twice",
            receipt.transfer_id
        );
        assert!(
            ids.insert(receipt.message_id.clone(), name.clone())
                .is_none(),
            "message id {} appears twice",
            receipt.message_id
        );
        if let Some(id) = explicit_ids.get(name) {
            assert_eq!(&receipt.message_id, id, "{name} was sent under another id");
        }
    }

    // The recipient's inbox: every accepted message exactly once, nothing else, unaltered.
    let got = inbox_ids(&inbox);
    let missing: Vec<_> = ids.keys().filter(|id| !got.contains(*id)).collect();
    let extra: Vec<_> = got.iter().filter(|id| !ids.contains_key(*id)).collect();
    assert!(missing.is_empty(), "missing from the inbox: {missing:?}");
    assert!(extra.is_empty(), "not sent but in the inbox: {extra:?}");
    assert_eq!(inbox.files("inbox").unwrap().len(), accepted_total);
    for (id, name) in &ids {
        let delivery = inbox.read_json("inbox", &format!("nca.{id}.json")).unwrap();
        assert_eq!(delivery["sender"], "nca");
        assert_eq!(
            delivery["transfer_id"],
            receipts[name].transfer_id.as_str(),
            "{id} was delivered from another transfer than its receipt names"
        );
        assert_eq!(delivery["payload"]["seq"], expected_sent[name], "{id}");
    }

    // The broker's records: a receipt for every accepted id with the same transfer, one queue
    // item ever assigned per transfer, and nothing left for the ICO once it acknowledged all.
    let store = fed.stop_and_open_store(&mut [&mut ico, &mut nca]);
    let nca_id: AgencyId = "nca".parse().unwrap();
    for (id, name) in &ids {
        let (receipt, _) = store
            .receipt(&nca_id, &id.parse().unwrap())
            .unwrap()
            .unwrap_or_else(|| panic!("the broker has no receipt for {id}"));
        assert_eq!(receipt.transfer_id, receipts[name].transfer_id);
    }
    assert_eq!(
        store.last_seq(),
        accepted_total as u64,
        "the broker queued more or fewer transfers than it accepted"
    );
    assert_eq!(store.queue_depth(&"ico".parse().unwrap()), 0);
    eprintln!(
        "crash test: {TOTAL} files drained in {drained:?}; kills: {}; {} partial inbox files left",
        kills.join(", "),
        inbox.partial_files("inbox").unwrap().len()
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Offline recipient

/// The ICO's agent is not running while the NCA sends: every file is accepted and queued, and
/// once the agent starts it receives each message exactly once.
#[test]
fn offline_recipient_gets_everything_once_it_connects() {
    const COUNT: usize = 50;
    let mut fed = Federation::start(&Limits::default());
    let mut nca = fed.agent("nca");
    let outbox = nca.spool().clone();
    for seq in 0..COUNT {
        outbox
            .drop_message(&format!("m{seq:02}.json"), &message("ico", seq))
            .unwrap();
    }
    wait_for("every file sent", OUTCOME_TIMEOUT, || {
        match outbox.count_moved("sent") {
            COUNT => Ok(()),
            n => Err(format!("{n} sent")),
        }
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&fed.broker, &[&nca])));
    assert!(outbox.files("outbox").unwrap().is_empty());
    let ico_dir = fed.dir.path().join("ico");
    assert!(!ico_dir.exists(), "the recipient must not have run yet");

    let mut ico = fed.agent("ico");
    let inbox = ico.spool().clone();
    wait_for(
        "every message delivered",
        OUTCOME_TIMEOUT,
        || match inbox_ids(&inbox).len() {
            COUNT => Ok(()),
            n => Err(format!("{n} delivered")),
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&fed.broker, &[&nca, &ico])));

    let sent: BTreeMap<String, String> = receipts(&outbox)
        .into_iter()
        .map(|(name, r)| (r.message_id, name))
        .collect();
    assert_eq!(sent.len(), COUNT);
    assert_eq!(
        inbox_ids(&inbox),
        sent.keys().cloned().collect::<BTreeSet<_>>()
    );
    assert_eq!(inbox.files("inbox").unwrap().len(), COUNT);
    for (id, name) in &sent {
        let delivery = inbox.read_json("inbox", &format!("nca.{id}.json")).unwrap();
        let seq: usize = name[1..3].parse().unwrap();
        assert_eq!(delivery["payload"]["seq"], seq);
    }
    let store = fed.stop_and_open_store(&mut [&mut ico, &mut nca]);
    assert_eq!(store.last_seq(), COUNT as u64);
    assert_eq!(store.queue_depth(&"ico".parse().unwrap()), 0);
}

// ---------------------------------------------------------------------------------------------
// 3 and 4. In-process: windows and queue limits

/// The in-process federation: the standard test configuration plus an agreement that lets the
/// NCA send threat assessments to the ICO.
fn relay_config(pki: &TestPki, data_dir: &Path) -> Config {
    let mut config = federation_config(pki, data_dir, None).unwrap();
    let today = time::OffsetDateTime::now_utc().date();
    config.policy.agreements.push(Agreement {
        id: "test-ico-nca".into(),
        title: "Test agreement between the ICO and the NCA".into(),
        parties: ["ico", "nca"].iter().map(|a| a.parse().unwrap()).collect(),
        signed: today - time::Duration::days(10),
        review_by: today + time::Duration::days(365),
        review: Default::default(),
        flows: vec![Flow {
            from: "nca".parse().unwrap(),
            to: "ico".parse().unwrap(),
            kinds: [Kind::ThreatAssessment].into_iter().collect(),
            clause: "2.1".into(),
            opaque: false,
            max_tlp: None,
            legal_bases: Default::default(),
            consent_refusal_note: None,
        }],
    });
    config
}

/// A threat assessment for the ICO under a fresh message id.
fn envelope(seq: usize) -> pb::Envelope {
    pb::Envelope {
        message_id: MessageId::new_random().to_string(),
        recipients: vec!["ico".into()],
        kind: pb::MessageKind::ThreatAssessment as i32,
        content_type: "application/json".into(),
        tlp: pb::Tlp::Amber as i32,
        payload: format!(r#"{{"seq":{seq}}}"#).into_bytes(),
        ..Default::default()
    }
}

async fn send(client: &Broker, envelope: pb::Envelope) -> Result<pb::Receipt, tonic::Status> {
    client
        .exchange()
        .send(envelope)
        .await
        .map(|r| r.into_inner())
}

async fn subscribe(client: &Broker, window: u32) -> Streaming<pb::Delivery> {
    client
        .exchange()
        .subscribe(pb::SubscribeRequest { window })
        .await
        .unwrap()
        .into_inner()
}

/// The next delivery, or a failure after [`DELIVERY_TIMEOUT`].
async fn next(stream: &mut Streaming<pb::Delivery>) -> pb::Delivery {
    tokio::time::timeout(DELIVERY_TIMEOUT, stream.message())
        .await
        .expect("no delivery within the timeout")
        .unwrap()
        .expect("the subscription ended")
}

/// Asserts that nothing more arrives on `stream` for [`QUIET`].
async fn assert_quiet(stream: &mut Streaming<pb::Delivery>, why: &str) {
    if let Ok(more) = tokio::time::timeout(QUIET, stream.message()).await {
        panic!("{why}, but got {more:?}");
    }
}

async fn ack(client: &Broker, ids: &[String]) -> u32 {
    client
        .exchange()
        .ack(pb::AckRequest {
            delivery_ids: ids.to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
        .acknowledged
}

/// A subscription with window 4 that does not acknowledge holds exactly 4 deliveries; each
/// acknowledgement lets exactly one more through; a second subscription of the same agency gets
/// other deliveries; and when the first ends, its unacknowledged deliveries go to the second.
#[tokio::test]
async fn a_slow_consumer_holds_only_its_window() {
    let mut pki = TestPki::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broker = spawn_broker(relay_config(&pki, dir.path())).await.unwrap();
    let nca = pki.connect(broker.addr, "nca").await.unwrap();
    for seq in 0..100 {
        send(&nca, envelope(seq)).await.unwrap();
    }
    let ico = pki.connect(broker.addr, "ico").await.unwrap();

    let mut first = subscribe(&ico, 4).await;
    let mut held: Vec<String> = Vec::new();
    for _ in 0..4 {
        held.push(next(&mut first).await.delivery_id);
    }
    assert_quiet(&mut first, "four deliveries are in flight on a window of 4").await;
    assert_eq!(ack(&ico, &held[..1]).await, 1);
    let acked = held.remove(0);
    held.push(next(&mut first).await.delivery_id);
    assert_quiet(
        &mut first,
        "one acknowledgement makes room for one delivery",
    )
    .await;
    assert!(!held.contains(&acked));

    // A second subscription gets other deliveries, up to its own window.
    let mut second = subscribe(&ico, 4).await;
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut unacked = Vec::new();
    for _ in 0..4 {
        let id = next(&mut second).await.delivery_id;
        assert!(
            !held.contains(&id) && id != acked,
            "delivery {id} is in flight on two subscriptions"
        );
        assert!(seen.insert(id.clone()), "delivery {id} came twice");
        unacked.push(id);
    }
    assert_quiet(&mut second, "the second subscription's window is full").await;

    // The first ends without acknowledging: what it held goes to the second.
    drop(first);
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    let mut recovered: BTreeSet<String> = BTreeSet::new();
    while recovered.len() < held.len() {
        assert!(
            Instant::now() < deadline,
            "only {recovered:?} of {held:?} were redelivered"
        );
        assert_eq!(ack(&ico, &unacked).await as usize, unacked.len());
        unacked.clear();
        let id = next(&mut second).await.delivery_id;
        assert_ne!(id, acked, "an acknowledged delivery came back");
        if held.contains(&id) {
            recovered.insert(id.clone());
        } else {
            assert!(seen.insert(id.clone()), "delivery {id} came twice");
        }
        unacked.push(id);
    }
    broker.stop().await.unwrap();
}

/// With room for 5 items, the 6th send to an offline recipient is refused with
/// `RECIPIENT_QUEUE_FULL` (gRPC `RESOURCE_EXHAUSTED`); once the recipient acknowledges two,
/// two more sends are accepted, and the next is refused again.
#[tokio::test]
async fn a_full_queue_refuses_until_the_recipient_acknowledges() {
    let mut pki = TestPki::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = relay_config(&pki, dir.path());
    config.limits.max_queue_depth = 5;
    let broker = spawn_broker(config).await.unwrap();
    let nca = pki.connect(broker.addr, "nca").await.unwrap();
    for seq in 0..5 {
        send(&nca, envelope(seq)).await.unwrap();
    }
    let sixth = envelope(5);
    let refused = send(&nca, sixth.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(
        reason_of(&refused).as_deref(),
        Some("RECIPIENT_QUEUE_FULL"),
        "{refused:?}"
    );

    let ico = pki.connect(broker.addr, "ico").await.unwrap();
    let mut stream = subscribe(&ico, 2).await;
    let ids = vec![
        next(&mut stream).await.delivery_id,
        next(&mut stream).await.delivery_id,
    ];
    assert_eq!(ack(&ico, &ids).await, 2);

    // The refused message was not stored: the same id is accepted now, as a first transfer.
    let receipt = send(&nca, sixth).await.unwrap();
    assert!(!receipt.duplicate);
    send(&nca, envelope(6)).await.unwrap();
    let refused = send(&nca, envelope(7)).await.unwrap_err();
    assert_eq!(reason_of(&refused).as_deref(), Some("RECIPIENT_QUEUE_FULL"));
    drop(stream);
    broker.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 5, 6 and 7. How the agent files what it cannot send, and how it stops

/// Malformed outbox files go to `failed/` with an `.error.txt` that names the problem; the agent
/// keeps running and sends the next good file.
#[test]
fn malformed_outbox_files_fail_and_the_agent_carries_on() {
    let fed = Federation::start(&Limits::default());
    let mut nca = fed.agent("nca");
    let spool = nca.spool().clone();
    spool
        .drop_bytes("a-not-json.json", b"this is not JSON")
        .unwrap();
    spool
        .drop_bytes(
            "b-bad-kind.json",
            br#"{"recipients":["ico"],"kind":"gossip","payload":{"x":1}}"#,
        )
        .unwrap();
    wait_for("both files in failed/", OUTCOME_TIMEOUT, || {
        match spool.count_moved("failed") {
            2 => Ok(()),
            n => Err(format!("{n} failed")),
        }
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&fed.broker, &[&nca])));
    let error = |name: &str| {
        std::fs::read_to_string(spool.folder("failed").join(format!("{name}.error.txt"))).unwrap()
    };
    assert!(
        error("a-not-json.json").contains("not a valid outbox message"),
        "{}",
        error("a-not-json.json")
    );
    let bad_kind = error("b-bad-kind.json");
    assert!(
        bad_kind.contains("kind") && bad_kind.contains("gossip"),
        "{bad_kind}"
    );
    assert_eq!(
        moved(&spool, "failed"),
        BTreeSet::from(["a-not-json.json".to_owned(), "b-bad-kind.json".to_owned()])
    );
    assert!(nca.is_running(), "the agent stopped on a malformed file");

    spool
        .drop_message("c-good.json", &message("ico", 1))
        .unwrap();
    wait_for("the good file sent", OUTCOME_TIMEOUT, || {
        match spool.count_moved("sent") {
            1 => Ok(()),
            n => Err(format!("{n} sent")),
        }
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&fed.broker, &[&nca])));
    assert!(spool.folder("sent").join("c-good.json").exists());
    assert!(spool.files("outbox").unwrap().is_empty());
    assert!(nca.is_running());
}

/// A payload over the broker's `max_message_bytes` is refused with `PAYLOAD_TOO_LARGE` and the
/// file lands in `refused/` with that reason; a small one beside it is accepted, though the
/// refusal ended the stream they shared.
#[test]
fn an_oversized_payload_is_refused_with_its_reason() {
    let fed = Federation::start(&Limits {
        max_message_bytes: 1024,
        ..Limits::default()
    });
    let nca = fed.agent("nca");
    let spool = nca.spool().clone();
    let id = MessageId::new_random().to_string();
    // A payload file, outside the outbox, as an agency's system would leave it.
    std::fs::create_dir_all(spool.folder("payloads")).unwrap();
    std::fs::write(spool.folder("payloads").join("big.bin"), [b'x'; 2000]).unwrap();
    spool
        .drop_message(
            "big.json",
            &json!({
                "message_id": id,
                "recipients": ["ico"],
                "kind": "threat_assessment",
                "payload_file": "payloads/big.bin",
            }),
        )
        .unwrap();
    spool
        .drop_message("small.json", &message("ico", 1))
        .unwrap();
    wait_for("both files handled", OUTCOME_TIMEOUT, || {
        let (r, s) = (spool.count_moved("refused"), spool.count_moved("sent"));
        if (r, s) == (1, 1) {
            Ok(())
        } else {
            Err(format!("{r} refused, {s} sent"))
        }
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&fed.broker, &[&nca])));
    assert!(spool.folder("refused").join("big.json").exists());
    assert!(spool.folder("sent").join("small.json").exists());
    let reason: ReasonFile =
        serde_json::from_value(spool.read_json("refused", "big.json.reason.json").unwrap())
            .unwrap();
    assert_eq!(reason.reason, "PAYLOAD_TOO_LARGE", "{}", reason.message);
    assert_eq!(reason.message_id, id);
    assert!(reason.message.contains("2000"), "{}", reason.message);
    // The agent sends through SendStream: the stream ended on the oversized envelope, and the
    // file beside it was answered on the stream or sent again on its own.
    let log = fed.broker.log_text();
    for outcome in ["refused", "accepted"] {
        assert!(
            log.lines()
                .any(|l| l.contains(outcome) && l.contains("rpc=\"Exchange.SendStream\"")),
            "not {outcome} on the stream:\n{log}"
        );
    }
}

/// An envelope too large for the broker to read ends the `SendStream` it came on (the
/// transport refuses it before any decision): the agent files it under `PAYLOAD_TOO_LARGE`,
/// and the files that shared its stream are sent again on their own and accepted.
#[test]
fn an_envelope_too_large_to_read_refuses_only_itself() {
    let fed = Federation::start(&Limits {
        max_message_bytes: 1024,
        ..Limits::default()
    });
    // The files are there before the agent starts, so that its first pass takes them all.
    let spool = SpoolDir::new(&fed.dir.path().join("nca"));
    std::fs::create_dir_all(spool.folder("payloads")).unwrap();
    // Past the payload limit and the envelope's allowance for the rest (64 KiB).
    std::fs::write(
        spool.folder("payloads").join("huge.bin"),
        vec![b'x'; 200_000],
    )
    .unwrap();
    let id = MessageId::new_random().to_string();
    let huge = json!({
        "message_id": id,
        "recipients": ["ico"],
        "kind": "threat_assessment",
        "payload_file": "payloads/huge.bin",
    });
    // Taken in name order: the huge one first, the others behind it on the same stream.
    spool.drop_message("a-huge.json", &huge).unwrap();
    for n in 1..=8 {
        spool
            .drop_message(&format!("b-{n}.json"), &message("ico", n))
            .unwrap();
    }
    let nca = fed.agent("nca");
    wait_for("every file handled", OUTCOME_TIMEOUT, || {
        let (r, s) = (spool.count_moved("refused"), spool.count_moved("sent"));
        if (r, s) == (1, 8) {
            Ok(())
        } else {
            Err(format!("{r} refused, {s} sent"))
        }
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&fed.broker, &[&nca])));
    let reason: ReasonFile = serde_json::from_value(
        spool
            .read_json("refused", "a-huge.json.reason.json")
            .unwrap(),
    )
    .unwrap();
    assert_eq!(reason.reason, "PAYLOAD_TOO_LARGE", "{}", reason.message);
    assert_eq!(reason.message_id, id);
    // Refused on the stream; the others on it, or (those behind it) by a Send of their own.
    let log = fed.broker.log_text();
    // (Once, or again on a new stream if the connection's reset came before the refusal.)
    assert!(
        log_lines(&log, "PAYLOAD_TOO_LARGE", "Exchange.SendStream") >= 1,
        "{log}"
    );
    let accepted = log_lines(&log, "accepted", "Exchange.SendStream")
        + log_lines(&log, "accepted", "Exchange.Send");
    assert_eq!(accepted, 8, "{log}");
}

/// The broker's log lines containing `what` that name the call `rpc`.
fn log_lines(log: &str, what: &str, rpc: &str) -> usize {
    let rpc = format!("rpc=\"{rpc}\"");
    log.lines()
        .filter(|l| l.contains(what) && l.contains(&rpc))
        .count()
}

/// A pass of more files than the agent has in flight, or the broker decides at once on one
/// stream: each file is filed under its own answer. Accepted ones carry receipts for their
/// own message ids; one to a recipient nobody knows is refused `UNKNOWN_RECIPIENT`; of two
/// files that reuse one message id for different content, the later is refused
/// `MESSAGE_ID_REUSED`; and everything goes over the stream, none by `Send`.
#[test]
fn a_long_pass_over_one_stream_files_each_answer_with_its_own_file() {
    let fed = Federation::start(&Limits::default());
    // The files are there before the agent starts, so that its first pass takes them all.
    let spool = SpoolDir::new(&fed.dir.path().join("nca"));
    let reused = MessageId::new_random().to_string();
    let mut ids = BTreeMap::new();
    for n in 0..120 {
        let name = format!("m-{n:03}.json");
        let id = match n {
            50 | 90 => reused.clone(),
            _ => MessageId::new_random().to_string(),
        };
        let mut body = message(if n == 37 { "nobody" } else { "ico" }, n);
        body["message_id"] = json!(id);
        spool.drop_message(&name, &body).unwrap();
        ids.insert(name, id);
    }
    let nca = fed.agent("nca");
    wait_for("every file handled", OUTCOME_TIMEOUT, || {
        let (r, s) = (spool.count_moved("refused"), spool.count_moved("sent"));
        if r + s == 120 {
            Ok(())
        } else {
            Err(format!("{r} refused, {s} sent"))
        }
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&fed.broker, &[&nca])));
    // Of the two files with one id, whichever went second is refused (they load in parallel).
    let refused = moved(&spool, "refused");
    let (first, second) = if refused.contains("m-090.json") {
        ("m-050.json", "m-090.json")
    } else {
        ("m-090.json", "m-050.json")
    };
    let expected: BTreeSet<String> = ["m-037.json".to_owned(), second.to_owned()].into();
    assert_eq!(refused, expected);
    let reason = |file: &str| -> ReasonFile {
        serde_json::from_value(
            spool
                .read_json("refused", &format!("{file}.reason.json"))
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(reason("m-037.json").reason, "UNKNOWN_RECIPIENT");
    assert_eq!(reason("m-037.json").message_id, ids["m-037.json"]);
    assert_eq!(reason(second).reason, "MESSAGE_ID_REUSED");
    assert_eq!(reason(second).message_id, reused);
    let receipts = receipts(&spool);
    assert_eq!(receipts.len(), 118);
    assert_eq!(receipts[first].message_id, reused);
    for (file, receipt) in &receipts {
        assert_eq!(receipt.message_id, ids[file], "{file}");
    }
    let log = fed.broker.log_text();
    assert_eq!(
        log_lines(&log, "accepted", "Exchange.SendStream"),
        118,
        "{log}"
    );
    assert_eq!(log_lines(&log, "accepted", "Exchange.Send"), 0, "{log}");
}

/// SIGTERM to the broker while an agent drains a long outbox over one stream: the broker stops
/// taking the stream's envelopes, answers those it has and exits promptly, rather than waiting
/// for the agent's pass to end. Started again, it takes the rest: every file ends in `sent/`
/// with its receipt, and each message was accepted once.
#[test]
fn a_broker_stops_promptly_while_an_agent_streams_to_it() {
    const COUNT: usize = 4000;
    let mut fed = Federation::start(&Limits::default());
    let spool = SpoolDir::new(&fed.dir.path().join("nca"));
    for seq in 0..COUNT {
        spool
            .drop_message(&format!("m{seq:04}.json"), &message("ico", seq))
            .unwrap();
    }
    let nca = fed.agent("nca");
    wait_for("20 files sent", OUTCOME_TIMEOUT, || {
        match spool.count_moved("sent") {
            n if n >= 20 => Ok(n),
            n => Err(format!("{n} sent")),
        }
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&fed.broker, &[&nca])));
    let signalled = Instant::now();
    let status = fed
        .broker
        .terminate(STOP_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&fed.broker, &[&nca])));
    let took = signalled.elapsed();
    let sent_then = spool.count_moved("sent");
    assert!(status.success(), "the broker exited with {status}");
    assert!(
        took < Duration::from_secs(5),
        "the broker took {took:?} to stop ({sent_then} of {COUNT} files sent by then)"
    );
    assert!(
        sent_then < COUNT,
        "the whole outbox went before the broker stopped"
    );

    fed.broker.restart().unwrap();
    wait_for(
        "every file sent after the restart",
        OUTCOME_TIMEOUT * 4,
        || match spool.count_moved("sent") {
            COUNT => Ok(()),
            n => Err(format!("{n} sent")),
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&fed.broker, &[&nca])));
    assert!(spool.files("outbox").unwrap().is_empty());
    assert_eq!(receipts(&spool).len(), COUNT);
    let log = fed.broker.log_text();
    let first_acceptances = log
        .lines()
        .filter(|l| l.contains(" accepted ") && l.contains("duplicate=false"))
        .count();
    assert_eq!(first_acceptances, COUNT, "{}", logs(&fed.broker, &[&nca]));
    // What was stopped was a stream.
    assert!(log_lines(&log, "accepted", "Exchange.SendStream") > 0);
}

/// SIGTERM while the agent is sending: it exits with status 0 within a few seconds, having
/// finished only the files in hand, and leaves every file either in the outbox or in `sent/`
/// with its receipt. Started again, it sends the rest.
#[test]
fn sigterm_stops_the_agent_promptly_with_nothing_half_moved() {
    const COUNT: usize = 600;
    /// The agent sends 32 files at once; twice that bounds what it may finish after SIGTERM.
    const IN_HAND: usize = 64;
    let fed = Federation::start(&Limits::default());
    let mut nca = fed.agent("nca");
    let spool = nca.spool().clone();
    for seq in 0..COUNT {
        spool
            .drop_message(&format!("m{seq:04}.json"), &message("ico", seq))
            .unwrap();
    }
    let before = wait_for("20 files sent", OUTCOME_TIMEOUT, || {
        match spool.count_moved("sent") {
            n if n >= 20 => Ok(n),
            n => Err(format!("{n} sent")),
        }
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&fed.broker, &[&nca])));
    let signalled = Instant::now();
    let status = nca
        .terminate(STOP_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", nca.log_tail(20)));
    let took = signalled.elapsed();
    assert!(status.success(), "the agent exited with {status}");
    assert!(
        took < Duration::from_secs(5),
        "the agent took {took:?} to stop"
    );

    let waiting: BTreeSet<String> = spool.files("outbox").unwrap().into_iter().collect();
    let sent = moved(&spool, "sent");
    let receipts = receipts(&spool);
    assert_eq!(
        receipts.keys().cloned().collect::<BTreeSet<_>>(),
        sent,
        "a sent file without its receipt, or a receipt without its file"
    );
    assert!(waiting.is_disjoint(&sent), "a file both waiting and sent");
    assert_eq!(waiting.len() + sent.len(), COUNT, "files went missing");
    assert!(spool.partial_files("outbox").unwrap().is_empty());
    assert!(spool.partial_files("sent").unwrap().is_empty());
    assert!(
        sent.len() <= before + IN_HAND,
        "{} files were sent after SIGTERM (at most {IN_HAND} may be in hand)",
        sent.len() - before
    );

    nca.restart().unwrap();
    wait_for(
        "the rest sent after a restart",
        OUTCOME_TIMEOUT,
        || match spool.count_moved("sent") {
            COUNT => Ok(()),
            n => Err(format!("{n} sent")),
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&fed.broker, &[&nca])));
    assert!(spool.files("outbox").unwrap().is_empty());
}

/// The agent keeps each receipt's whole proof (entry, signed checkpoint, inclusion proof) in
/// `sent/<name>.receipt.json`, and `concordat receipt verify FILE --log-key K` checks it offline,
/// with nothing but the file and the log's verifier key; a changed byte in the entry, or another
/// log's key, fails it.
#[test]
fn a_saved_receipt_verifies_offline_and_a_changed_one_does_not() {
    let fed = Federation::start(&Limits::default());
    let mut nca = fed.agent("nca");
    let outbox = nca.spool().clone();
    outbox.drop_message("m.json", &message("ico", 1)).unwrap();
    wait_for("the file sent", OUTCOME_TIMEOUT, || {
        match outbox.count_moved("sent") {
            1 => Ok(()),
            n => Err(n.to_string()),
        }
    })
    .unwrap();
    let receipt = outbox.root().join("sent/m.json.receipt.json");
    let saved: ReceiptFile = serde_json::from_slice(&std::fs::read(&receipt).unwrap()).unwrap();
    let proof = saved.proof.as_ref().expect("the receipt keeps its proof");
    assert_eq!(Some(proof.log_index), saved.log_index);

    let key = log_key(&fed);
    let (code, said) = receipt_verify(&receipt, &key);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.starts_with("VERIFIED: transfer"), "{said}");

    // One byte of the entry changed (the base64 re-encoded, so the file still parses).
    let mut tampered = saved;
    {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let p = tampered.proof.as_mut().unwrap();
        let mut entry = b64.decode(&p.entry).unwrap();
        let last = entry.len() - 1;
        entry[last] ^= 1;
        p.entry = b64.encode(entry);
    }
    let dir = tempfile::tempdir().unwrap();
    let changed = dir.path().join("changed.receipt.json");
    std::fs::write(&changed, serde_json::to_vec(&tampered).unwrap()).unwrap();
    let (code, said) = receipt_verify(&changed, &key);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.starts_with("FAILED:"), "{said}");

    // Every field the entry records is held to it, and a refusal names the field.
    type Forge = fn(&mut ReceiptFile);
    let forgeries: [(&str, Forge); 5] = [
        ("agreement_id", |r| {
            r.authorities[0].agreement_id = "forged-mou".into()
        }),
        ("clause", |r| r.authorities[0].clause = "9.9".into()),
        ("accepted_at", |r| {
            r.accepted_at = "2020-01-01T00:00:00Z".into()
        }),
        ("consent_jti", |r| r.consent_jti = "forged-jti".into()),
        ("authorities", |r| r.authorities.clear()),
    ];
    for (field, forge) in forgeries {
        let mut forged: ReceiptFile =
            serde_json::from_slice(&std::fs::read(&receipt).unwrap()).unwrap();
        forge(&mut forged);
        std::fs::write(&changed, serde_json::to_vec(&forged).unwrap()).unwrap();
        let (code, said) = receipt_verify(&changed, &key);
        assert_eq!(code, Some(1), "{field}: {said}");
        assert!(
            said.starts_with("FAILED:") && said.contains(field),
            "{field}: {said}"
        );
    }

    // Another log's key does not verify the checkpoint.
    let other = concordat_proto::checkpoint::LogSigner::generate(DEFAULT_ORIGIN)
        .unwrap()
        .verifier_key();
    let (code, said) = receipt_verify(&receipt, &other);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("checkpoint does not verify"), "{said}");
    let _ = nca.terminate(STOP_TIMEOUT);
}

/// A delivery lands in the recipient's inbox with the proof of the broker's acceptance of it
/// (the `transfer_accepted` entry naming this payload's SHA-256, sender and recipients), which
/// the recipient's agent, configured with the log key, checked before acknowledging; and
/// `concordat receipt verify` checks the inbox file offline. A changed sender, a changed payload
/// digest or another log's key fails it.
#[test]
fn an_inbox_file_keeps_the_proof_of_its_delivery_and_verifies_offline() {
    let fed = Federation::start(&Limits::default());
    let key = log_key(&fed);
    let mut ico = AgentProcess::start_with(
        &fed.dir.path().join("ico"),
        "ico",
        fed.broker.addr(),
        &fed.pki,
        &format!("log_key = \"{key}\"\n[reconnect]\nmin_backoff_ms = 50\nmax_backoff_ms = 1000\n"),
    )
    .unwrap();
    let mut nca = fed.agent("nca");
    nca.spool()
        .drop_message("m.json", &message("ico", 1))
        .unwrap();
    let inbox = ico.spool().clone();
    let name = wait_for("the delivery in the inbox", OUTCOME_TIMEOUT, || match inbox
        .files("inbox")
        .unwrap()
        .as_slice()
    {
        [one] => Ok(one.clone()),
        other => Err(format!("{other:?}\n{}", logs(&fed.broker, &[&ico, &nca]))),
    })
    .unwrap();
    let file = inbox.folder("inbox").join(&name);
    let written: serde_json::Value = inbox.read_json("inbox", &name).unwrap();
    let proof = &written["proof"];
    assert!(proof["entry"].is_string(), "{written}");
    assert!(proof["checkpoint"].is_string(), "{written}");

    let (code, said) = receipt_verify(&file, &key);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.starts_with("VERIFIED: delivery of transfer"), "{said}");
    // The content type is not in the log, and the verdict says it is not verified.
    assert!(said.contains("content_type"), "{said}");

    let dir = tempfile::tempdir().unwrap();
    let tampered = |what: &str, f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = written.clone();
        f(&mut v);
        let path = dir.path().join(format!("{what}.json"));
        std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        path
    };
    type Change<'a> = &'a dyn Fn(&mut serde_json::Value);
    // Each named field is the one the refusal names.
    let cases: [(&str, Change<'_>); 9] = [
        ("sender", &|v| v["sender"] = json!("ncsc")),
        ("payload_sha256", &|v| {
            v["payload_sha256"] = json!("00".repeat(32))
        }),
        ("tlp", &|v| v["tlp"] = json!("red")),
        ("kind", &|v| v["kind"] = json!("incident_record")),
        ("organisation", &|v| {
            v["organisation"] = json!("someone-else")
        }),
        ("consent_jti", &|v| v["consent_jti"] = json!("forged-jti")),
        ("incident_ref", &|v| v["incident_ref"] = json!("nca:OTHER")),
        ("agreement_id", &|v| v["agreement_id"] = json!("forged-mou")),
        ("accepted_at", &|v| {
            v["accepted_at"] = json!("2020-01-01T00:00:00Z")
        }),
    ];
    for (what, change) in cases {
        let (code, said) = receipt_verify(&tampered(what, change), &key);
        assert_eq!(code, Some(1), "{what}: {said}");
        assert!(
            said.starts_with("FAILED:") && said.contains(what),
            "{what}: {said}"
        );
    }
    let other = concordat_proto::checkpoint::LogSigner::generate(DEFAULT_ORIGIN)
        .unwrap()
        .verifier_key();
    let (code, said) = receipt_verify(&file, &other);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("checkpoint does not verify"), "{said}");
    let _ = nca.terminate(STOP_TIMEOUT);
    let _ = ico.terminate(STOP_TIMEOUT);
}

/// A stopped broker has closed its store: the data directory can be opened at once (as a
/// restarted broker or `concordat-broker verify` would), even when it stopped with a
/// subscription open and refusals still to flush.
#[tokio::test]
async fn a_stopped_broker_has_let_go_of_its_store() {
    let mut pki = TestPki::new().unwrap();
    for round in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let broker = spawn_broker(relay_config(&pki, dir.path())).await.unwrap();
        let nca = pki.connect(broker.addr, "nca").await.unwrap();
        send(&nca, envelope(round)).await.unwrap();
        let ico = pki.connect(broker.addr, "ico").await.unwrap();
        let mut stream = subscribe(&ico, 4).await;
        next(&mut stream).await;
        broker.stop().await.unwrap();
        let opened = concordat_broker::store::SledStorage::open(
            dir.path(),
            concordat_broker::audit_log::DEFAULT_ORIGIN,
        );
        assert!(
            opened.is_ok(),
            "round {round}: the store is still held: {:?}",
            opened.err()
        );
        drop(stream);
    }
}

/// The broker's log verifier key, as `concordat-broker log-key` prints it.
fn log_key(fed: &Federation) -> String {
    concordat_tests::log_key(&fed.dir.path().join("broker.toml"), fed.broker.data_dir()).unwrap()
}

/// `concordat receipt verify FILE --log-key KEY`: its exit status and what it printed.
fn receipt_verify(file: &Path, key: &str) -> (Option<i32>, String) {
    let out = std::process::Command::new(concordat_tests::binary("concordat").unwrap())
        .args(["receipt", "verify"])
        .arg(file)
        .args(["--log-key", key])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}
