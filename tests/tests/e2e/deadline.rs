//! Clients never wait forever: against a wedged broker, the real `concordat` CLI gives up
//! within its deadline and says so in one line.

use std::{
    net::TcpListener,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use concordat_tests::{
    TestPki,
    process::{POLL_INTERVAL, PkiFiles},
};

/// How long the CLI may take, all told, with `--timeout 2s`: connecting and one call, each
/// bounded by the deadline, and the start of a debug build on a busy machine.
const LIMIT: Duration = Duration::from_secs(15);

/// A "broker" that accepts TCP connections and never says a word: the kernel completes each
/// handshake into the listener's backlog, and nothing ever reads or writes. `concordat send
/// --timeout 2s` must exit 1 within the limit, with one line naming the broker and the deadline.
#[test]
fn send_to_a_wedged_broker_gives_up_at_its_deadline_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut pki = TestPki::new().unwrap();
    let pki = PkiFiles::write(&mut pki, &dir.path().join("pki"), &["ncsc"]).unwrap();
    let payload = dir.path().join("payload.json");
    std::fs::write(&payload, br#"{"summary":"wedged"}"#).unwrap();
    let wedged = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://localhost:{}", wedged.local_addr().unwrap().port());

    let binary = concordat_tests::binary("concordat").unwrap();
    let started = Instant::now();
    let mut child = Command::new(binary)
        .args(["send", "--to", "ico", "--kind", "threat_assessment"])
        .arg("--payload")
        .arg(&payload)
        .args(["--broker", &url])
        .arg("--ca")
        .arg(pki.ca())
        .arg("--cert")
        .arg(pki.cert("ncsc"))
        .arg("--key")
        .arg(pki.key("ncsc"))
        .args(["--timeout", "2s"])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("concordat send was still waiting on a wedged broker after {LIMIT:?}");
        }
        std::thread::sleep(POLL_INTERVAL);
    };
    let took = started.elapsed();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(status.code(), Some(1), "stderr: {stderr}");
    assert!(
        took >= Duration::from_secs(2),
        "gave up after {took:?}, before its deadline: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "not one line: {stderr}");
    let expected = format!("error: the broker at {url} did not answer within 2s (");
    assert!(lines[0].starts_with(&expected), "{}", lines[0]);
    assert!(out.stdout.is_empty());
    drop(wedged);
}
