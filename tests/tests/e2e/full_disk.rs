//! A full disk fails loudly and recovers: with a real broker process on a small tmpfs, a
//! nearly full disk refuses `Send` with `STORAGE_FULL` while subscriptions and
//! acknowledgements drain the queues, and a disk that fills up entirely answers every request
//! (`STORAGE_UNAVAILABLE`), turns health `NOT_SERVING`, logs why, and then either recovers or
//! exits non-zero; it never hangs.
//!
//! The tests mount a tmpfs (root may mount on these machines). Where the mount is refused they
//! say so on standard error and pass without running: they cannot run there, and that is
//! printed, never silent.

use std::{
    fs,
    path::PathBuf,
    time::{Duration, Instant},
};

use concordat_agent::client::{Broker, ClientTls};
use concordat_broker::{config::Limits, refusal::reason_of};
use concordat_proto::{ids::MessageId, pb};
use concordat_tests::process::{BrokerProcess, PkiFiles, Tmpfs, wait_for, write_broker_files};
use tokio::runtime::Runtime;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

/// How long any one request may take before the test calls it a hang.
const ANSWER_WITHIN: Duration = Duration::from_secs(20);

struct Site {
    _dir: tempfile::TempDir,
    files: PkiFiles,
    config: PathBuf,
    data_dir: PathBuf,
    disk: Tmpfs,
}

impl Site {
    fn new(mib: u64, limits: &Limits) -> Option<Site> {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let disk = match Tmpfs::mount(&data_dir, mib) {
            Ok(disk) => disk,
            Err(why) => {
                eprintln!("SKIPPED: {why} (the test needs root and the right to mount a tmpfs)");
                return None;
            }
        };
        let (files, config) =
            write_broker_files(dir.path(), &["ico", "nca", "auditor"], &data_dir, limits).unwrap();
        Some(Site {
            _dir: dir,
            files,
            config,
            data_dir,
            disk,
        })
    }

    fn tls(&self, broker: &BrokerProcess, agency: &str) -> ClientTls {
        self.files.client(broker.addr(), agency).unwrap()
    }
}

fn envelope(bytes: usize) -> pb::Envelope {
    pb::Envelope {
        message_id: MessageId::new_random().to_string(),
        recipients: vec!["ico".into()],
        kind: pb::MessageKind::ThreatAssessment as i32,
        content_type: "application/octet-stream".into(),
        tlp: pb::Tlp::Amber as i32,
        payload: (0..bytes).map(|i| (i * 7 + 3) as u8).collect(),
        ..Default::default()
    }
}

/// What a send came to: `Ok`, or the status code and reason.
async fn send(client: &Broker, e: pb::Envelope) -> Result<(), (tonic::Code, Option<String>)> {
    match tokio::time::timeout(ANSWER_WITHIN, client.exchange().send(e)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(s)) => Err((s.code(), reason_of(&s))),
        Err(_) => panic!("a Send got no answer within {ANSWER_WITHIN:?}: the broker hangs"),
    }
}

async fn health(client: &Broker) -> Option<i32> {
    let mut h = tonic_health::pb::health_client::HealthClient::new(client.channel());
    tokio::time::timeout(
        ANSWER_WITHIN,
        h.check(HealthCheckRequest {
            service: "concordat.v1.Exchange".into(),
        }),
    )
    .await
    .ok()?
    .ok()
    .map(|r| r.into_inner().status)
}

/// Below the free-space floor, `Send` is refused with `STORAGE_FULL`, while the recipient
/// still receives and acknowledges what is queued; with space back, sends are accepted again.
#[test]
fn below_the_floor_sends_are_refused_and_queues_drain() {
    let limits = Limits {
        min_free_bytes: 24 * 1024 * 1024,
        ..Limits::default()
    };
    let Some(site) = Site::new(96, &limits) else {
        return;
    };
    let rt = Runtime::new().unwrap();
    let broker = BrokerProcess::start(&site.config, &site.data_dir).unwrap();
    let (nca, ico) = (site.tls(&broker, "nca"), site.tls(&broker, "ico"));
    rt.block_on(async {
        let nca = nca.connect().await.unwrap();
        for _ in 0..3 {
            send(&nca, envelope(512)).await.unwrap();
        }
        let filler = site.disk.fill_leaving("filler", 16 * 1024 * 1024);
        // The broker measures free space at least every second.
        let deadline = Instant::now() + Duration::from_secs(10);
        let refused = loop {
            match send(&nca, envelope(512)).await {
                Err(r) => break r,
                Ok(()) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Ok(()) => panic!("sends are still accepted below the floor"),
            }
        };
        assert_eq!(
            refused,
            (tonic::Code::ResourceExhausted, Some("STORAGE_FULL".into()))
        );

        // The recipient drains its queue meanwhile.
        let ico = ico.connect().await.unwrap();
        let mut stream = ico
            .exchange()
            .subscribe(pb::SubscribeRequest { window: 16 })
            .await
            .unwrap()
            .into_inner();
        let mut ids = Vec::new();
        while ids.len() < 3 {
            let d = tokio::time::timeout(ANSWER_WITHIN, stream.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            ids.push(d.delivery_id);
        }
        let acked = ico
            .exchange()
            .ack(pb::AckRequest { delivery_ids: ids })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(acked.acknowledged, 3);

        fs::remove_file(filler).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while send(&nca, envelope(512)).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "sends are still refused with space back"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let log = broker.log_tail(200);
    assert!(
        log.contains("STORAGE_FULL"),
        "the refusal is not logged:\n{log}"
    );
}

/// A disk that fills up entirely: every send is answered (accepted, or refused with
/// `STORAGE_UNAVAILABLE` once the flush fails or stalls), health turns `NOT_SERVING`, the log
/// says why; with space back the broker either serves again or has exited non-zero, and then
/// restarts on its store.
#[test]
fn a_full_disk_fails_loudly_and_never_hangs() {
    let limits = Limits {
        min_free_bytes: 0,
        flush_timeout: Duration::from_millis(1500),
        ..Limits::default()
    };
    let Some(site) = Site::new(64, &limits) else {
        return;
    };
    let rt = Runtime::new().unwrap();
    let mut broker = BrokerProcess::start(&site.config, &site.data_dir).unwrap();
    let nca = site.tls(&broker, "nca");
    let filler = rt.block_on(async {
        let client = nca.connect().await.unwrap();
        send(&client, envelope(512)).await.unwrap();
        let filler = site.disk.fill_leaving("filler", 2 * 1024 * 1024);
        let mut unavailable = 0;
        let mut accepted = 0;
        for _ in 0..200 {
            match send(&client, envelope(64 * 1024)).await {
                Ok(()) => accepted += 1,
                Err((tonic::Code::Unavailable, Some(r))) if r == "STORAGE_UNAVAILABLE" => {
                    unavailable += 1;
                    if unavailable >= 3 {
                        break;
                    }
                }
                // The broker gave up and exited: the connection is gone.
                Err((tonic::Code::Unavailable, None)) | Err((tonic::Code::Unknown, None)) => {
                    break;
                }
                Err(other) => panic!("unexpected answer to a send on a full disk: {other:?}"),
            }
        }
        assert!(
            unavailable > 0,
            "the disk never filled ({accepted} accepted)"
        );
        if let Some(status) = health(&client).await {
            assert_eq!(status, ServingStatus::NotServing as i32);
        }
        // An auditor is answered too, with the checkpoint signed before the disk filled (the
        // broker does not wait for the writer to sign what it cannot write: at once while the
        // storage is unavailable, after at most 5 s if a probe has just found it back), unless
        // the broker has given up and gone.
        if let Ok(auditor) = site.tls(&broker, "auditor").connect().await {
            let mut audit = auditor.audit();
            let asked = audit.checkpoint(pb::CheckpointRequest::default());
            match tokio::time::timeout(ANSWER_WITHIN, asked).await {
                Ok(Ok(answer)) => assert!(!answer.into_inner().checkpoint.is_empty()),
                Ok(Err(status)) => assert!(
                    matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown
                    ),
                    "{status:?}"
                ),
                Err(_) => panic!("Audit.Checkpoint got no answer within {ANSWER_WITHIN:?}"),
            }
        }
        filler
    });
    let log = broker.log_tail(400);
    assert!(
        log.contains("storage unavailable"),
        "the broker did not log why:\n{log}"
    );

    // Space back: the broker serves again, or it has exited non-zero for a supervisor.
    fs::remove_file(filler).unwrap();
    let recovered = wait_for("recovery or exit", Duration::from_secs(60), || {
        if !broker.is_running() {
            return Ok(false);
        }
        let ok = rt.block_on(async {
            match nca.connect().await {
                Ok(c) => send(&c, envelope(512)).await.is_ok(),
                Err(_) => false,
            }
        });
        if ok {
            Ok(true)
        } else {
            Err("still refusing".into())
        }
    })
    .unwrap();
    if !recovered {
        let status = broker.kill().unwrap();
        assert!(!status.success(), "the broker gave up with exit {status}");
        let log = broker.log_tail(50);
        assert!(log.contains("giving up"), "{log}");
        broker.restart().unwrap();
        rt.block_on(async {
            let c = nca.connect().await.unwrap();
            send(&c, envelope(512)).await.unwrap();
        });
    }
    eprintln!(
        "full disk: {}",
        if recovered {
            "recovered in place"
        } else {
            "exited non-zero, restarted"
        }
    );
}
