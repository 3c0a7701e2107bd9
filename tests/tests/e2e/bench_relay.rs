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
    for label in ["bare mTLS relay", "full broker", "full, PostgreSQL"] {
        let (accepted, errors) = run_counts(&stdout, label);
        assert!(accepted > 0, "{label}: nothing accepted\n{stdout}");
        assert_eq!(errors, 0, "{label}: failed requests\n{stdout}");
    }
    for line in [
        "ratio PostgreSQL/sled throughput: ",
        "ratio full/bare throughput: ",
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
        .find_map(|l| {
            l.strip_prefix("starting a PostgreSQL primary and a synchronous standby in ")?
                .strip_suffix(" (stopped at the end)")
        })
        .unwrap_or_else(|| panic!("no line naming the cluster's directory:\n{stdout}"));
    assert!(!std::path::Path::new(dir).exists(), "{dir} is left behind");
    // Both servers stopped: their ports refuse connections.
    let ports = stdout
        .lines()
        .find_map(|l| l.strip_prefix("PostgreSQL primary on "))
        .unwrap_or_else(|| panic!("no line naming the servers' ports:\n{stdout}"));
    let addrs: Vec<&str> = ports.split(", synchronous standby on ").collect();
    assert_eq!(addrs.len(), 2, "{ports}");
    for addr in addrs {
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "a server still listens on {addr}"
        );
    }
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
