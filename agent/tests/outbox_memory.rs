//! Loading a large outbox file under a limit on the address space, as an operator may run the
//! agent (`ulimit -v`). A test binary of its own: the limit holds for the whole process, so no
//! other test may run beside it.
//!
//! The agent loads up to 32 outbox files at once, each of up to 80 MiB. Parsed into a
//! `serde_json::Value`, an inline payload of small values took ~37 times its size (one 80 MiB
//! file, ~3 GB): three such files aborted an agent under `ulimit -v 6000000`, and since they
//! stayed in the outbox, it aborted again at every start.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use concordat_agent::spool::{OutboxItem, Spool};
use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// The process's virtual memory size now, from `/proc/self/status`.
fn vm_size() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// An outbox file of 32 MiB whose inline payload is an array of small objects (the shape that
/// costs a `Value` the most per byte) loads within 512 MiB more address space than the process
/// had: a few times its size, not tens of times (which would abort this test).
#[test]
fn a_large_inline_payload_loads_in_a_few_times_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    let item = r#"{"a":[1,2],"b":{}},"#;
    let count = 32 * 1024 * 1024 / item.len();
    let mut text = String::from(r#"{"recipients":["ico"],"kind":"threat_assessment","payload":["#);
    for _ in 0..count {
        text.push_str(item);
    }
    text.pop();
    text.push_str("]}");
    let size = text.len();
    std::fs::write(spool.dir("outbox").join("big.json"), &text).unwrap();
    drop(text);
    let (_, hard) = getrlimit(Resource::RLIMIT_AS).unwrap();
    let limit = (vm_size() + 512 * 1024 * 1024).min(hard);
    setrlimit(Resource::RLIMIT_AS, limit, hard).unwrap();
    let loaded = spool.load("big.json");
    let OutboxItem::Envelope(envelope) = loaded.unwrap() else {
        panic!("not an envelope");
    };
    assert_eq!(
        envelope.payload.len(),
        size - r#"{"recipients":["ico"],"kind":"threat_assessment","payload":}"#.len()
    );
}
