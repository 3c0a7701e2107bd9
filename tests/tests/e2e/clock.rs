//! The broker's clock never goes back: a real broker process restarted under a wall clock two
//! hours behind (libfaketime, Debian's `faketime` package, which `.ci/run` installs) dates its
//! new audit entries no earlier than the newest entry it logged before, so the log's times
//! never decrease. Where libfaketime is missing the test says so and passes without running.

use std::{path::Path, time::Duration};

use concordat_broker::config::Limits;
use concordat_proto::{audit, ids::MessageId, pb};
use concordat_tests::process::{BrokerProcess, write_broker_files};
use tokio::runtime::Runtime;

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

fn envelope() -> pb::Envelope {
    pb::Envelope {
        message_id: MessageId::new_random().to_string(),
        recipients: vec!["ico".into()],
        kind: pb::MessageKind::ThreatAssessment as i32,
        content_type: "application/json".into(),
        tlp: pb::Tlp::Green as i32,
        payload: br#"{"summary":"clock"}"#.to_vec(),
        ..Default::default()
    }
}

/// Every entry's time, in log order, exported by the auditor.
async fn entry_times(auditor: &concordat_agent::client::Broker) -> Vec<(i64, i32)> {
    let mut stream = auditor
        .audit()
        .export(pb::ExportRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut times = Vec::new();
    while let Some(item) = stream.message().await.unwrap() {
        if let Some(pb::export_item::Item::Record(r)) = item.item {
            let t = audit::decode(&r.entry).unwrap().time.unwrap();
            times.push((t.seconds, t.nanos));
        }
    }
    times
}

#[test]
fn a_wall_clock_stepping_back_does_not_date_entries_back() {
    if !Path::new(LIBFAKETIME).exists() {
        eprintln!("SKIPPED: {LIBFAKETIME} is missing (apt-get install faketime)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let (files, config) = write_broker_files(
        dir.path(),
        &["ico", "nca", "auditor"],
        &data_dir,
        &Limits::default(),
    )
    .unwrap();
    let rt = Runtime::new().unwrap();
    let mut broker = BrokerProcess::start(&config, &data_dir).unwrap();
    let tls = |broker: &BrokerProcess, agency: &str| files.client(broker.addr(), agency).unwrap();
    rt.block_on(async {
        let nca = tls(&broker, "nca").connect().await.unwrap();
        for _ in 0..5 {
            nca.exchange().send(envelope()).await.unwrap();
        }
    });
    assert!(broker.terminate(Duration::from_secs(10)).unwrap().success());

    // Two hours back: the certificates are still valid (they start a day ago).
    broker.set_env(&[
        ("LD_PRELOAD", LIBFAKETIME),
        ("FAKETIME", "-2h"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ]);
    broker.restart().unwrap();
    let times = rt.block_on(async {
        let nca = tls(&broker, "nca").connect().await.unwrap();
        for _ in 0..5 {
            nca.exchange().send(envelope()).await.unwrap();
        }
        let auditor = tls(&broker, "auditor").connect().await.unwrap();
        entry_times(&auditor).await
    });
    assert!(times.len() >= 12, "{times:?}");
    let backwards: Vec<_> = times
        .windows(2)
        .enumerate()
        .filter(|(_, w)| w[1] < w[0])
        .map(|(i, w)| format!("entry {}: {:?} after {:?}", i + 1, w[1], w[0]))
        .collect();
    assert!(
        backwards.is_empty(),
        "audit times go backwards: {backwards:?}\n{}",
        broker.log_tail(10)
    );
    let log = broker.log_tail(100);
    assert!(log.contains("wall clock is behind"), "{log}");
}
