//! The MoUs' workflows over mTLS against a real broker process (docs/workflows.md): a
//! subject-access consultation answered and closed, with the refusals that guard it; a
//! consultation whose deadline passes while the broker is stopped, the timer firing after the
//! restart; incident coordination notices; statements agreed in advance. Every notice is a
//! delivery with the proof of its `notice_queued` entry.

use std::{path::Path, time::Duration};

use concordat_agent::{
    client::{Broker, refusal_of},
    spool::verify_inbox_file,
};
use concordat_broker::{config::Limits, store::timestamp as ts};
use concordat_proto::{
    audit,
    checkpoint::LogVerifier,
    ids::MessageId,
    pb::{self, audit_entry::Event},
};
use concordat_tests::process::{
    AgentProcess, BrokerProcess, PkiFiles, wait_for, write_broker_files,
};
use time::OffsetDateTime;
use tokio::runtime::Runtime;
use tokio_stream::StreamExt as _;

/// The test federation, with subject-access consultations both ways between the NCA and the
/// ICO and public communications between the ICO and the NCSC; reminders 2 s before a deadline.
fn federation(dir: &Path) -> (PkiFiles, std::path::PathBuf, std::path::PathBuf) {
    let data_dir = dir.join("data");
    let (files, config) = write_broker_files(
        dir,
        &["ico", "ncsc", "nca", "auditor"],
        &data_dir,
        &Limits::default(),
    )
    .unwrap();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(
        r#"
[[agreements.flows]]
from = "nca"
to = "ico"
kinds = ["dsar_consultation"]
clause = "2.2"
opaque = true

[[agreements.flows]]
from = "ico"
to = "nca"
kinds = ["dsar_consultation"]
clause = "2.3"
opaque = true

[[agreements]]
id = "test-comms"
title = "Test agreement on public communications between the ICO and the NCSC"
parties = ["ico", "ncsc"]
signed = 2024-01-01
review_by = 2099-12-31

[[agreements.flows]]
from = "ico"
to = "ncsc"
kinds = ["public_communication"]
clause = "3.1"
opaque = true

[[agreements.flows]]
from = "ncsc"
to = "ico"
kinds = ["public_communication"]
clause = "3.2"
opaque = true

[workflows]
dsar_reminder_before = "2s"
"#,
    );
    std::fs::write(&config, text).unwrap();
    (files, config, data_dir)
}

fn envelope(
    to: &[&str],
    kind: pb::MessageKind,
    step: Option<pb::workflow_step::Step>,
) -> pb::Envelope {
    pb::Envelope {
        message_id: MessageId::new_random().to_string(),
        recipients: to.iter().map(|s| (*s).into()).collect(),
        kind: kind as i32,
        content_type: "application/octet-stream".into(),
        tlp: pb::Tlp::Amber as i32,
        payload: b"a letter".to_vec(),
        workflow: step.map(|s| pb::WorkflowStep { step: Some(s) }),
        ..Default::default()
    }
}

/// Sends; the receipt, or the refusal's reason and message.
async fn send(b: &Broker, e: pb::Envelope) -> Result<pb::Receipt, (String, String)> {
    b.exchange()
        .send(e)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| refusal_of(&s).unwrap_or_else(|| panic!("not a refusal: {s:?}")))
}

fn open(
    reference: &str,
    concerns: &[&str],
    org: &str,
    by: Option<OffsetDateTime>,
) -> pb::workflow_step::Step {
    pb::workflow_step::Step::DsarOpen(pb::DsarOpen {
        reference: reference.into(),
        concerns: concerns.iter().map(|s| (*s).into()).collect(),
        organisation: org.into(),
        respond_by: by.map(ts),
    })
}

fn close(id: &str) -> pb::workflow_step::Step {
    pb::workflow_step::Step::DsarClose(pb::DsarClose {
        consultation_id: id.into(),
    })
}

async fn consultation(b: &Broker, id: &str) -> Result<pb::ConsultationStatus, String> {
    b.workflows()
        .consultations(pb::ConsultationsRequest {
            consultation_id: id.into(),
            all: true,
        })
        .await
        .map(|r| r.into_inner().consultations.remove(0))
        .map_err(|s| refusal_of(&s).map(|(r, _)| r).unwrap_or_default())
}

/// Deliveries from `b`'s queue, acknowledged, until `want` holds for one of them.
async fn await_delivery(
    b: &Broker,
    what: &str,
    want: impl Fn(&pb::Delivery) -> bool,
) -> pb::Delivery {
    let mut stream = b
        .exchange()
        .subscribe(pb::SubscribeRequest { window: 16 })
        .await
        .unwrap()
        .into_inner();
    loop {
        let d = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .unwrap_or_else(|_| panic!("no {what} within 20 s"))
            .expect("the subscription ended")
            .unwrap();
        b.exchange()
            .ack(pb::AckRequest {
                delivery_ids: vec![d.delivery_id.clone()],
            })
            .await
            .unwrap();
        if want(&d) {
            return d;
        }
    }
}

fn notice_of(d: &pb::Delivery) -> Option<&pb::Notice> {
    match &d.body {
        Some(pb::delivery::Body::Notice(n)) => Some(n),
        _ => None,
    }
}

/// The log key, for checking proofs offline (`concordat-broker log-key`).
fn log_key(config: &Path, data_dir: &Path) -> LogVerifier {
    concordat_tests::log_key(config, data_dir)
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn a_consultation_is_guarded_answered_and_closed() {
    let dir = tempfile::tempdir().unwrap();
    let (files, config, data_dir) = federation(dir.path());
    let broker = BrokerProcess::start(&config, &data_dir).unwrap();
    let rt = Runtime::new().unwrap();
    rt.block_on(async {
        let connect = |a: &str| files.client(broker.addr(), a).unwrap();
        let (nca, ico, ncsc, auditor) = (
            connect("nca").connect().await.unwrap(),
            connect("ico").connect().await.unwrap(),
            connect("ncsc").connect().await.unwrap(),
            connect("auditor").connect().await.unwrap(),
        );
        let threat = |to: &[&str]| envelope(to, pb::MessageKind::ThreatAssessment, None);
        let shared = send(&nca, threat(&["ico"])).await.unwrap().transfer_id;
        let elsewhere = send(&ncsc, threat(&["ico"])).await.unwrap().transfer_id;
        let dsar = |to: &[&str], s| envelope(to, pb::MessageKind::DsarConsultation, Some(s));
        let later = OffsetDateTime::now_utc() + time::Duration::hours(1);

        // Only information shared between the parties, and no organisation it did not name.
        let (reason, message) = send(
            &nca,
            dsar(&["ico"], open("DSAR-1", &[&elsewhere], "", Some(later))),
        )
        .await
        .unwrap_err();
        assert_eq!(reason, "WORKFLOW_CONFLICT", "{message}");
        assert!(message.contains(&elsewhere), "{message}");
        let (reason, message) = send(
            &nca,
            dsar(
                &["ico"],
                open("DSAR-1", &[&shared], "acme-ltd", Some(later)),
            ),
        )
        .await
        .unwrap_err();
        assert_eq!(reason, "WORKFLOW_CONFLICT", "{message}");
        assert!(message.contains("acme-ltd"), "{message}");
        // A workflow step must travel as its kind.
        let mut wrong_kind = dsar(&["ico"], open("DSAR-1", &[&shared], "", Some(later)));
        wrong_kind.kind = pb::MessageKind::ThreatAssessment as i32;
        assert_eq!(send(&nca, wrong_kind).await.unwrap_err().0, "MALFORMED");

        let opened = send(
            &nca,
            dsar(&["ico"], open("DSAR-1", &[&shared], "", Some(later))),
        )
        .await
        .unwrap();
        // The consulted agency receives the request with its step, and the transfer it concerns.
        let request = await_delivery(
            &ico,
            "consultation",
            |d| matches!(&d.body, Some(pb::delivery::Body::Transfer(t)) if t.workflow.is_some()),
        )
        .await;
        let Some(pb::delivery::Body::Transfer(t)) = request.body else {
            unreachable!()
        };
        assert_eq!(t.transfer_id, opened.transfer_id);
        assert_eq!(t.sender, "nca");

        let c = consultation(&ico, "nca:DSAR-1").await.unwrap();
        assert_eq!((c.state.as_str(), c.may_close), ("open", false));
        assert_eq!(c.concerns, std::slice::from_ref(&shared));
        assert_eq!(c.parties[0].agency, "ico");
        assert_eq!(c.parties[0].state, "awaiting");
        // A stranger sees nothing of it.
        assert_eq!(
            consultation(&ncsc, "nca:DSAR-1").await.unwrap_err(),
            "WORKFLOW_UNKNOWN"
        );

        // Opening it again, or closing it before the answer, is refused.
        let again = send(&nca, dsar(&["ico"], open("DSAR-1", &[], "", None))).await;
        assert_eq!(again.unwrap_err().0, "WORKFLOW_CONFLICT");
        let (reason, message) = send(&nca, dsar(&["ico"], close("nca:DSAR-1")))
            .await
            .unwrap_err();
        assert_eq!(reason, "CONSULTATION_OPEN");
        assert!(message.contains("ico"), "{message}");

        let answer = pb::workflow_step::Step::DsarAnswer(pb::DsarAnswer {
            consultation_id: "nca:DSAR-1".into(),
            answer: Some(pb::dsar_answer::Answer::Objection(
                "Schedule 2, paragraph 2: crime and taxation".into(),
            )),
        });
        send(&ico, dsar(&["nca"], answer)).await.unwrap();
        let c = consultation(&nca, "nca:DSAR-1").await.unwrap();
        assert_eq!((c.state.as_str(), c.may_close), ("answered", true));
        assert_eq!(c.parties[0].state, "objection");
        assert!(c.parties[0].objection.starts_with("Schedule 2"));

        send(&nca, dsar(&["ico"], close("nca:DSAR-1")))
            .await
            .unwrap();
        let c = consultation(&nca, "nca:DSAR-1").await.unwrap();
        assert_eq!((c.state.as_str(), c.may_close), ("closed", false));
        assert!(c.closed_at.is_some());
        // The answer reached the requester.
        await_delivery(&nca, "answer", |d| {
            matches!(&d.body, Some(pb::delivery::Body::Transfer(t))
                if matches!(t.workflow.as_ref().and_then(|w| w.step.as_ref()),
                    Some(pb::workflow_step::Step::DsarAnswer(_))))
        })
        .await;

        // Every step is in the log, accepted or refused, in order.
        let story: Vec<String> = concordat_tests::exported_entries(&auditor)
            .await
            .unwrap()
            .iter()
            .filter(|e| audit::workflow_subject(e).as_deref() == Some("nca:DSAR-1"))
            .map(|e| match &e.event {
                Some(Event::TransferRefused(r)) => format!("refused {}", r.reason),
                other => audit::event_name(&pb::AuditEntry {
                    event: other.clone(),
                    time: None,
                })
                .to_owned(),
            })
            .collect();
        assert_eq!(
            story,
            [
                "refused WORKFLOW_CONFLICT",
                "refused WORKFLOW_CONFLICT",
                "transfer_accepted",
                "refused WORKFLOW_CONFLICT",
                "refused CONSULTATION_OPEN",
                "transfer_accepted",
                "transfer_accepted",
            ]
        );
    });
}

#[test]
fn a_deadline_that_passes_while_the_broker_is_stopped_fires_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (files, config, data_dir) = federation(dir.path());
    let mut broker = BrokerProcess::start(&config, &data_dir).unwrap();
    // Two real agents receive for the two agencies.
    let ico_agent =
        AgentProcess::start(&dir.path().join("ico"), "ico", broker.addr(), &files).unwrap();
    let nca_agent =
        AgentProcess::start(&dir.path().join("nca"), "nca", broker.addr(), &files).unwrap();
    let rt = Runtime::new().unwrap();
    let due = OffsetDateTime::now_utc() + time::Duration::seconds(6);
    let opened = rt.block_on(async {
        let nca = files
            .client(broker.addr(), "nca")
            .unwrap()
            .connect()
            .await
            .unwrap();
        let step = open("DSAR-2", &[], "", Some(due));
        send(
            &nca,
            envelope(&["ico"], pb::MessageKind::DsarConsultation, Some(step)),
        )
        .await
        .unwrap()
    });
    // The request lands in the ICO's inbox with its step; the reminder, 2 s before the
    // deadline, as a notice file with the proof of its entry.
    let inbox_json =
        |agent: &AgentProcess, name: &str| agent.spool().read_json("inbox", name).unwrap();
    let request = format!("nca.{}.json", transfer_message_id(&opened));
    wait_for(
        "the request in the ICO's inbox",
        Duration::from_secs(20),
        || {
            ico_agent
                .spool()
                .files("inbox")
                .map_err(|e| e.to_string())?
                .contains(&request)
                .then_some(())
                .ok_or_else(|| "not yet".to_owned())
        },
    )
    .unwrap();
    let request = inbox_json(&ico_agent, &request);
    assert_eq!(request["workflow"]["step"], "dsar_open");
    assert_eq!(request["workflow"]["reference"], "DSAR-2");
    let notices = |agent: &AgentProcess, kind: &str| -> Vec<serde_json::Value> {
        agent
            .spool()
            .files("inbox")
            .unwrap_or_default()
            .iter()
            .filter(|f| f.starts_with("notice."))
            .map(|f| inbox_json(agent, f))
            .filter(|n| n["kind"] == kind)
            .collect()
    };
    let reminder = wait_for(
        "the reminder in the ICO's inbox",
        Duration::from_secs(20),
        || {
            notices(&ico_agent, "dsar_reminder")
                .pop()
                .ok_or_else(|| "none yet".to_owned())
        },
    )
    .unwrap();
    assert_eq!(reminder["subject"], "nca:DSAR-2");
    assert!(reminder["proof"]["checkpoint"].is_string(), "{reminder}");
    rt.block_on(async {
        let nca = files
            .client(broker.addr(), "nca")
            .unwrap()
            .connect()
            .await
            .unwrap();
        // Open until its deadline: checked when the answer came before it (the reminder
        // leaves 2 s, which a loaded machine may spend on delivering it).
        let state = consultation(&nca, "nca:DSAR-2").await.unwrap().state;
        if OffsetDateTime::now_utc() < due {
            assert_eq!(state, "open");
        }
    });

    assert!(broker.terminate(Duration::from_secs(10)).unwrap().success());
    // The deadline passes while no broker runs.
    let wait = due - OffsetDateTime::now_utc() + time::Duration::seconds(1);
    if wait.is_positive() {
        std::thread::sleep(Duration::try_from(wait).unwrap());
    }
    broker.restart().unwrap();
    // Both agencies are told, through their agents, once the restarted broker fires the timer.
    for agent in [&nca_agent, &ico_agent] {
        let n = wait_for("the deadline notice", Duration::from_secs(30), || {
            notices(agent, "dsar_deadline_passed")
                .pop()
                .ok_or_else(|| "none yet".to_owned())
        })
        .unwrap();
        assert_eq!(n["subject"], "nca:DSAR-2");
        assert!(n["message"].as_str().unwrap().contains("has passed"), "{n}");
    }
    rt.block_on(async {
        let nca = files
            .client(broker.addr(), "nca")
            .unwrap()
            .connect()
            .await
            .unwrap();
        let ico = files
            .client(broker.addr(), "ico")
            .unwrap()
            .connect()
            .await
            .unwrap();
        let c = consultation(&nca, "nca:DSAR-2").await.unwrap();
        assert_eq!((c.state.as_str(), c.may_close), ("overdue", true));
        assert!(c.parties[0].reminded);
        send(
            &nca,
            envelope(
                &["ico"],
                pb::MessageKind::DsarConsultation,
                Some(close("nca:DSAR-2")),
            ),
        )
        .await
        .unwrap();
        // A late answer to a closed consultation is refused.
        let late = pb::workflow_step::Step::DsarAnswer(pb::DsarAnswer {
            consultation_id: "nca:DSAR-2".into(),
            answer: Some(pb::dsar_answer::Answer::NoObjection(true)),
        });
        let refused = send(
            &ico,
            envelope(&["nca"], pb::MessageKind::DsarConsultation, Some(late)),
        )
        .await;
        assert_eq!(refused.unwrap_err().0, "WORKFLOW_CONFLICT");
    });
    // The deadline fired once: one notice each, whatever the restarts.
    assert_eq!(notices(&nca_agent, "dsar_deadline_passed").len(), 1);
    assert_eq!(notices(&ico_agent, "dsar_deadline_passed").len(), 1);
    assert_eq!(notices(&ico_agent, "dsar_reminder").len(), 1);
    // Each notice file verifies offline against the log key; an altered one does not.
    let key = log_key(&config, &data_dir);
    let mut verified = 0;
    for agent in [&nca_agent, &ico_agent] {
        for f in agent.spool().files("inbox").unwrap() {
            if !f.starts_with("notice.") {
                continue;
            }
            let path = agent.spool().folder("inbox").join(&f);
            let bytes = std::fs::read(&path).unwrap();
            let verdict = verify_inbox_file(&bytes, &key).unwrap();
            assert!(verdict.unwrap().starts_with("VERIFIED: notice"), "{f}");
            let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            v["agencies"] = serde_json::json!(["ncsc"]);
            let altered = serde_json::to_vec(&v).unwrap();
            assert!(verify_inbox_file(&altered, &key).unwrap().is_err(), "{f}");
            verified += 1;
        }
    }
    assert_eq!(verified, 3);
}

/// The message id a receipt was for.
fn transfer_message_id(r: &pb::Receipt) -> String {
    r.message_id.clone()
}

#[test]
fn agencies_involved_in_one_incident_are_told_of_each_other_and_statements_are_agreed() {
    let dir = tempfile::tempdir().unwrap();
    let (files, config, data_dir) = federation(dir.path());
    let broker = BrokerProcess::start(&config, &data_dir).unwrap();
    let rt = Runtime::new().unwrap();
    rt.block_on(async {
        let connect = |a: &str| files.client(broker.addr(), a).unwrap();
        let (nca, ico, ncsc, auditor) = (
            connect("nca").connect().await.unwrap(),
            connect("ico").connect().await.unwrap(),
            connect("ncsc").connect().await.unwrap(),
            connect("auditor").connect().await.unwrap(),
        );
        let involve = |b: &Broker, r: &str| {
            let mut w = b.workflows();
            let r = r.to_owned();
            async move {
                w.involve(pb::InvolveRequest { incident_ref: r })
                    .await
                    .unwrap()
                    .into_inner()
            }
        };
        let first = involve(&ico, "INC-9").await;
        assert_eq!(first.incident_ref, "ico:INC-9");
        assert!(first.notified.is_empty());
        let second = involve(&nca, "ico:INC-9").await;
        assert_eq!(second.notified, ["ico"]);
        // The NCSC shares an agreement with the ICO only: only the ICO hears of it.
        let third = involve(&ncsc, "ico:INC-9").await;
        assert_eq!(third.notified, ["ico"]);
        assert!(involve(&nca, "ico:INC-9").await.duplicate);
        let coordination = |d: &pb::Delivery| {
            notice_of(d).is_some_and(|n| n.kind == pb::NoticeKind::IncidentCoordination as i32)
        };
        let to_nca = await_delivery(&nca, "coordination notice", coordination).await;
        assert_eq!(notice_of(&to_nca).unwrap().agencies, ["ico"]);
        let to_ncsc = await_delivery(&ncsc, "coordination notice", coordination).await;
        assert_eq!(notice_of(&to_ncsc).unwrap().agencies, ["ico"]);
        let to_ico = await_delivery(&ico, "coordination notice", coordination).await;
        assert_eq!(notice_of(&to_ico).unwrap().agencies, ["nca"]);
        let refused = auditor
            .workflows()
            .involve(pb::InvolveRequest {
                incident_ref: "INC-1".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(refusal_of(&refused).unwrap().0, "NOT_AUTHORISED");
        // An incident of an agency outside the federation is no incident to coordinate on.
        let stranger = nca
            .workflows()
            .involve(pb::InvolveRequest {
                incident_ref: "mi5:INC-1".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(refusal_of(&stranger).unwrap().0, "MALFORMED");

        // A statement agreed in advance.
        let propose = |reference: &str, after: OffsetDateTime| {
            envelope(
                &["ncsc"],
                pb::MessageKind::PublicCommunication,
                Some(pb::workflow_step::Step::CommsPropose(pb::CommsPropose {
                    reference: reference.into(),
                    publish_after: Some(ts(after)),
                })),
            )
        };
        let now = OffsetDateTime::now_utc();
        send(&ico, propose("press-1", now - time::Duration::minutes(1)))
            .await
            .unwrap();
        send(&ico, propose("press-2", now + time::Duration::hours(1)))
            .await
            .unwrap();
        let status = |b: &Broker, id: &str| {
            let mut w = b.workflows();
            let id = id.to_owned();
            async move {
                w.statements(pb::StatementsRequest { statement_id: id })
                    .await
                    .unwrap()
                    .into_inner()
                    .statements
                    .remove(0)
            }
        };
        assert_eq!(status(&ncsc, "ico:press-1").await.state, "pending");
        let answer = |id: &str, a| {
            envelope(
                &["ico"],
                pb::MessageKind::PublicCommunication,
                Some(pb::workflow_step::Step::CommsAnswer(pb::CommsAnswer {
                    statement_id: id.into(),
                    answer: Some(a),
                })),
            )
        };
        let objection = pb::comms_answer::Answer::Objection("wait for the patch".into());
        send(&ncsc, answer("ico:press-1", objection)).await.unwrap();
        let s = status(&ico, "ico:press-1").await;
        assert_eq!((s.state.as_str(), s.may_publish), ("objected", false));
        send(
            &ncsc,
            answer("ico:press-1", pb::comms_answer::Answer::Approve(true)),
        )
        .await
        .unwrap();
        let s = status(&ico, "ico:press-1").await;
        assert_eq!((s.state.as_str(), s.may_publish), ("approved", true));
        send(
            &ncsc,
            answer("ico:press-2", pb::comms_answer::Answer::Approve(true)),
        )
        .await
        .unwrap();
        let s = status(&ico, "ico:press-2").await;
        assert_eq!((s.state.as_str(), s.may_publish), ("approved", false));
        // Answering a statement one was not asked about is refused.
        let stray = send(
            &ncsc,
            answer("ico:press-9", pb::comms_answer::Answer::Approve(true)),
        )
        .await;
        assert_eq!(stray.unwrap_err().0, "WORKFLOW_UNKNOWN");
        // The NCA sees no statement between the ICO and the NCSC.
        let listed = nca
            .workflows()
            .statements(pb::StatementsRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(listed.statements.is_empty());

        // The log tells the incident's story.
        let declared: Vec<_> = concordat_tests::exported_entries(&auditor)
            .await
            .unwrap()
            .into_iter()
            .filter_map(|e| match e.event {
                Some(Event::InvolvementDeclared(d)) => Some((d.agency, d.notified, d.duplicate)),
                _ => None,
            })
            .collect();
        assert_eq!(
            declared,
            [
                ("ico".into(), vec![], false),
                ("nca".into(), vec!["ico".to_owned()], false),
                ("ncsc".into(), vec!["ico".to_owned()], false),
                ("nca".into(), vec![], true),
            ]
        );
    });
}
