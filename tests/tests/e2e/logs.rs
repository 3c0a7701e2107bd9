//! Logs as an operator's SIEM reads them, from real processes with standard error in a file
//! (never a terminal): `--log-format json` (or `log_format = "json"`) gives one JSON object per
//! line with a timestamp, level, target and fields, kinds and reasons by name; neither format
//! carries ANSI colour into a file, even with `NO_COLOR` unset, while text on a terminal (a
//! pseudo-terminal) is coloured unless `NO_COLOR` is set. The agent says why the broker is
//! unreachable, when it tries again and how many files wait; and it reconnects within seconds
//! of the broker coming back, whatever the length of the outage.

use std::{
    io::Write as _,
    net::{SocketAddr, TcpListener},
    path::Path,
    time::{Duration, Instant},
};

use concordat_agent::client::Broker;
use concordat_broker::config::Limits;
use concordat_proto::{ids::MessageId, pb};
use concordat_tests::process::{
    AgentProcess, BrokerProcess, PkiFiles, SpoolDir, wait_for, write_broker_files,
};
use serde_json::{Value, json};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// How long an ordinary outcome (a file sent, a log line written) may take.
const OUTCOME_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a process may take to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the broker stays down in the reconnect test: long enough for an exponential backoff
/// without a low ceiling (the agent's was 30 s) to be sleeping for many seconds when it returns.
const OUTAGE: Duration = Duration::from_secs(30);
/// The most the agent may take, from the broker's readiness, to send a waiting file. The agent
/// tries at least every 2 s; the rest is room for a busy machine (two cores, debug builds).
const RECONNECT_BOUND: Duration = Duration::from_secs(5);

/// An outbox message from `ncsc` that the test federation accepts.
fn message(seq: usize) -> Value {
    json!({
        "recipients": ["ico"],
        "kind": "threat_assessment",
        "payload": { "seq": seq },
    })
}

/// Waits until `n` outbox files have been moved to `sent/`.
fn wait_sent(spool: &SpoolDir, n: usize, timeout: Duration, log: impl Fn() -> String) {
    if let Err(e) = wait_for(&format!("{n} file(s) in sent/"), timeout, || {
        let sent = spool.count_moved("sent");
        if sent >= n {
            Ok(())
        } else {
            Err(format!("{sent} sent"))
        }
    }) {
        panic!("{e:#}\n{}", log());
    }
}

/// Parses every line of `log` as a JSON object with the fields a SIEM relies on, and checks
/// that nothing Rust-internal leaks into them. Returns the lines.
fn json_lines(log: &str) -> Vec<Value> {
    assert!(!log.is_empty(), "the log is empty");
    assert!(
        !log.contains('\x1b'),
        "an ANSI escape in a log file:\n{log}"
    );
    log.lines()
        .map(|line| {
            let value: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
            let timestamp = value["timestamp"].as_str().unwrap_or_default();
            assert!(
                OffsetDateTime::parse(timestamp, &Rfc3339).is_ok(),
                "no RFC 3339 timestamp: {line}"
            );
            assert!(
                ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"]
                    .contains(&value["level"].as_str().unwrap_or_default()),
                "no level: {line}"
            );
            assert!(
                value["target"].as_str().is_some_and(|t| !t.is_empty()),
                "no target: {line}"
            );
            let fields = value["fields"]
                .as_object()
                .unwrap_or_else(|| panic!("no fields: {line}"));
            assert!(
                fields.get("message").is_some_and(Value::is_string),
                "no message: {line}"
            );
            assert!(!fields.contains_key("loop_"), "a field loop_: {line}");
            for (key, field) in fields {
                let text = field.as_str().unwrap_or_default();
                assert!(
                    !text.starts_with("Some(") && text != "None",
                    "field {key} is a Debug-formatted Option: {line}"
                );
            }
            value
        })
        .collect()
}

/// The lines whose `fields.message` is `message`.
fn with_message<'a>(lines: &'a [Value], message: &str) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|l| l["fields"]["message"].as_str() == Some(message))
        .collect()
}

/// A broker process (ico, ncsc, nca) with `log_format` in its configuration set to
/// `config_format`, started with `args` and `NO_COLOR` unset (empty).
fn broker(dir: &Path, config_format: &str, args: &[&str]) -> (PkiFiles, BrokerProcess) {
    let data_dir = dir.join("data");
    let (pki, config) =
        write_broker_files(dir, &["ico", "ncsc", "nca"], &data_dir, &Limits::default()).unwrap();
    // Top-level keys come before the first table.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("log_format = \"{config_format}\"\n{text}")).unwrap();
    let broker = BrokerProcess::start_with(&config, &data_dir, args, &[("NO_COLOR", "")]).unwrap();
    (pki, broker)
}

/// Sends one envelope to the broker as `agency`: accepted for `ncsc`, refused with
/// `NO_AGREEMENT` for `nca` (there is no `nca -> ncsc` flow).
async fn send_as(pki: &PkiFiles, addr: SocketAddr, agency: &str, to: &str) -> Result<(), String> {
    let broker: Broker = pki
        .client(addr, agency)
        .unwrap()
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let envelope = pb::Envelope {
        message_id: MessageId::new_random().to_string(),
        recipients: vec![to.into()],
        kind: pb::MessageKind::ThreatAssessment as i32,
        content_type: "application/json".into(),
        tlp: pb::Tlp::Amber as i32,
        payload: br#"{"seq":1}"#.to_vec(),
        ..Default::default()
    };
    broker
        .exchange()
        .send(envelope)
        .await
        .map(|_| ())
        .map_err(|s| s.message().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_json_logs_parse_line_by_line_with_kinds_and_reasons_by_name() {
    concordat_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let (pki, mut broker) = broker(dir.path(), "text", &["--log-format", "json"]);
    send_as(&pki, broker.addr(), "ncsc", "ico").await.unwrap();
    let refused = send_as(&pki, broker.addr(), "nca", "ncsc").await;
    assert!(refused.is_err(), "nca -> ncsc was accepted");
    let status = broker.terminate(STOP_TIMEOUT).unwrap();
    assert!(status.success(), "{}", broker.log_tail(20));

    let log = broker.log_text();
    let lines = json_lines(&log);
    let accepted = with_message(&lines, "accepted");
    assert_eq!(accepted.len(), 1, "{log}");
    assert_eq!(accepted[0]["fields"]["kind"], "threat_assessment", "{log}");
    assert_eq!(accepted[0]["fields"]["agency"], "ncsc", "{log}");
    assert_eq!(accepted[0]["level"], "INFO");
    let refusals: Vec<&Value> = lines
        .iter()
        .filter(|l| l["fields"]["reason"] == "NO_AGREEMENT")
        .collect();
    assert_eq!(refusals.len(), 1, "{log}");
    assert_eq!(refusals[0]["fields"]["kind"], "threat_assessment", "{log}");
    assert_eq!(refusals[0]["fields"]["agency"], "nca", "{log}");
    assert_eq!(refusals[0]["level"], "WARN");
    assert!(
        refusals[0]["target"]
            .as_str()
            .is_some_and(|t| t.starts_with("concordat_broker")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_text_logs_in_a_file_have_no_colour_and_the_flag_beats_the_config() {
    concordat_tests::init();
    let dir = tempfile::tempdir().unwrap();
    // The configuration asks for JSON; the command line's text wins.
    let (pki, mut broker) = broker(dir.path(), "json", &["--log-format", "text"]);
    let refused = send_as(&pki, broker.addr(), "nca", "ncsc").await;
    assert!(refused.is_err(), "nca -> ncsc was accepted");
    let status = broker.terminate(STOP_TIMEOUT).unwrap();
    assert!(status.success(), "{}", broker.log_tail(20));

    let log = broker.log_text();
    assert!(
        !log.contains('\x1b'),
        "an ANSI escape in a log file:\n{log}"
    );
    let refusal = log
        .lines()
        .find(|l| l.contains("reason=NO_AGREEMENT"))
        .unwrap_or_else(|| panic!("no refusal logged:\n{log}"));
    assert!(refusal.contains("kind=threat_assessment"), "{refusal}");
    assert!(
        log.lines().all(|l| !l.starts_with('{')),
        "a JSON line in a text log:\n{log}"
    );
}

/// A server that is not a TLS server: it answers every connection with an HTTP/1.1 error and
/// closes it, as a misdirected port would.
fn not_tls_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
        }
    });
    addr
}

#[test]
fn agent_logs_why_the_broker_is_unreachable_when_it_retries_and_what_waits() {
    let dir = tempfile::tempdir().unwrap();
    let mut pki = concordat_tests::TestPki::new().unwrap();
    let pki = PkiFiles::write(&mut pki, &dir.path().join("pki"), &["ncsc"]).unwrap();
    // A port nobody listens on (bound, then closed).
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // A listener that never accepts: the kernel completes TCP, nobody answers TLS.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let cases: [(&str, SocketAddr); 3] = [
        ("connection_refused", closed),
        ("timeout", silent.local_addr().unwrap()),
        ("tls", not_tls_server()),
    ];
    for (cause, addr) in cases {
        let spool_dir = dir.path().join(cause);
        // The files wait before the agent starts, so that its first report counts them.
        for seq in 0..2 {
            SpoolDir::new(&spool_dir)
                .drop_message(&format!("waiting-{seq}.json"), &message(seq))
                .unwrap();
        }
        let mut agent = AgentProcess::start_with(
            &spool_dir,
            "ncsc",
            addr,
            &pki,
            "log_format = \"json\"\n[timeouts]\nconnect_ms = 500\n",
        )
        .unwrap();
        let found = wait_for(
            &format!("the agent to log cause {cause} with two files waiting"),
            OUTCOME_TIMEOUT,
            || {
                let log = agent.log_text();
                let complete: String = log.lines().map(|l| format!("{l}\n")).collect();
                let lines: Vec<Value> = complete
                    .lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect();
                lines
                    .into_iter()
                    .find(|l| {
                        l["fields"]["cause"] == cause
                            && l["fields"]["outbox"] == 2
                            && l["fields"]["message"] == "broker unreachable"
                    })
                    .ok_or_else(|| agent.log_tail(5))
            },
        )
        .unwrap();
        let fields = &found["fields"];
        assert_eq!(found["level"], "WARN", "{found}");
        let next = fields["next_attempt"].as_str().unwrap_or_default();
        let next = OffsetDateTime::parse(next, &Rfc3339)
            .unwrap_or_else(|e| panic!("next_attempt is not RFC 3339 ({e}): {found}"));
        let at = OffsetDateTime::parse(found["timestamp"].as_str().unwrap(), &Rfc3339).unwrap();
        let wait = next - at;
        assert!(
            wait >= time::Duration::ZERO && wait <= time::Duration::seconds(3),
            "next attempt {wait} after the line: {found}"
        );
        assert!(fields["retry_in_ms"].as_u64().is_some(), "{found}");
        assert!(fields["error"].as_str().is_some_and(|e| !e.is_empty()));
        let status = agent.terminate(STOP_TIMEOUT).unwrap();
        assert!(status.success(), "{}", agent.log_tail(20));
        json_lines(&agent.log_text());
    }
    drop(silent);
}

#[test]
fn agent_reconnects_within_seconds_of_the_broker_returning() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let (pki, config) = write_broker_files(
        dir.path(),
        &["ico", "ncsc", "nca"],
        &data_dir,
        &Limits::default(),
    )
    .unwrap();
    let mut broker = BrokerProcess::start(&config, &data_dir).unwrap();
    // The agent with the default reconnect settings, as an operator runs it.
    let agent = AgentProcess::start_with(&dir.path().join("ncsc"), "ncsc", broker.addr(), &pki, "")
        .unwrap();
    let spool = agent.spool().clone();
    let logs = || format!("{}{}", broker.log_tail(10), agent.log_tail(20));
    spool.drop_message("before.json", &message(0)).unwrap();
    wait_sent(&spool, 1, OUTCOME_TIMEOUT, logs);

    broker.kill().unwrap();
    spool.drop_message("during.json", &message(1)).unwrap();
    // The outage itself: a duration the test imposes, not a wait for readiness.
    std::thread::sleep(OUTAGE);
    assert_eq!(
        spool.count_moved("sent"),
        1,
        "sent while the broker was down"
    );
    broker.restart().unwrap();
    let ready = Instant::now();
    let logs = || format!("{}{}", broker.log_tail(10), agent.log_tail(20));
    wait_sent(&spool, 2, OUTCOME_TIMEOUT, logs);
    let took = ready.elapsed();
    eprintln!("reconnected and sent {took:?} after the broker was ready again");
    assert!(
        took <= RECONNECT_BOUND,
        "the agent took {took:?} (more than {RECONNECT_BOUND:?}) to send after the broker \
         came back\n{}",
        agent.log_tail(20)
    );
}

/// What `concordat-broker serve` writes to standard error when that is a terminal (a
/// pseudo-terminal here), with `NO_COLOR` set to `no_color`, from its start until it is ready
/// (then it is killed).
fn broker_on_a_terminal(dir: &Path, no_color: &str) -> String {
    use std::{io::BufRead as _, io::Read as _, process::Stdio};
    let data_dir = dir.join("data");
    let (_pki, config) =
        write_broker_files(dir, &["ico", "ncsc", "nca"], &data_dir, &Limits::default()).unwrap();
    let pty = nix::pty::openpty(None, None).unwrap();
    let mut child =
        std::process::Command::new(concordat_tests::binary("concordat-broker").unwrap())
            .args(["serve", "--config"])
            .arg(&config)
            .env("NO_COLOR", no_color)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(pty.slave))
            .spawn()
            .unwrap();
    // Read the terminal as the child writes, so that it never blocks on a full one.
    let mut master = std::fs::File::from(pty.master);
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        // Reading the master fails with EIO once the child has exited and closed its side.
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        out
    });
    let stdout = child.stdout.take().unwrap();
    let ready = std::io::BufReader::new(stdout).lines().next();
    assert!(
        ready.is_some_and(|l| l.is_ok_and(|l| l.starts_with("concordat-broker listening"))),
        "the broker did not start"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    String::from_utf8_lossy(&reader.join().unwrap()).into_owned()
}

#[test]
fn text_logs_are_coloured_on_a_terminal_unless_no_color_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [("", true), ("1", false)];
    for (no_color, coloured) in cases {
        let log = broker_on_a_terminal(&dir.path().join(format!("case{no_color}")), no_color);
        assert!(log.contains("INFO"), "NO_COLOR={no_color:?}: {log}");
        assert_eq!(
            log.contains('\x1b'),
            coloured,
            "NO_COLOR={no_color:?}: ANSI escapes expected: {coloured}\n{log}"
        );
    }
}

/// Names of outbox files are the agency's to choose, and may hold a line feed and escape
/// sequences: the agent's text log shows them escaped, on the line that reports them, and never
/// as a line of their own (a forged entry) or a repainted terminal. A file that is sent, one that
/// is malformed, one that names a payload outside the spool, and a symbolic link are each
/// reported so.
#[test]
fn outbox_file_names_cannot_forge_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, broker) = broker(dir.path(), "text", &[]);
    let agent = AgentProcess::start(&dir.path().join("ncsc"), "ncsc", broker.addr(), &pki).unwrap();
    let forged = "2026-12-05T21:20:00Z ERROR concordat_agent: forged";
    let name = |what: &str| format!("{what}\n{forged}\u{1b}[2K\u{1b}[31m.json");
    let spool = agent.spool();
    spool.drop_message(&name("sent"), &message(1)).unwrap();
    spool.drop_bytes(&name("malformed"), b"not json").unwrap();
    let mut outside = message(2);
    outside["payload_file"] = "../agent.toml".into();
    outside.as_object_mut().unwrap().remove("payload");
    spool.drop_message(&name("outside"), &outside).unwrap();
    std::os::unix::fs::symlink(
        dir.path().join("ncsc/agent.toml"),
        spool.folder("outbox").join(name("link")),
    )
    .unwrap();
    for (what, folder) in [
        ("sent", "sent"),
        ("malformed", "failed"),
        ("outside", "failed"),
    ] {
        assert_eq!(
            agent.outcome(&name(what), OUTCOME_TIMEOUT),
            folder,
            "{what}"
        );
    }
    // The link is moved as a link (which `outcome` does not count as a file).
    let link = spool.folder("failed").join(name("link"));
    wait_for("the link in failed/", OUTCOME_TIMEOUT, || {
        link.symlink_metadata()
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .unwrap();
    let log = agent.log_text();
    assert!(
        !log.contains('\u{1b}'),
        "an escape sequence in the log:\n{log}"
    );
    for line in log.lines() {
        assert!(
            !line.starts_with("2026-12-05T21:20:00Z"),
            "a forged line in the log:\n{log}"
        );
    }
    for what in ["sent", "malformed", "outside", "link"] {
        let shown = format!("{what}\\n{forged}\\u{{1b}}[2K\\u{{1b}}[31m.json");
        assert!(
            log.lines().any(|l| l.contains(&shown)),
            "{what} is not shown escaped:\n{log}"
        );
    }
}
