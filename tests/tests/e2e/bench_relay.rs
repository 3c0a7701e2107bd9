//! `concordat bench relay` as its README section runs it, on both engines: the real binary
//! against a real PostgreSQL primary with a synchronous standby. The figures are not judged
//! (speed is measured, never asserted); what is checked is that every run of the benchmark
//! moves transfers end to end without a failed request and prints the lines the README and
//! the issues quote, so that the benchmark cannot rot unnoticed.

use std::process::Command;

use concordat_tests::{binary, postgres::PgCluster};

/// The accepted and failed counts of the run printed on the line starting with `label`.
fn run_counts(output: &str, label: &str) -> (u64, u64) {
    let line = output
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no line for {label:?}:\n{output}"));
    // "... (10886 accepted, 10886 delivered, 0 errors in 5.0 s)"
    let inner = line
        .rsplit_once('(')
        .and_then(|(_, rest)| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("no counts on {line:?}"));
    let count = |what: &str| -> u64 {
        inner
            .split(", ")
            .find_map(|part| {
                let (n, rest) = part.split_once(' ')?;
                rest.starts_with(what).then(|| n.parse().ok()).flatten()
            })
            .unwrap_or_else(|| panic!("no {what} count on {line:?}"))
    };
    (count("accepted"), count("errors"))
}

#[test]
fn bench_relay_runs_on_sled_and_on_postgres_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = PgCluster::start(dir.path()).unwrap_or_else(|e| panic!("{e:#}"));
    let server = format!("postgres://postgres@127.0.0.1:{}", cluster.primary_port());
    let out = Command::new(binary("concordat").unwrap())
        .args(["bench", "relay", "--seconds", "1", "--in-flight", "8"])
        .args(["--organisations", "100", "--postgres", &server])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    for label in [
        "bare mTLS relay, SendStream",
        "bare mTLS relay, unary Send",
        "full broker",
        "full, PostgreSQL",
    ] {
        let (accepted, errors) = run_counts(&stdout, label);
        assert!(accepted > 0, "{label}: nothing accepted\n{stdout}");
        assert_eq!(errors, 0, "{label}: failed requests\n{stdout}");
    }
    for line in [
        "ratio PostgreSQL/sled throughput: ",
        "ratio full/bare throughput: ",
        "ratio full (SendStream)/bare (unary Send) CPU per accepted transfer: ",
        "targets: >= 16000 accepted/s: ",
        "targets: RSS growth over the second half (trend) < 2 %: ",
        "targets: CPU per accepted transfer <= 1.6x the bare relay's (by unary Send): ",
    ] {
        assert!(stdout.contains(line), "no {line:?}:\n{stdout}");
    }
}

/// `--storage postgres` without a server: the benchmark starts a primary and a synchronous
/// standby of its own, runs the full broker on them beside sled, and leaves nothing behind
/// (the servers stopped, their directory removed).
#[test]
fn bench_relay_storage_postgres_starts_and_stops_its_own_cluster() {
    let out = Command::new(binary("concordat").unwrap())
        .args(["bench", "relay", "--seconds", "1", "--in-flight", "8"])
        .args(["--organisations", "100", "--storage", "postgres"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    for label in ["full broker", "full, PostgreSQL"] {
        let (accepted, errors) = run_counts(&stdout, label);
        assert!(accepted > 0, "{label}: nothing accepted\n{stdout}");
        assert_eq!(errors, 0, "{label}: failed requests\n{stdout}");
    }
    assert!(
        stdout.contains("ratio PostgreSQL/sled throughput: "),
        "{stdout}"
    );
    let dir = stdout
        .lines()
        .find_map(cluster_dir)
        .unwrap_or_else(|| panic!("no line naming the cluster's directory:\n{stdout}"));
    assert!(!std::path::Path::new(dir).exists(), "{dir} is left behind");
    let addrs = stdout
        .lines()
        .find_map(cluster_addrs)
        .unwrap_or_else(|| panic!("no line naming the servers' ports:\n{stdout}"));
    assert_servers_stopped(&addrs);
}

/// The directory of the cluster the benchmark starts, from the line of its output naming it.
fn cluster_dir(line: &str) -> Option<&str> {
    line.trim_end()
        .strip_prefix("starting a PostgreSQL primary and a synchronous standby in ")?
        .strip_suffix(" (stopped at the end)")
}

/// The addresses of that cluster's primary and standby, from the line of its output naming
/// them.
fn cluster_addrs(line: &str) -> Option<Vec<String>> {
    let ports = line.trim_end().strip_prefix("PostgreSQL primary on ")?;
    let addrs: Vec<String> = ports
        .split(", synchronous standby on ")
        .map(str::to_owned)
        .collect();
    assert_eq!(addrs.len(), 2, "{ports}");
    Some(addrs)
}

/// Both servers stopped: their ports refuse connections.
fn assert_servers_stopped(addrs: &[String]) {
    for addr in addrs {
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "a server still listens on {addr}"
        );
    }
}

/// Ctrl-C during the PostgreSQL run ends the benchmark with an error that says so, and it
/// still stops its servers and removes their directory (it used to die at once and leave the
/// directory): SIGINT to the benchmark's whole process group, as a terminal sends it (the
/// servers get it too), and to the benchmark alone, as `kill -INT` does (then the run is
/// dropped while its servers still answer; that panicked at first).
#[test]
fn bench_relay_interrupted_leaves_no_cluster_behind() {
    interrupt_the_postgres_run(true);
    interrupt_the_postgres_run(false);
}

/// Interrupts `bench relay --storage postgres` once its servers are up, sending SIGINT to its
/// process group (`to_group`) or to it alone, and checks what it leaves.
fn interrupt_the_postgres_run(to_group: bool) {
    use std::io::{BufRead as _, BufReader};
    use std::os::unix::process::CommandExt as _;

    let mut child = Command::new(binary("concordat").unwrap())
        .args(["bench", "relay", "--seconds", "5", "--in-flight", "8"])
        .args(["--organisations", "100", "--storage", "postgres"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    // Read apart, so that neither pipe can fill while the other is read.
    let mut stderr_pipe = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stderr_pipe, &mut text).map(|_| text)
    });
    let mut seen = String::new();
    let mut dir = None;
    // The PostgreSQL run has begun once both servers are reported up.
    let servers = loop {
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap() == 0 {
            let _ = child.kill();
            panic!("the benchmark ended before its PostgreSQL run:\n{seen}");
        }
        seen.push_str(&line);
        if let Some(d) = cluster_dir(&line) {
            dir = Some(std::path::PathBuf::from(d));
        }
        if let Some(addrs) = cluster_addrs(&line) {
            break addrs;
        }
    };
    let dir = dir.unwrap_or_else(|| panic!("no line naming the cluster's directory:\n{seen}"));
    assert!(dir.exists(), "{}", dir.display());
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    if to_group {
        nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    } else {
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    }
    // It ends within its cleanup's bounds, or it is killed and the test fails.
    let status = concordat_tests::process::wait_for(
        "the benchmark to exit",
        std::time::Duration::from_secs(120),
        || match child.try_wait() {
            Ok(Some(status)) => Ok(status),
            Ok(None) => Err("running".to_owned()),
            Err(e) => Err(e.to_string()),
        },
    )
    .unwrap_or_else(|e| {
        let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
        panic!("{e} (to the group: {to_group})\n{seen}");
    });
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let stderr = stderr.join().unwrap().unwrap();
    assert_eq!(
        status.code(),
        Some(1),
        "an error exit (to the group: {to_group})\n{seen}{rest}\n{stderr}"
    );
    assert!(
        stderr.contains("error: interrupted during the PostgreSQL run"),
        "{status}: the error says why it ended (to the group: {to_group})\n{stderr}"
    );
    assert!(
        !dir.exists(),
        "{} is left behind after Ctrl-C (to the group: {to_group})\n{stderr}",
        dir.display()
    );
    assert_servers_stopped(&servers);
}

/// `--send unary`: every sender waits for each receipt before its next `Send`, against the
/// full broker and the bare relay alike, which then runs once (its unary run is the only
/// baseline).
#[test]
fn bench_relay_sends_by_unary_calls_when_asked() {
    let out = Command::new(binary("concordat").unwrap())
        .args(["bench", "relay", "--seconds", "1", "--in-flight", "8"])
        .args(["--organisations", "100", "--send", "unary"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains("by unary Send"), "{stdout}");
    for label in ["bare mTLS relay, unary Send", "full broker"] {
        let (accepted, errors) = run_counts(&stdout, label);
        assert!(accepted > 0, "{label}: nothing accepted\n{stdout}");
        assert_eq!(errors, 0, "{label}: failed requests\n{stdout}");
    }
    assert!(!stdout.contains("SendStream"), "{stdout}");
    assert!(
        stdout.contains(
            "targets: CPU per accepted transfer <= 1.6x the bare relay's (sent to the same way): "
        ),
        "{stdout}"
    );
}

/// `--storage sled` with `--postgres` contradicts itself, and is refused before any run.
#[test]
fn bench_relay_refuses_a_postgres_server_with_storage_sled() {
    let out = Command::new(binary("concordat").unwrap())
        .args(["bench", "relay", "--seconds", "1", "--storage", "sled"])
        .args(["--postgres", "postgres://postgres@127.0.0.1:1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.is_empty(), "a run began:\n{stdout}");
    assert!(stderr.contains("--storage sled"), "{stderr}");
}
