//! Reloading the broker's configuration without a restart, as an operator does it: a real
//! broker process and a real agent, the configuration file edited, `concordat-broker reload
//! --data-dir D` run. A new agreement applies to the running agent's next file without a
//! reconnect; a broken file (bad syntax, or an agreement naming an unknown agency) makes
//! `reload` exit non-zero with the error while the old configuration stays in force; a changed
//! listen address is reported as needing a restart; the audit log and `/metrics` record it all.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use concordat_broker::{config::Limits, control};
use concordat_proto::pb;
use concordat_tests::{
    TestPki, binary,
    process::{AgentProcess, BrokerProcess, PkiFiles, write_broker_config},
};
use serde_json::{Value, json};

/// How long a file may take to be sent or refused (a debug build on a busy machine).
const OUTCOME_TIMEOUT: Duration = Duration::from_secs(30);

/// An agreement that permits `nca -> ncsc` threat assessments, which the test configuration
/// lacks.
const NCA_NCSC: &str = r#"
[[agreements]]
id = "test-nca-ncsc"
title = "Test agreement between the NCA and the NCSC"
parties = ["nca", "ncsc"]
signed = 2024-01-01
review_by = 2099-12-31

[[agreements.flows]]
from = "nca"
to = "ncsc"
kinds = ["threat_assessment"]
clause = "3.1"
opaque = true
"#;

/// Runs `concordat-broker reload --data-dir DIR`.
fn reload(data_dir: &Path) -> Output {
    Command::new(binary("concordat-broker").unwrap())
        .args(["reload", "--data-dir"])
        .arg(data_dir)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// What a command printed, both streams.
fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A threat assessment from the outbox to the NCSC.
fn to_ncsc(text: &str) -> Value {
    json!({
        "recipients": ["ncsc"],
        "kind": "threat_assessment",
        "payload": { "summary": text },
    })
}

/// The value of the `concordat_reloads` sample for `kind` and `outcome`, from `/metrics`.
fn reloads(metrics: SocketAddr, kind: &str, outcome: &str) -> u64 {
    let text = concordat_tests::scrape_metrics(metrics).unwrap();
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("concordat_reloads")
                && l.contains(&format!("kind=\"{kind}\""))
                && l.contains(&format!("outcome=\"{outcome}\""))
        })
        .unwrap_or_else(|| panic!("no reloads sample for {kind}/{outcome} in:\n{text}"));
    line.rsplit(' ').next().unwrap().trim().parse().unwrap()
}

/// The whole story of one reload, as the module's documentation tells it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agreement_added_by_reload_applies_to_the_running_agent_and_broken_files_change_nothing()
{
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
    // A port that was free a moment ago, for /metrics.
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let original = std::fs::read_to_string(&config).unwrap().replace(
        "auditors = [\"auditor\"]",
        &format!("auditors = [\"auditor\"]\nmetrics_listen = \"{metrics}\""),
    );
    std::fs::write(&config, &original).unwrap();
    let mut broker = BrokerProcess::start(&config, &data_dir).unwrap();
    let pid = broker.pid().unwrap();
    let pid_file = std::fs::read_to_string(data_dir.join(control::PID_FILE)).unwrap();
    assert_eq!(pid_file.trim(), pid.to_string(), "the pid file");

    // The NCA's agent: no agreement lets it send to the NCSC.
    let nca = AgentProcess::start(&dir.path().join("nca"), "nca", broker.addr(), &files).unwrap();
    nca.spool()
        .drop_message("before.json", &to_ncsc("before the reload"))
        .unwrap();
    assert_eq!(nca.outcome("before.json", OUTCOME_TIMEOUT), "refused");
    assert_eq!(nca.refusal("before.json").unwrap().reason, "NO_AGREEMENT");
    let connected =
        |agent: &AgentProcess| agent.log_text().matches("connected to the broker").count();
    let connections_before = connected(&nca);

    // Broken files: each reload fails with the file and the key, and nothing changes.
    let broken = [
        (
            "a syntax error",
            format!("{original}\n[[agreements]\nid = \"oops\"\n"),
            vec![config.display().to_string()],
        ),
        (
            "an agreement naming an unknown agency",
            format!(
                "{original}{}",
                NCA_NCSC.replace("[\"nca\", \"ncsc\"]", "[\"nca\", \"mi5\"]")
            ),
            vec![
                config.display().to_string(),
                "agreements[2].parties".to_owned(),
                "mi5 is not a declared agency".to_owned(),
            ],
        ),
    ];
    for (what, text, named) in &broken {
        std::fs::write(&config, text).unwrap();
        let out = reload(&data_dir);
        let words = said(&out);
        assert!(!out.status.success(), "{what}: reload succeeded:\n{words}");
        assert!(words.contains("reload failed"), "{what}:\n{words}");
        for n in named {
            assert!(words.contains(n), "{what}: {n:?} not in:\n{words}");
        }
        assert!(broker.is_running(), "{what}: the broker stopped");
    }
    nca.spool()
        .drop_message("still-refused.json", &to_ncsc("after the broken reloads"))
        .unwrap();
    assert_eq!(
        nca.outcome("still-refused.json", OUTCOME_TIMEOUT),
        "refused"
    );
    assert_eq!(
        nca.refusal("still-refused.json").unwrap().reason,
        "NO_AGREEMENT"
    );
    let log = broker.log_text();
    assert!(
        log.contains("configuration reload failed") && log.contains("mi5 is not a declared agency"),
        "the broker's log does not say why:\n{}",
        broker.log_tail(20)
    );

    // A good file: the agreement is added, and the listen address changed (not applied).
    let good = format!("{original}{NCA_NCSC}")
        .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"");
    std::fs::write(&config, &good).unwrap();
    let out = reload(&data_dir);
    let words = said(&out);
    assert!(
        out.status.success(),
        "reload failed:\n{words}\n{}",
        broker.log_tail(20)
    );
    assert!(
        words.contains("changed: agreement test-nca-ncsc: added"),
        "{words}"
    );
    assert!(
        words.contains("needs a restart (not applied): listen: 127.0.0.1:0 -> 127.0.0.1:1"),
        "{words}"
    );

    // The same running agent, on the same connection: the next file is accepted.
    nca.spool()
        .drop_message("after.json", &to_ncsc("after the reload"))
        .unwrap();
    assert_eq!(
        nca.outcome("after.json", OUTCOME_TIMEOUT),
        "sent",
        "{}",
        nca.log_tail(10)
    );
    assert_eq!(
        connected(&nca),
        connections_before,
        "the agent reconnected:\n{}",
        nca.log_tail(20)
    );
    assert_eq!(broker.pid(), Some(pid), "the broker restarted");

    // The outcome file, the metrics and the audit log.
    let last = control::last_reload(&data_dir).unwrap();
    assert_eq!((last.pid, last.generation, last.ok()), (pid, 3, true));
    assert_eq!(reloads(metrics, "config", "ok"), 1);
    assert_eq!(reloads(metrics, "config", "failed"), 2);
    // The export reaches as far as the latest checkpoint, which follows the entry shortly.
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
    assert_eq!(loaded.len(), 2, "failed reloads are not logged: {loaded:?}");
    assert_eq!(loaded[0]["occasion"], "start");
    assert_eq!(loaded[1]["occasion"], "reload");
    assert_eq!(
        loaded[1]["changes"],
        json!([
            "agreement test-nca-ncsc: added",
            "listen: 127.0.0.1:0 -> 127.0.0.1:1 (needs a restart)"
        ])
    );
    assert_ne!(loaded[0]["config_sha256"], loaded[1]["config_sha256"]);
    assert!(
        broker.log_text().contains("needs a restart"),
        "{}",
        broker.log_tail(20)
    );

    // A clean stop removes the pid file; reload then says no broker runs.
    let status = broker.terminate(Duration::from_secs(20)).unwrap();
    assert!(status.success(), "{}", broker.log_tail(20));
    assert!(
        !data_dir.join(control::PID_FILE).exists(),
        "the pid file stayed"
    );
    let out = reload(&data_dir);
    assert!(!out.status.success());
    assert!(
        said(&out).contains("no broker is running"),
        "{}",
        said(&out)
    );
}

/// A second broker on the same data directory is refused (sled's lock) and leaves the first's
/// pid file alone; a pid file naming a dead process is reported as stale.
#[test]
fn reload_finds_the_right_broker_or_says_why_not() {
    let dir = tempfile::tempdir().unwrap();
    let mut pki = TestPki::new().unwrap();
    let files = PkiFiles::write(&mut pki, &dir.path().join("pki"), &["ico", "ncsc"]).unwrap();
    let config = dir.path().join("broker.toml");
    let data_dir = dir.path().join("data");
    write_broker_config(&config, &files, &data_dir, &Limits::default()).unwrap();
    let mut first = BrokerProcess::start(&config, &data_dir).unwrap();
    let pid = first.pid().unwrap().to_string();
    let second = BrokerProcess::start(&config, &data_dir);
    assert!(
        second.is_err(),
        "a second broker served the same data directory"
    );
    let pid_file = data_dir.join(control::PID_FILE);
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap().trim(), pid);
    assert!(first.is_running());
    // Unchanged file: the reload succeeds and says nothing changed.
    let out = reload(&data_dir);
    assert!(out.status.success(), "{}", said(&out));
    assert!(said(&out).contains("nothing changed"), "{}", said(&out));

    // Killed: the pid file stays behind, naming a process that is gone.
    first.kill().unwrap();
    let out = reload(&data_dir);
    assert!(!out.status.success());
    assert!(said(&out).contains("stale pid file"), "{}", said(&out));
}

/// A threat assessment from the NCSC to the ICO whose payload names Globex PLC.
fn naming_globex() -> pb::Envelope {
    pb::Envelope {
        message_id: concordat_proto::ids::MessageId::new_random().to_string(),
        recipients: vec!["ico".into()],
        kind: pb::MessageKind::ThreatAssessment as i32,
        content_type: "application/json".into(),
        tlp: pb::Tlp::Green as i32,
        payload: serde_json::to_vec(&json!({ "summary": "Globex PLC's VPN was breached" }))
            .unwrap(),
        ..Default::default()
    }
}

/// An organisation registered by a reload is found in payloads from then on (the leak
/// check's matcher is recompiled and swapped in), on a connection opened before the reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_organisation_registered_by_reload_is_found_on_an_open_connection() {
    let dir = tempfile::tempdir().unwrap();
    let mut pki = TestPki::new().unwrap();
    let files = PkiFiles::write(&mut pki, &dir.path().join("pki"), &["ico", "ncsc"]).unwrap();
    let config = dir.path().join("broker.toml");
    let data_dir = dir.path().join("data");
    write_broker_config(&config, &files, &data_dir, &Limits::default()).unwrap();
    let broker = BrokerProcess::start(&config, &data_dir).unwrap();
    let ncsc = files
        .client(broker.addr(), "ncsc")
        .unwrap()
        .connect()
        .await
        .unwrap();
    // Nobody is registered: the payload names no one the broker protects.
    ncsc.exchange().send(naming_globex()).await.unwrap();

    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("{text}\n[[organisations]]\nid = \"globex-plc\"\nlegal_name = \"Globex PLC\"\n"),
    )
    .unwrap();
    let out = reload(&data_dir);
    assert!(out.status.success(), "{}", said(&out));
    assert!(
        said(&out).contains("changed: organisation globex-plc: added"),
        "{}",
        said(&out)
    );

    let refused = ncsc.exchange().send(naming_globex()).await.unwrap_err();
    assert_eq!(
        concordat_broker::refusal::reason_of(&refused).as_deref(),
        Some("ORGANISATION_IDENTIFIED"),
        "{refused:?}"
    );
    assert!(refused.message().contains("globex-plc"), "{refused:?}");
}
