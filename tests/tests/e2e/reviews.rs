//! Agreement reviews end to end, as operators and agencies meet them: a real broker process
//! (reviews enforced, as a production file has them when it says nothing), real agents, and
//! the real `concordat` CLI.
//!
//! - An agreement due for review (within its warning window): the transfer is accepted, the
//!   receipt the agent saves carries the warning, and the broker counts it
//!   (`concordat_agreement_review_warnings_total{agreement,stage="due"}`).
//! - An agreement past its review date and grace period: refused with
//!   `AGREEMENT_REVIEW_OVERDUE`, naming the review date and the end of the grace period.
//! - `concordat agreement reviewed --id ... --on TODAY --config F --reload`: the file is edited
//!   (comments kept, `review_by` replaced by `reviewed`), the broker reloads, and the same
//!   transfer is accepted without a warning; the audit log's `config_loaded` entry names the
//!   new review date.
//! - The NCA rule: an NCA -> ICO incident record identifying an organisation without its
//!   consent is refused, and the refusal says the organisation must report to the ICO itself.

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use concordat_agent::spool::ReceiptFile;
use concordat_broker::config::Limits;
use concordat_tests::{
    TestPki, binary,
    process::{AgentProcess, BrokerProcess, PkiFiles, write_broker_config},
};
use serde_json::json;

/// How long a file may take to be sent or refused (a debug build on a busy machine).
const OUTCOME_TIMEOUT: Duration = Duration::from_secs(30);

/// The NCA's reminder on its incident records to the ICO, as the test configuration has it.
const NCA_NOTE: &str = "The NCA does not notify the ICO on an organisation's behalf: the \
                        organisation must report the incident to the ICO itself.";

/// Drops a threat assessment to the ICO and waits for its outcome.
fn send(agent: &AgentProcess, name: &str) -> String {
    agent
        .spool()
        .drop_message(
            name,
            &json!({
                "recipients": ["ico"],
                "kind": "threat_assessment",
                "payload": { "summary": name },
            }),
        )
        .unwrap();
    agent.outcome(name, OUTCOME_TIMEOUT)
}

fn receipt(agent: &AgentProcess, name: &str) -> ReceiptFile {
    serde_json::from_value(
        agent
            .spool()
            .read_json("sent", &format!("{name}.receipt.json"))
            .unwrap(),
    )
    .unwrap()
}

/// The value of the metric sample `line_start` (name and labels), from `/metrics`.
fn sample(metrics: SocketAddr, line_start: &str) -> Option<u64> {
    concordat_tests::scrape_metrics(metrics)
        .unwrap()
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_review_warns_a_lapsed_one_refuses_and_recording_the_review_lifts_both() {
    let dir = tempfile::tempdir().unwrap();
    let mut pki = TestPki::new().unwrap();
    let files = PkiFiles::write(
        &mut pki,
        &dir.path().join("pki"),
        &["ico", "ncsc", "nca", "auditor"],
    )
    .unwrap();
    let config = dir.path().join("broker.toml");
    let data_dir = dir.path().join("data");
    write_broker_config(&config, &files, &data_dir, &Limits::default()).unwrap();
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let today = time::OffsetDateTime::now_utc().date();
    let due_by = today + time::Duration::days(30);
    let lapsed_by = today - time::Duration::days(200);
    let grace_end = lapsed_by + time::Duration::days(90);
    // The ICO-NCSC agreement due in 30 days; the ICO-NCA one 200 days past its date (its
    // grace, 90 days, long over), with an incident-record flow that carries the NCA's note.
    // No enforce_review: reviews are enforced.
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text
        .replace(
            "auditors = [\"auditor\"]",
            &format!("auditors = [\"auditor\"]\nmetrics_listen = \"{metrics}\""),
        )
        .replacen(
            "review_by = 2099-12-31",
            &format!("review_by = {due_by}"),
            1,
        )
        .replacen(
            "review_by = 2099-12-31",
            &format!("# Set at signing.\nreview_by = {lapsed_by}"),
            1,
        );
    assert!(!text.contains("2099-12-31") && !text.contains("enforce_review"));
    let text = format!(
        "{text}\n[[agreements.flows]]\nfrom = \"nca\"\nto = \"ico\"\nkinds = [\"incident_record\"]\n\
         clause = \"2.2\"\nconsent_refusal_note = \"{NCA_NOTE}\"\n"
    );
    std::fs::write(&config, &text).unwrap();
    let broker = BrokerProcess::start(&config, &data_dir).unwrap();

    // Due: accepted, with the warning in the saved receipt, and counted.
    let ncsc =
        AgentProcess::start(&dir.path().join("ncsc"), "ncsc", broker.addr(), &files).unwrap();
    assert_eq!(send(&ncsc, "due.json"), "sent", "{}", ncsc.log_tail(10));
    let r = receipt(&ncsc, "due.json");
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    assert!(
        r.warnings[0].contains(&format!(
            "agreement test-ico-ncsc is due for review by {due_by}"
        )),
        "{:?}",
        r.warnings
    );
    let due =
        "concordat_agreement_review_warnings_total{agreement=\"test-ico-ncsc\",stage=\"due\"}";
    assert_eq!(sample(metrics, due), Some(1));
    assert!(
        ncsc.log_text().contains("the broker warns"),
        "{}",
        ncsc.log_tail(10)
    );
    // `concordat send` prints it, on a fresh receipt and on the first one returned again.
    let payload = dir.path().join("payload.json");
    std::fs::write(&payload, br#"{"summary":"by hand"}"#).unwrap();
    let message_id = concordat_proto::ids::MessageId::new_random().to_string();
    for again in [false, true] {
        let out = Command::new(binary("concordat").unwrap())
            .args(["send", "--to", "ico", "--kind", "threat_assessment"])
            .args(["--message-id", &message_id])
            .arg("--payload")
            .arg(&payload)
            .args([
                "--broker",
                &format!("https://localhost:{}", broker.addr().port()),
            ])
            .arg("--ca")
            .arg(files.ca())
            .arg("--cert")
            .arg(files.cert("ncsc"))
            .arg("--key")
            .arg(files.key("ncsc"))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let printed = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{printed}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(printed.contains("(again"), again, "{printed}");
        assert!(
            printed.contains(&format!(
                "  warning: agreement test-ico-ncsc is due for review by {due_by}"
            )),
            "{printed}"
        );
    }
    // The retry was not a decision of its own: counted once.
    assert_eq!(sample(metrics, due), Some(2));

    // Lapsed, enforced: refused, naming the review date and the end of the grace period.
    let nca = AgentProcess::start(&dir.path().join("nca"), "nca", broker.addr(), &files).unwrap();
    assert_eq!(send(&nca, "lapsed.json"), "refused", "{}", nca.log_tail(10));
    let refused = nca.refusal("lapsed.json").unwrap();
    assert_eq!(refused.reason, "AGREEMENT_REVIEW_OVERDUE");
    for part in [
        "test-ico-nca".to_owned(),
        format!("due by {lapsed_by}"),
        format!("grace period ended {grace_end}"),
    ] {
        assert!(
            refused.message.contains(&part),
            "{part:?}: {}",
            refused.message
        );
    }
    let lapsed =
        "concordat_agreement_review_warnings_total{agreement=\"test-ico-nca\",stage=\"lapsed\"}";
    assert_eq!(sample(metrics, lapsed), Some(1));
    assert_eq!(
        sample(
            metrics,
            "concordat_agreement_review_stage{agreement=\"test-ico-nca\"}"
        ),
        Some(3)
    );

    // The review, recorded today with the CLI, and reloaded into the running broker.
    let out = Command::new(binary("concordat").unwrap())
        .args(["agreement", "reviewed", "--id", "test-ico-nca", "--on"])
        .arg(today.to_string())
        .arg("--config")
        .arg(&config)
        .arg("--reload")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}\n{}", broker.log_tail(20));
    let new_by = concordat_broker::policy::agreements::years_later(today, 2);
    let change = format!("agreement test-ico-nca review_by: {lapsed_by} -> {new_by}");
    for part in [
        format!("review by {lapsed_by} -> {new_by}"),
        format!("changed: {change}"),
    ] {
        assert!(said.contains(&part), "{part:?} not in:\n{said}");
    }
    // The file: the review recorded where review_by was, its comment kept.
    let edited = std::fs::read_to_string(&config).unwrap();
    assert!(
        edited.contains(&format!("# Set at signing.\nreviewed = {today}\n")),
        "{edited}"
    );
    assert!(!edited.contains(&format!("review_by = {lapsed_by}")));

    // The same transfer now: accepted, no warning.
    assert_eq!(send(&nca, "reviewed.json"), "sent", "{}", nca.log_tail(10));
    assert!(receipt(&nca, "reviewed.json").warnings.is_empty());
    assert_eq!(
        sample(
            metrics,
            "concordat_agreement_review_stage{agreement=\"test-ico-nca\"}"
        ),
        Some(0)
    );

    // The audit log: the reload's config_loaded entry names the new review date.
    let deadline = std::time::Instant::now() + OUTCOME_TIMEOUT;
    let loaded = loop {
        let loaded = concordat_tests::configs_loaded(&files, broker.addr())
            .await
            .unwrap();
        if loaded.len() >= 2 || std::time::Instant::now() >= deadline {
            break loaded;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(loaded.len(), 2, "{loaded:?}");
    assert_eq!(loaded[1]["occasion"], "reload");
    assert_eq!(loaded[1]["changes"], json!([change]));

    // The NCA rule: an incident record to the ICO identifying an organisation without its
    // consent is refused, and the refusal tells the sender who must report it.
    nca.spool()
        .drop_message(
            "incident.json",
            &json!({
                "recipients": ["ico"],
                "kind": "incident_record",
                "organisation": "acme-ltd",
                "incident_ref": "NCA-2026-7",
                "payload": { "summary": "Ransomware at Acme." },
            }),
        )
        .unwrap();
    assert_eq!(nca.outcome("incident.json", OUTCOME_TIMEOUT), "refused");
    let refused = nca.refusal("incident.json").unwrap();
    assert!(
        refused.reason.starts_with("CONSENT_") || refused.reason == "ORGANISATION_IDENTIFIED",
        "{}: {}",
        refused.reason,
        refused.message
    );
    assert!(
        refused
            .message
            .contains("the organisation must report the incident to the ICO itself"),
        "{}",
        refused.message
    );
}
