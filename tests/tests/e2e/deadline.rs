//! Clients never wait forever: against a wedged broker, the real `concordat` CLI gives up
//! within its deadline and says so in one line, and the real agent gives up on each attempt
//! and tries again. Two wedges: one that never finishes connecting (a TCP listener that never
//! speaks), and one that connects (TCP, mutual TLS and all) and then never answers a call.

use std::{
    path::Path,
    process::{Command, Output, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use concordat_tests::{
    TestPki,
    process::{POLL_INTERVAL, PkiFiles},
};
use tokio::net::TcpListener;

/// How long the CLI may take, all told, with `--timeout 2s`: connecting and one call, each
/// bounded by the deadline, and the start of a debug build on a busy machine.
const LIMIT: Duration = Duration::from_secs(15);

/// What became of one `concordat send`.
struct Ran {
    output: Output,
    took: Duration,
}

/// Runs `concordat send --timeout 2s` as the NCSC against `url`, killing it (and failing the
/// test) if it is still running after [`LIMIT`].
fn send_with_timeout(url: &str, pki: &PkiFiles, dir: &Path) -> Ran {
    let payload = dir.join("payload.json");
    std::fs::write(&payload, br#"{"summary":"wedged"}"#).unwrap();
    let binary = concordat_tests::binary("concordat").unwrap();
    let started = Instant::now();
    let mut child = Command::new(binary)
        .args(["send", "--to", "ico", "--kind", "threat_assessment"])
        .arg("--payload")
        .arg(&payload)
        .args(["--broker", url])
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
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("concordat send was still waiting on a wedged broker after {LIMIT:?}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    let took = started.elapsed();
    Ran {
        output: child.wait_with_output().unwrap(),
        took,
    }
}

/// Exit status 1, not before the deadline, and exactly one line on stderr that names the
/// broker and the deadline, ending with `(why)`.
fn assert_one_clear_line(ran: &Ran, url: &str, why: &str) {
    let stderr = String::from_utf8_lossy(&ran.output.stderr);
    assert_eq!(ran.output.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        ran.took >= Duration::from_secs(2),
        "gave up after {:?}, before its deadline: {stderr}",
        ran.took
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines,
        [format!(
            "error: the broker at {url} did not answer within 2s ({why})"
        )],
        "not the one clear line"
    );
    assert!(ran.output.stdout.is_empty());
    eprintln!(
        "wedged broker ({why}): concordat send gave up after {:?}",
        ran.took
    );
}

/// A "broker" that accepts TCP connections and never says a word: the kernel completes each
/// handshake into the listener's backlog, and nothing ever reads or writes, so the client's TLS
/// handshake waits for an answer that never comes.
#[test]
fn send_gives_up_on_a_broker_that_never_finishes_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let mut pki = TestPki::new().unwrap();
    let pki = PkiFiles::write(&mut pki, &dir.path().join("pki"), &["ncsc"]).unwrap();
    let wedged = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://localhost:{}", wedged.local_addr().unwrap().port());

    let ran = send_with_timeout(&url, &pki, dir.path());
    assert_one_clear_line(&ran, &url, "connecting");
    drop(wedged);
}

/// A "broker" that completes mutual TLS (the test PKI's broker certificate, ALPN h2) and then
/// never reads or writes another byte: connecting succeeds, and the call is what must give up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_gives_up_on_a_broker_that_connects_and_never_answers() {
    let dir = tempfile::tempdir().unwrap();
    let mut test_pki = TestPki::new().unwrap();
    let pki = PkiFiles::write(&mut test_pki, &dir.path().join("pki"), &["ncsc"]).unwrap();
    let server =
        concordat_broker::tls::server_config(&test_pki.tls_material(None).unwrap()).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://localhost:{}",
        listener.local_addr().unwrap().port()
    );
    let (handshakes_tx, mut handshakes) = tokio::sync::mpsc::unbounded_channel();
    let wedge = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            if let Ok(tls) = acceptor.accept(tcp).await {
                let _ = handshakes_tx.send(());
                // Held open, never read or written.
                held.push(tls);
            }
        }
    });

    let dir_path = dir.path().to_path_buf();
    let url_for_send = url.clone();
    let ran =
        tokio::task::spawn_blocking(move || send_with_timeout(&url_for_send, &pki, &dir_path))
            .await
            .unwrap();
    assert!(
        handshakes.try_recv().is_ok(),
        "the client never completed the TLS handshake: {}",
        String::from_utf8_lossy(&ran.output.stderr)
    );
    assert_one_clear_line(&ran, &url, "deadline exceeded");
    wedge.abort();
}

/// The agent daemon, with `[timeouts] connect_ms = 300` in its `agent.toml`, against a broker
/// that never finishes connecting: it gives up on each attempt, says why once, and keeps
/// retrying (it does not hang in its first connection attempt).
#[test]
fn the_agent_gives_up_on_a_wedged_broker_and_keeps_retrying() {
    let dir = tempfile::tempdir().unwrap();
    let mut pki = TestPki::new().unwrap();
    let pki = PkiFiles::write(&mut pki, &dir.path().join("pki"), &["ico"]).unwrap();
    let wedged = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = wedged.local_addr().unwrap().port();
    let spool = dir.path().join("ico");
    std::fs::create_dir_all(&spool).unwrap();
    let config = spool.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"broker = "https://localhost:{port}"
ca = {ca:?}
cert = {cert:?}
key = {key:?}
spool = "."
[reconnect]
min_backoff_ms = 50
max_backoff_ms = 200
[timeouts]
connect_ms = 300
"#,
            ca = pki.ca().display().to_string(),
            cert = pki.cert("ico").display().to_string(),
            key = pki.key("ico").display().to_string(),
        ),
    )
    .unwrap();
    let log = spool.join("agent.log");
    let mut agent = Command::new(concordat_tests::binary("concordat-agent").unwrap())
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Each loop connects on its own; every attempt is a TCP connection the wedge queues up.
    // Several queued connections show that the agent gave up and tried again.
    let expected =
        format!("the broker at https://localhost:{port} did not answer within 300ms (connecting)");
    wedged.set_nonblocking(true).unwrap();
    let mut held = Vec::new();
    let waited = concordat_tests::process::wait_for(
        "the agent to give up on the wedged broker and retry",
        LIMIT,
        || {
            if let Ok(Some(status)) = agent.try_wait() {
                return Ok(Err(format!("the agent exited: {status}")));
            }
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            // Accepting the queued connections only counts them: nothing is ever written.
            while let Ok((stream, _)) = wedged.accept() {
                held.push(stream);
            }
            let attempts = held.len();
            if text.contains(&expected) && attempts >= 4 {
                Ok(Ok(attempts))
            } else {
                Err(format!("{attempts} connection attempts; log: {text}"))
            }
        },
    );
    let _ = agent.kill();
    let _ = agent.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let attempts = waited
        .unwrap_or_else(|e| panic!("{e:#}"))
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    // Said once per loop (state changes are logged once), not once per attempt.
    let said = text.lines().filter(|l| l.contains(&expected)).count();
    assert!(
        (1..=2).contains(&said),
        "{said} lines for {attempts} attempts:\n{text}"
    );
}
