//! Seeing the federation as an operator does: `concordat status` and `concordat consent list`
//! (the `concordat` binary, its `--json` parsed) against a real broker process after transfers,
//! deliveries, acknowledgements, refusals and a revocation whose numbers the test knows; and the
//! status page beside `/metrics` loaded in headless Chromium with an agent connected.
//!
//! Chromium comes from Debian's `chromium` package (run with `--no-sandbox`, as root may only
//! run it so). Where it is missing, the page test says SKIPPED and why, and passes, unless
//! `CONCORDAT_CHROMIUM_REQUIRED` is set (as `.ci/run` does).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use concordat_agent::client::Broker;
use concordat_broker::{config::Limits, refusal::reason_of};
use concordat_proto::{
    consent::{self, ConsentClaims, Revocation, RevocationTarget},
    envelope::Kind,
    ids::MessageId,
    paserk::SecretKey,
    pb,
};
use concordat_tests::{
    binary,
    process::{AgentProcess, BrokerProcess, PkiFiles, wait_for, write_broker_files},
};
use serde_json::Value;
use time::OffsetDateTime;

/// The federation's members with a certificate each: three agencies and the auditor.
const MEMBERS: &[&str] = &["ico", "ncsc", "nca", "auditor"];

/// A broker process for the test federation of `write_broker_files`, with `metrics_listen` on a
/// free port and `desk` trusted as the ICO's consent desk (any organisation).
fn broker(dir: &Path, desk: &SecretKey) -> (BrokerProcess, SocketAddr, PkiFiles) {
    let data_dir = dir.join("data");
    let (files, config) = write_broker_files(dir, MEMBERS, &data_dir, &Limits::default()).unwrap();
    // A port that was free a moment ago (the broker reports the address it was given).
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "auditors = [\"auditor\"]",
        &format!("auditors = [\"auditor\"]\nmetrics_listen = \"{metrics}\""),
    );
    let text = format!(
        "{text}\n[[consent_issuers]]\nkey = \"{}\"\nagency = \"ico\"\norganisations = [\"*\"]\n",
        desk.public()
    );
    std::fs::write(&config, text).unwrap();
    let broker = BrokerProcess::start(&config, &data_dir).unwrap();
    (broker, metrics, files)
}

/// Runs `concordat ARGS --broker … --ca … --cert … --key …` as `member`; returns the exit
/// success, stdout and stderr.
fn cli(files: &PkiFiles, addr: SocketAddr, member: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(binary("concordat").unwrap())
        .args(args)
        .arg("--broker")
        .arg(format!("https://localhost:{}", addr.port()))
        .arg("--ca")
        .arg(files.ca())
        .arg("--cert")
        .arg(files.cert(member))
        .arg("--key")
        .arg(files.key(member))
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// `concordat ARGS --json` as `member`, parsed; panics with stderr if it failed.
fn cli_json(files: &PkiFiles, addr: SocketAddr, member: &str, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let (ok, stdout, stderr) = cli(files, addr, member, &args);
    assert!(ok, "concordat {args:?} as {member}: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// The entry of `agency` in a status report.
fn agency<'a>(report: &'a Value, agency: &str) -> &'a Value {
    report["agencies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agency"] == agency)
        .unwrap_or_else(|| panic!("{agency} missing in {report:#}"))
}

fn threat(to: &str) -> pb::Envelope {
    pb::Envelope {
        message_id: MessageId::new_random().to_string(),
        recipients: vec![to.into()],
        kind: pb::MessageKind::ThreatAssessment as i32,
        content_type: "application/json".into(),
        tlp: pb::Tlp::Green as i32,
        payload: br#"{"summary":"status"}"#.to_vec(),
        ..Default::default()
    }
}

/// An incident record from the ICO to the NCSC about `org`, under `token`.
fn incident(org: &str, token: &str) -> pb::Envelope {
    pb::Envelope {
        message_id: MessageId::new_random().to_string(),
        recipients: vec!["ncsc".into()],
        kind: pb::MessageKind::IncidentRecord as i32,
        organisation: org.into(),
        incident_ref: "INC-7".into(),
        content_type: "application/json".into(),
        tlp: pb::Tlp::Amber as i32,
        payload: br#"{"summary":"phishing wave"}"#.to_vec(),
        consent_token: token.into(),
        ..Default::default()
    }
}

/// A consent of `org` for the ICO's incident records to the NCSC, signed by the ICO's desk.
fn token(desk: &SecretKey, org: &str, max_uses: Option<u32>) -> String {
    let mut claims = ConsentClaims::builder(org, "ico", "Joint response to INC-7")
        .recipient("ncsc")
        .kind(Kind::IncidentRecord)
        .incident_ref("INC-7")
        .valid_for(time::Duration::hours(1));
    if let Some(n) = max_uses {
        claims = claims.max_uses(n);
    }
    claims
        .build(desk.key_id(), OffsetDateTime::now_utc())
        .unwrap()
        .sign(desk)
        .unwrap()
}

fn jti(desk: &SecretKey, token: &str) -> String {
    consent::verify(token, &desk.public())
        .unwrap()
        .jti()
        .to_string()
}

async fn accepted(client: &Broker, e: pb::Envelope) {
    if let Err(s) = client.exchange().send(e).await {
        panic!("refused: {:?} {}", reason_of(&s), s.message());
    }
}

async fn refused(client: &Broker, e: pb::Envelope) -> String {
    let s = client.exchange().send(e).await.unwrap_err();
    reason_of(&s).unwrap()
}

/// The consents of a `consent list --json` answer by jti.
fn by_jti(list: &Value) -> std::collections::BTreeMap<String, Value> {
    list["consents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["jti"].as_str().unwrap().to_owned(), c.clone()))
        .collect()
}

#[test]
fn status_and_consent_list_report_what_the_federation_did() {
    let dir = tempfile::tempdir().unwrap();
    let desk = SecretKey::generate();
    let (mut broker, _, files) = broker(dir.path(), &desk);
    let addr = broker.addr();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (open, revoked, other) = (
        token(&desk, "acme-ltd", Some(5)),
        token(&desk, "acme-ltd", None),
        token(&desk, "beta-plc", None),
    );

    // Held open until the end: ico's connection and ncsc's subscription.
    let (ico, _ncsc, _stream) = rt.block_on(async {
        let ico = files.client(addr, "ico").unwrap().connect().await.unwrap();
        let nca = files.client(addr, "nca").unwrap().connect().await.unwrap();
        let ncsc = files.client(addr, "ncsc").unwrap().connect().await.unwrap();
        // Three threat assessments wait for ico, which never subscribes; nca -> ncsc has no
        // agreement.
        for _ in 0..3 {
            accepted(&nca, threat("ico")).await;
        }
        assert_eq!(refused(&nca, threat("ncsc")).await, "NO_AGREEMENT");
        // Four incident records for ncsc under three consents; one consent is then revoked
        // and refused when used again.
        for (org, t) in [
            ("acme-ltd", &open),
            ("acme-ltd", &open),
            ("acme-ltd", &revoked),
            ("beta-plc", &other),
        ] {
            accepted(&ico, incident(org, t)).await;
        }
        let statement = Revocation::new(
            desk.key_id(),
            RevocationTarget::Token(jti(&desk, &revoked).parse().unwrap()),
            OffsetDateTime::now_utc(),
        )
        .unwrap()
        .sign(&desk)
        .unwrap();
        ico.consent()
            .revoke(pb::RevokeRequest {
                revocation: statement,
            })
            .await
            .unwrap();
        assert_eq!(
            refused(&ico, incident("acme-ltd", &revoked)).await,
            "CONSENT_REVOKED"
        );
        // ncsc receives its four deliveries and the recall notice, and acknowledges two.
        let mut stream = ncsc
            .exchange()
            .subscribe(pb::SubscribeRequest { window: 16 })
            .await
            .unwrap()
            .into_inner();
        let mut ids = Vec::new();
        while ids.len() < 5 {
            ids.push(stream.message().await.unwrap().unwrap().delivery_id);
        }
        let acked = ncsc
            .exchange()
            .ack(pb::AckRequest {
                delivery_ids: ids[..2].to_vec(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(acked.acknowledged, 2);
        (ico, ncsc, stream)
    });

    // The auditor sees everything. nca's connection has gone (its client was dropped): the
    // broker notices when the socket closes.
    let report = wait_for(
        "nca to be seen disconnected",
        Duration::from_secs(20),
        || {
            let r = cli_json(&files, addr, "auditor", &["status"]);
            if agency(&r, "nca")["connected"] == false {
                Ok(r)
            } else {
                Err(format!("{:#}", agency(&r, "nca")))
            }
        },
    )
    .unwrap();
    assert_eq!(report["caller"], "auditor");
    assert_eq!(report["auditor"], true);
    // (agency, connected, subscriptions, queue depth)
    let want = [
        ("ico", true, 0, 3),
        ("ncsc", true, 1, 3),
        ("nca", false, 0, 0),
    ];
    for (id, connected, subscriptions, depth) in want {
        let a = agency(&report, id);
        assert_eq!(a["connected"], connected, "{id}: {a:#}");
        assert_eq!(a["subscriptions"], subscriptions, "{id}: {a:#}");
        assert_eq!(a["queue_depth"], depth, "{id}: {a:#}");
        let age = a["queue_oldest_age_seconds"].as_u64().unwrap();
        assert!(age < 120, "{id}: oldest item {age} s old");
    }
    assert_eq!(
        agency(&report, "ico")["name"],
        "Information Commissioner's Office"
    );
    let decisions = &report["decisions_last_hour"];
    assert_eq!(decisions["ACCEPTED"], 7, "{decisions:#}");
    assert_eq!(decisions["NO_AGREEMENT"], 1, "{decisions:#}");
    assert_eq!(decisions["CONSENT_REVOKED"], 1, "{decisions:#}");
    let log = &report["audit_log"];
    let (entries, size) = (
        log["entries"].as_u64().unwrap(),
        log["checkpoint_size"].as_u64().unwrap(),
    );
    // At least: the configuration, 7 accepted, 2 refused, a revocation, a recall, 5
    // deliveries and 2 acknowledgements.
    assert!(size >= 19 && size <= entries, "{log:#}");
    assert_eq!(
        log["checkpoint_root"].as_str().unwrap().len(),
        64,
        "{log:#}"
    );
    let agreements: Vec<&str> = report["agreements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(agreements, ["test-ico-ncsc", "test-ico-nca"]);
    assert_eq!(report["agreements"][0]["review_by"], "2099-12-31");
    assert_eq!(report["agreements"][0]["review_overdue"], false);
    assert_eq!(report["agreements"][0]["review_stage"], "current");
    assert_eq!(report["storage"]["serving"], true);

    // An agency sees every connection, but only its own queue and its own agreements.
    let nca = cli_json(&files, addr, "nca", &["status"]);
    assert_eq!(nca["auditor"], false);
    assert!(agency(&nca, "ico")["queue_depth"].is_null(), "{nca:#}");
    assert_eq!(agency(&nca, "ico")["connected"], true);
    assert_eq!(agency(&nca, "nca")["queue_depth"], 0);
    assert_eq!(nca["agreements"].as_array().unwrap().len(), 1);
    assert_eq!(nca["agreements"][0]["id"], "test-ico-nca");
    // And the text a person reads.
    let (ok, text, stderr) = cli(&files, addr, "ncsc", &["status"]);
    assert!(ok, "{stderr}");
    for shown in ["ncsc", "connected(1)", "audit log:", "test-ico-ncsc"] {
        assert!(text.contains(shown), "missing {shown:?} in\n{text}");
    }

    // Consents: the ICO's desk issued all three; the open ones are listed by default.
    let (open_jti, revoked_jti, other_jti) =
        (jti(&desk, &open), jti(&desk, &revoked), jti(&desk, &other));
    let listed = by_jti(&cli_json(&files, addr, "ico", &["consent", "list"]));
    assert_eq!(
        listed.keys().collect::<Vec<_>>(),
        {
            let mut k = vec![&open_jti, &other_jti];
            k.sort();
            k
        },
        "{listed:#?}"
    );
    let c = &listed[&open_jti];
    assert_eq!(c["uses"], 2, "{c:#}");
    assert_eq!(c["max_uses"], 5, "{c:#}");
    assert_eq!(c["state"], "open");
    assert_eq!(c["organisation"], "acme-ltd");
    assert_eq!(c["issuer_agency"], "ico");
    assert_eq!(c["senders"], serde_json::json!(["ico"]));
    assert_eq!(c["recipients"], serde_json::json!(["ncsc"]));
    let expires = OffsetDateTime::parse(
        c["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let left = expires - OffsetDateTime::now_utc();
    assert!(
        left > time::Duration::minutes(50) && left <= time::Duration::hours(1),
        "expires in {left}"
    );
    assert_eq!(listed[&other_jti]["uses"], 1);
    assert!(listed[&other_jti]["max_uses"].is_null());
    // --all adds the revoked one, with its one use.
    let all = by_jti(&cli_json(
        &files,
        addr,
        "ico",
        &["consent", "list", "--all"],
    ));
    assert_eq!(all.len(), 3);
    assert_eq!(all[&revoked_jti]["state"], "revoked");
    assert_eq!(all[&revoked_jti]["uses"], 1);
    // --org narrows to one organisation.
    let beta = by_jti(&cli_json(
        &files,
        addr,
        "ico",
        &["consent", "list", "--all", "--org", "beta-plc"],
    ));
    assert_eq!(beta.keys().collect::<Vec<_>>(), [&other_jti]);
    // The recipient sees the consents of what it received; an agency with no part in them
    // sees none; the auditor sees all.
    assert_eq!(
        by_jti(&cli_json(
            &files,
            addr,
            "ncsc",
            &["consent", "list", "--all"]
        ))
        .len(),
        3
    );
    assert!(
        by_jti(&cli_json(
            &files,
            addr,
            "nca",
            &["consent", "list", "--all"]
        ))
        .is_empty()
    );
    assert_eq!(
        by_jti(&cli_json(
            &files,
            addr,
            "auditor",
            &["consent", "list", "--all"]
        ))
        .len(),
        3
    );
    // An agency may not ask for another's.
    let (ok, _, stderr) = cli(&files, addr, "nca", &["consent", "list", "--agency", "ico"]);
    assert!(!ok);
    assert!(stderr.contains("refused [NOT_AUTHORISED]"), "{stderr}");
    // Text.
    let (ok, text, stderr) = cli(&files, addr, "ico", &["consent", "list", "--all"]);
    assert!(ok, "{stderr}");
    assert!(text.contains(&format!("{revoked_jti} revoked")), "{text}");
    assert!(text.contains("uses 2/5"), "{text}");

    drop(ico);
    drop(rt);
    assert!(broker.terminate(Duration::from_secs(10)).unwrap().success());
}

/// `GET path` over HTTP/1.1: the status code, content type and body.
fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

/// Chromium, if it runs: `CONCORDAT_CHROMIUM` or `chromium` on the path.
fn chromium() -> Result<PathBuf, String> {
    let path =
        std::env::var_os("CONCORDAT_CHROMIUM").map_or_else(|| "chromium".into(), PathBuf::from);
    match Command::new(&path).arg("--version").output() {
        Ok(o) if o.status.success() => Ok(path),
        Ok(o) => Err(format!(
            "{} --version exited with {}",
            path.display(),
            o.status
        )),
        Err(e) => Err(format!(
            "{}: {e} (Debian: apt-get install chromium)",
            path.display()
        )),
    }
}

/// The DOM Chromium builds from `url`, serialised (`--dump-dom`); at most a minute.
fn dump_dom(chromium: &Path, url: &str, profile: &Path) -> String {
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("chromium did not finish within a minute");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "chromium: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The text of a DOM with its tags removed and runs of whitespace made one space: what a
/// person reads, cell after cell.
fn visible_text(dom: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    let mut in_style = false;
    let lower = dom.to_ascii_lowercase();
    let mut i = 0;
    for (at, c) in dom.char_indices() {
        if at < i {
            continue;
        }
        if c == '<' {
            if lower[at..].starts_with("<style") {
                in_style = true;
            } else if lower[at..].starts_with("</style") {
                in_style = false;
            }
            in_tag = true;
            out.push(' ');
        } else if c == '>' {
            in_tag = false;
        } else if !in_tag && !in_style {
            out.push(c);
        }
        i = at + c.len_utf8();
    }
    let out = out
        .replace("&amp;", "&")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&nbsp;", " ");
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn the_status_page_shows_what_a_person_would_see() {
    let chromium = chromium();
    let dir = tempfile::tempdir().unwrap();
    let desk = SecretKey::generate();
    let (mut broker, metrics, files) = broker(dir.path(), &desk);
    let addr = broker.addr();
    // The ICO's agent, receiving.
    let mut agent =
        AgentProcess::start(&dir.path().join("ico-agent"), "ico", addr, &files).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let nca = files.client(addr, "nca").unwrap().connect().await.unwrap();
        for _ in 0..2 {
            accepted(&nca, threat("ico")).await;
        }
        for _ in 0..3 {
            assert_eq!(refused(&nca, threat("ncsc")).await, "NO_AGREEMENT");
        }
    });
    drop(rt);
    // The agent takes both (the queue empties) and its subscription is open.
    wait_for("the agent to receive both", Duration::from_secs(30), || {
        let (_, _, page) = get(metrics, "/status");
        let row = page
            .lines()
            .find(|l| l.contains("<td>ico</td>"))
            .unwrap_or_default()
            .to_owned();
        if row.contains("connected (1)") && row.contains("<td>yes</td><td>0</td>") {
            Ok(())
        } else {
            Err(row)
        }
    })
    .unwrap();
    let (status, content_type, page) = get(metrics, "/status");
    assert_eq!(status, 200);
    assert_eq!(content_type, "text/html; charset=utf-8");
    assert!(!page.to_ascii_lowercase().contains("<script"), "{page}");

    let dom = match &chromium {
        Ok(chromium) => dump_dom(
            chromium,
            &format!("http://{metrics}/status"),
            &dir.path().join("chromium-profile"),
        ),
        Err(why) => {
            if std::env::var_os("CONCORDAT_CHROMIUM_REQUIRED").is_some() {
                panic!("chromium is required (CI) but not available: {why}");
            }
            eprintln!("SKIPPED: chromium is not available: {why}");
            assert!(agent.terminate(Duration::from_secs(10)).unwrap().success());
            assert!(broker.terminate(Duration::from_secs(10)).unwrap().success());
            return;
        }
    };
    let text = visible_text(&dom);
    // What a person reads, row by row.
    for shown in [
        "Concordat broker status",
        "Storage: serving",
        "ico Information Commissioner's Office connected (1) yes 0 -",
        "ncsc National Cyber Security Centre not connected no 0 -",
        "nca National Crime Agency not connected no 0 -",
        "accepted 2",
        "refused: NO_AGREEMENT 3",
        "test-ico-ncsc",
    ] {
        assert!(text.contains(shown), "missing {shown:?} in:\n{text}");
    }
    // The checkpoint the page shows is the log's: its size equals the entries, and at least
    // the configuration, two transfers, three refusals, two deliveries and two
    // acknowledgements are in it.
    let number_after = |label: &str| -> u64 {
        let rest = &text[text
            .find(label)
            .unwrap_or_else(|| panic!("{label} in {text}"))
            + label.len()..];
        rest.split_whitespace().next().unwrap().parse().unwrap()
    };
    let entries = number_after("Entries");
    let size = number_after("Latest checkpoint size");
    assert_eq!(size, entries, "{text}");
    assert!(size >= 10, "{text}");
    assert!(agent.terminate(Duration::from_secs(10)).unwrap().success());
    assert!(broker.terminate(Duration::from_secs(10)).unwrap().success());
}
