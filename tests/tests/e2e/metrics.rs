//! `/metrics` as Prometheus reads it: a real broker process with `metrics_listen`, scraped over
//! real HTTP with each `Accept` header Prometheus sends, each answer checked for its content
//! type and parsed by the reference parsers: the Python `prometheus_client` text (0.0.4) and
//! OpenMetrics parsers, and `promtool check metrics` (which reads the 0.0.4 text format only).
//! The shipped alert rules (`dist/prometheus/alerts.yml`) are checked and their unit tests run
//! with `promtool test rules`.
//!
//! The Python parser is installed into a virtual environment under the workspace's `target/`
//! (reused by later runs); `promtool` comes from Debian's `prometheus` package. Where either is
//! missing, the test says SKIPPED and why, and passes, unless `CONCORDAT_METRICS_TOOLS_REQUIRED`
//! is set (as `.ci/run` does).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use concordat_agent::client::ClientTls;
use concordat_broker::{config::Limits, refusal::Reason};
use concordat_proto::{ids::MessageId, pb};
use concordat_tests::{
    TestPki,
    process::{BrokerProcess, PkiFiles, wait_for, write_broker_files},
};

/// The Python client, pinned so that the parsers do not move under the test.
const PYTHON_CLIENT: &str = "prometheus-client==0.26.0";

/// What Prometheus 2.x sends when it scrapes (it prefers OpenMetrics).
const ACCEPT_PROMETHEUS: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
/// What a client that reads only the classic text format sends.
const ACCEPT_TEXT: &str = "text/plain;version=0.0.4";

const OPENMETRICS_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Parses standard input with the parser named by the first argument and prints every family
/// as JSON: its name, type and samples.
const PARSE_PY: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families as text
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
parse = openmetrics if sys.argv[1] == "openmetrics" else text
out = []
for f in parse(sys.stdin.read()):
    out.append({"name": f.name, "type": f.type,
                "samples": [{"name": s.name, "labels": s.labels, "value": float(s.value)} for s in f.samples]})
print(json.dumps(out, allow_nan=False))
"#;

/// Whether a missing tool fails the test (CI) or skips it.
fn required() -> bool {
    std::env::var_os("CONCORDAT_METRICS_TOOLS_REQUIRED").is_some()
}

/// Panics (CI) or prints SKIPPED (elsewhere) for a missing tool.
fn unavailable(what: &str, why: &str) {
    if required() {
        panic!("{what} is required (CI) but not available: {why}");
    }
    eprintln!("SKIPPED: {what} is not available: {why}");
}

/// A Python with `prometheus_client`, installing it if needed; `Err` says why not.
fn parser_python() -> Result<PathBuf, String> {
    concordat_tests::python_venv(
        "prometheus-client-venv",
        "prometheus_client.openmetrics.parser",
        PYTHON_CLIENT,
    )
}

/// `promtool`, if it runs.
fn promtool() -> Result<PathBuf, String> {
    let path = PathBuf::from("promtool");
    match Command::new(&path).arg("--version").output() {
        Ok(o) if o.status.success() => Ok(path),
        Ok(o) => Err(format!("promtool --version exited with {}", o.status)),
        Err(e) => Err(format!(
            "promtool: {e} (Debian: apt-get install prometheus)"
        )),
    }
}

/// One family as the Python parser sees it.
#[derive(Debug)]
struct Family {
    kind: String,
    samples: Vec<Sample>,
}

#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses `body` with `prometheus_client`'s `parser` ("text" or "openmetrics"); panics with
/// the parser's error if it refuses the text.
fn parse(python: &Path, parser: &str, body: &str) -> BTreeMap<String, Family> {
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(script.path(), PARSE_PY).unwrap();
    // Isolated (`-I`), as in `stix_crosscheck`: no module beside the script shadows the parser's.
    let mut child = Command::new(python)
        .arg("-I")
        .arg(script.path())
        .arg(parser)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the {parser} parser refused the exposition: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    let families: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    families
        .into_iter()
        .map(|f| {
            let samples = f["samples"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| Sample {
                    name: s["name"].as_str().unwrap().to_owned(),
                    labels: s["labels"]
                        .as_object()
                        .unwrap()
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                        .collect(),
                    value: s["value"].as_f64().unwrap(),
                })
                .collect();
            (
                f["name"].as_str().unwrap().to_owned(),
                Family {
                    kind: f["type"].as_str().unwrap().to_owned(),
                    samples,
                },
            )
        })
        .collect()
}

/// `GET /metrics` over HTTP/1.1 with `accept` (none when `None`): the status code, the
/// content type and the body.
fn scrape(addr: SocketAddr, accept: Option<&str>) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    assert!(
        !headers
            .get("transfer-encoding")
            .is_some_and(|t| t.contains("chunked")),
        "a chunked answer (this reader expects a length): {headers:?}"
    );
    let content_type = headers.get("content-type").cloned().unwrap_or_default();
    (status, content_type, body.to_owned())
}

/// A broker process with `metrics_listen` on a free port; returns it, the metrics address and
/// its PKI's files.
fn broker_with_metrics(dir: &Path) -> (BrokerProcess, SocketAddr, PkiFiles) {
    let data_dir = dir.join("data");
    let (files, config) =
        write_broker_files(dir, &["ico", "nca"], &data_dir, &Limits::default()).unwrap();
    // A port that was free a moment ago: the broker reports the address it was given, not
    // the one it bound, so port 0 cannot be used here.
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "auditors = [\"auditor\"]",
        &format!("auditors = [\"auditor\"]\nmetrics_listen = \"{metrics}\""),
    );
    std::fs::write(&config, text).unwrap();
    let broker = BrokerProcess::start(&config, &data_dir).unwrap();
    (broker, metrics, files)
}

/// Every family the broker must expose from the start, with its type.
const FAMILIES: &[(&str, &str)] = &[
    ("concordat_transfers_accepted", "counter"),
    ("concordat_transfers_refused", "counter"),
    ("concordat_deliveries", "counter"),
    ("concordat_acknowledgements", "counter"),
    ("concordat_connections_refused", "counter"),
    ("concordat_handshake_failures", "counter"),
    ("concordat_reloads", "counter"),
    ("concordat_consistency_proofs_refused", "counter"),
    ("concordat_subscribers", "gauge"),
    ("concordat_queue_depth", "gauge"),
    ("concordat_queue_oldest_age_seconds", "gauge"),
    ("concordat_audit_log_entries", "gauge"),
    ("concordat_checkpoint_size", "gauge"),
    ("concordat_checkpoint_age_seconds", "gauge"),
    ("concordat_storage_free_bytes", "gauge"),
    ("concordat_storage_min_free_bytes", "gauge"),
    ("concordat_storage_serving", "gauge"),
    ("concordat_store_flush_seconds", "histogram"),
    ("concordat_store_batch_ops", "histogram"),
];

/// Checks what both parsers must agree on at start.
fn check_families(format: &str, families: &BTreeMap<String, Family>) {
    let mut problems = Vec::new();
    for (name, kind) in FAMILIES {
        match families.get(*name) {
            None => problems.push(format!("{name}: missing")),
            Some(f) if f.kind != *kind => {
                problems.push(format!("{name}: typed {} rather than {kind}", f.kind));
            }
            Some(_) => {}
        }
    }
    // Every counter's samples are named `_total`.
    for (name, f) in families.iter().filter(|(_, f)| f.kind == "counter") {
        for s in &f.samples {
            if s.name != format!("{name}_total") && s.name != format!("{name}_created") {
                problems.push(format!("{name}: counter sample {}", s.name));
            }
        }
    }
    // Refusals exist at zero for every reason from the start.
    if let Some(refused) = families.get("concordat_transfers_refused") {
        for reason in Reason::ALL {
            let found = refused.samples.iter().find(|s| {
                s.name.ends_with("_total")
                    && s.labels.get("reason").map(String::as_str) == Some(reason.as_str())
            });
            match found {
                Some(s) if s.value == 0.0 => {}
                Some(s) => problems.push(format!("refused {reason}: {} at start", s.value)),
                None => problems.push(format!("refused {reason}: no sample")),
            }
        }
    }
    // Each recipient's queue is there, empty.
    for agency in ["ico", "nca"] {
        for name in [
            "concordat_queue_depth",
            "concordat_queue_oldest_age_seconds",
            "concordat_subscribers",
        ] {
            let value = families.get(name).and_then(|f| {
                f.samples
                    .iter()
                    .find(|s| s.labels.get("agency").map(String::as_str) == Some(agency))
                    .map(|s| s.value)
            });
            if value != Some(0.0) {
                problems.push(format!("{name}{{agency={agency}}}: {value:?} at start"));
            }
        }
    }
    // The start-up write (the configuration's audit entry) went through the writer: one batch
    // at least, flushed, and sealed into a checkpoint.
    for name in ["concordat_store_flush_seconds", "concordat_store_batch_ops"] {
        let count = families.get(name).and_then(|f| {
            f.samples
                .iter()
                .find(|s| s.name == format!("{name}_count"))
                .map(|s| s.value)
        });
        let inf = families.get(name).and_then(|f| {
            f.samples
                .iter()
                .find(|s| {
                    s.name == format!("{name}_bucket")
                        && s.labels.get("le").map(String::as_str) == Some("+Inf")
                })
                .map(|s| s.value)
        });
        if !count.is_some_and(|c| c >= 1.0) || inf != count {
            problems.push(format!("{name}: count {count:?}, +Inf bucket {inf:?}"));
        }
    }
    let size = families
        .get("concordat_checkpoint_size")
        .and_then(|f| f.samples.first())
        .map(|s| s.value);
    let entries = families
        .get("concordat_audit_log_entries")
        .and_then(|f| f.samples.first())
        .map(|s| s.value);
    if !size.is_some_and(|s| s >= 1.0) || size != entries {
        problems.push(format!(
            "checkpoint size {size:?} against log entries {entries:?}"
        ));
    }
    assert!(
        problems.is_empty(),
        "{format}: {} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn both_formats_are_served_with_their_own_type_and_parse_with_their_types() {
    let python = parser_python();
    let promtool = promtool();
    let dir = tempfile::tempdir().unwrap();
    let (mut broker, metrics, _) = broker_with_metrics(dir.path());

    let (status, open_type, open_body) = scrape(metrics, Some(ACCEPT_PROMETHEUS));
    assert_eq!(status, 200);
    let (status, text_type, text_body) = scrape(metrics, Some(ACCEPT_TEXT));
    assert_eq!(status, 200);
    let (status, default_type, _) = scrape(metrics, None);
    assert_eq!(status, 200);
    assert_eq!(open_type, OPENMETRICS_TYPE, "{open_body}");
    assert_eq!(text_type, TEXT_TYPE, "{text_body}");
    assert_eq!(default_type, TEXT_TYPE, "without Accept, the classic text");
    assert!(open_body.ends_with("# EOF\n"), "{open_body}");
    assert!(!text_body.contains("# EOF"), "{text_body}");

    match &python {
        Ok(python) => {
            check_families("text 0.0.4", &parse(python, "text", &text_body));
            check_families("OpenMetrics", &parse(python, "openmetrics", &open_body));
        }
        Err(why) => unavailable("the Python prometheus_client", why),
    }
    match &promtool {
        Ok(promtool) => {
            let mut child = Command::new(promtool)
                .args(["check", "metrics"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text_body.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
                "promtool check metrics: {}\n{}{}\n{text_body}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(why) => unavailable("promtool", why),
    }
    assert!(broker.terminate(Duration::from_secs(10)).unwrap().success());
}

#[test]
fn the_shipped_alert_rules_pass_their_promtool_tests() {
    let promtool = match promtool() {
        Ok(p) => p,
        Err(why) => return unavailable("promtool", &why),
    };
    let dist = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dist/prometheus");
    for args in [
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "alerts_test.yml"],
    ] {
        let out = Command::new(&promtool)
            .args(&args)
            .current_dir(&dist)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {}: {}\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn envelope(to: &str) -> pb::Envelope {
    pb::Envelope {
        message_id: MessageId::new_random().to_string(),
        recipients: vec![to.into()],
        kind: pb::MessageKind::ThreatAssessment as i32,
        content_type: "application/json".into(),
        tlp: pb::Tlp::Green as i32,
        payload: br#"{"summary":"metrics"}"#.to_vec(),
        ..Default::default()
    }
}

/// The value of the sample line `name` (with its labels, as written) in `body`.
fn value(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn counters_and_gauges_follow_transfers_deliveries_and_refused_handshakes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut broker, metrics, files) = broker_with_metrics(dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr = broker.addr();

    rt.block_on(async {
        let nca = files.client(addr, "nca").unwrap().connect().await.unwrap();
        for _ in 0..2 {
            nca.exchange().send(envelope("ico")).await.unwrap();
        }
        // No agreement permits nca -> ncsc.
        let refused = nca.exchange().send(envelope("ncsc")).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    });
    let (_, _, body) = scrape(metrics, Some(ACCEPT_TEXT));
    for (line, want) in [
        ("concordat_transfers_accepted_total", 2.0),
        (
            "concordat_transfers_refused_total{reason=\"NO_AGREEMENT\"}",
            1.0,
        ),
        ("concordat_queue_depth{agency=\"ico\"}", 2.0),
        ("concordat_subscribers{agency=\"ico\"}", 0.0),
    ] {
        assert_eq!(value(&body, line), Some(want), "{line} in\n{body}");
    }
    let age = value(&body, "concordat_queue_oldest_age_seconds{agency=\"ico\"}").unwrap();
    assert!((0.0..60.0).contains(&age), "oldest item age {age}");

    // ico subscribes, receives both and acknowledges them.
    rt.block_on(async {
        let ico = files.client(addr, "ico").unwrap().connect().await.unwrap();
        let mut stream = ico
            .exchange()
            .subscribe(pb::SubscribeRequest { window: 16 })
            .await
            .unwrap()
            .into_inner();
        let mut ids = Vec::new();
        while ids.len() < 2 {
            let d = stream.message().await.unwrap().unwrap();
            ids.push(d.delivery_id);
        }
        let (_, _, open) = scrape(metrics, Some(ACCEPT_PROMETHEUS));
        for (line, want) in [
            ("concordat_subscribers{agency=\"ico\"}", 1.0),
            ("concordat_deliveries_total", 2.0),
        ] {
            assert_eq!(value(&open, line), Some(want), "{line} in\n{open}");
        }
        let acked = ico
            .exchange()
            .ack(pb::AckRequest { delivery_ids: ids })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(acked.acknowledged, 2);
    });

    // A client certificate from another CA (of the same name) fails its handshake.
    let mut other = TestPki::new().unwrap();
    let other = PkiFiles::write(&mut other, &dir.path().join("other"), &["nca"]).unwrap();
    let stranger = ClientTls::from_files(
        &format!("https://localhost:{}", addr.port()),
        &files.ca(),
        &other.cert("nca"),
        &other.key("nca"),
    )
    .unwrap();
    rt.block_on(async {
        if let Ok(client) = stranger.connect().await {
            assert!(client.exchange().send(envelope("ico")).await.is_err());
        }
    });

    // Counted once the broker's connection task has seen it fail.
    let body = wait_for(
        "the refused handshake to be counted",
        Duration::from_secs(20),
        || {
            let (_, _, body) = scrape(metrics, Some(ACCEPT_TEXT));
            let tls = value(&body, "concordat_connections_refused_total{cause=\"tls\"}");
            // Its issuer has our CA's name but not its key: the signature does not verify.
            let bad = value(
                &body,
                "concordat_handshake_failures_total{cause=\"bad_certificate\"}",
            );
            match (tls, bad) {
                (Some(a), Some(b)) if a >= 1.0 && b >= 1.0 => Ok(body),
                other => Err(format!(
                    "{other:?} {:?}",
                    body.lines()
                        .filter(|l| l.starts_with("concordat_handshake_failures_total"))
                        .collect::<Vec<_>>()
                )),
            }
        },
    )
    .unwrap();
    for (line, want) in [
        ("concordat_acknowledgements_total", 2.0),
        ("concordat_queue_depth{agency=\"ico\"}", 0.0),
        ("concordat_queue_oldest_age_seconds{agency=\"ico\"}", 0.0),
        ("concordat_storage_serving", 1.0),
        ("concordat_handshake_failures_total{cause=\"expired\"}", 0.0),
    ] {
        assert_eq!(value(&body, line), Some(want), "{line} in\n{body}");
    }
    let entries = value(&body, "concordat_audit_log_entries").unwrap();
    assert_eq!(value(&body, "concordat_checkpoint_size"), Some(entries));
    let batches = value(&body, "concordat_store_batch_ops_count").unwrap();
    assert!(batches >= 4.0, "{batches} batches written\n{body}");
    drop(rt);
    assert!(broker.terminate(Duration::from_secs(10)).unwrap().success());
}
