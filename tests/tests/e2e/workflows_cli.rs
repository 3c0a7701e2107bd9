//! The MoUs' workflows as operators and agencies' systems drive them: the real `concordat`
//! binary and real agents (`concordat-agent`, their spools) against a real broker process over
//! mutual TLS. A subject-access consultation opened from the CLI reaches the consulted
//! agency's inbox with its workflow fields, is answered through that agency's outbox, and can
//! be closed only once answered; a public statement may be published once approved and past
//! its date; two agencies declaring the same incident (one from the CLI, one from its outbox)
//! each get a coordination notice in their inbox; and `audit explain --workflow` tells the
//! consultation's story.

use std::{net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use concordat_broker::config::Limits;
use concordat_tests::{
    binary,
    process::{AgentProcess, BrokerProcess, PkiFiles, SpoolDir, wait_for, write_broker_files},
};
use serde_json::Value;
use tempfile::TempDir;
use time::OffsetDateTime;

/// How long an agent may take to move a file or store a delivery.
const OUTCOME_TIMEOUT: Duration = Duration::from_secs(30);

/// The exit status of a refused step.
const EXIT_REFUSED: i32 = 3;

/// A broker process whose test federation also lets subject-access consultations flow both
/// ways between the NCA and the ICO, and public communications both ways between the ICO and
/// the NCSC, and registers Acme Ltd; the PKI of the three agencies and the auditor.
struct Federation {
    dir: TempDir,
    files: PkiFiles,
    broker: BrokerProcess,
}

impl Federation {
    fn start() -> Federation {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let (files, config) = write_broker_files(
            dir.path(),
            &["ico", "ncsc", "nca", "auditor"],
            &data_dir,
            &Limits::default(),
        )
        .unwrap();
        let text = std::fs::read_to_string(&config).unwrap();
        // Flows of the ICO–NCSC agreement go before the next agreement's table; the ICO–NCA
        // agreement is the last, so its flows are appended.
        // Drafts are Markdown, which the broker reads: the flows need not allow opaque payloads.
        let comms = "[[agreements.flows]]\nfrom = \"ico\"\nto = \"ncsc\"\n\
                     kinds = [\"public_communication\"]\nclause = \"1.3\"\n\n\
                     [[agreements.flows]]\nfrom = \"ncsc\"\nto = \"ico\"\n\
                     kinds = [\"public_communication\"]\nclause = \"1.4\"\n\n";
        let marker = "[[agreements]]\nid = \"test-ico-nca\"";
        assert!(
            text.contains(marker),
            "the test federation changed:\n{text}"
        );
        let text = text.replace(marker, &format!("{comms}{marker}"));
        let text = format!(
            "{text}\n[[agreements.flows]]\nfrom = \"nca\"\nto = \"ico\"\n\
             kinds = [\"dsar_consultation\"]\nclause = \"2.2\"\n\n\
             [[agreements.flows]]\nfrom = \"ico\"\nto = \"nca\"\n\
             kinds = [\"dsar_consultation\"]\nclause = \"2.3\"\n\n\
             [[organisations]]\nid = \"acme-ltd\"\nlegal_name = \"Acme Ltd\"\n"
        );
        std::fs::write(&config, text).unwrap();
        let broker = BrokerProcess::start(&config, &data_dir).unwrap();
        Federation { dir, files, broker }
    }

    fn addr(&self) -> SocketAddr {
        self.broker.addr()
    }

    fn agent(&self, agency: &str) -> AgentProcess {
        AgentProcess::start(
            &self.dir.path().join(agency),
            agency,
            self.addr(),
            &self.files,
        )
        .unwrap()
    }

    /// A file in the test directory holding `text`.
    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Runs `concordat ARGS --broker … --ca … --cert … --key …` as `member`.
    fn cli(&self, member: &str, args: &[&str]) -> Outcome {
        let out = Command::new(binary("concordat").unwrap())
            .args(args)
            .arg("--broker")
            .arg(format!("https://localhost:{}", self.addr().port()))
            .arg("--ca")
            .arg(self.files.ca())
            .arg("--cert")
            .arg(self.files.cert(member))
            .arg("--key")
            .arg(self.files.key(member))
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        Outcome {
            code: out.status.code(),
            stdout: String::from_utf8(out.stdout).unwrap(),
            stderr: String::from_utf8(out.stderr).unwrap(),
            args: args.join(" "),
        }
    }
}

/// What one run of the CLI did.
#[derive(Debug)]
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    args: String,
}

impl Outcome {
    /// The standard output of a run that must have succeeded.
    fn ok(self) -> String {
        assert_eq!(
            self.code,
            Some(0),
            "concordat {}: {}\n{self:?}",
            self.args,
            self.stderr
        );
        self.stdout
    }

    /// The JSON output of a run that must have succeeded.
    fn json(self) -> Value {
        let args = self.args.clone();
        serde_json::from_str(&self.ok()).unwrap_or_else(|e| panic!("concordat {args}: {e}"))
    }

    /// The standard output of a run the broker must have refused.
    fn refused(self) -> String {
        assert_eq!(
            self.code,
            Some(EXIT_REFUSED),
            "concordat {}: {self:?}",
            self.args
        );
        self.stdout
    }
}

/// A date `days` from today (UTC), as `YYYY-MM-DD`.
fn date(days: i64) -> String {
    let d = (OffsetDateTime::now_utc() + time::Duration::days(days)).date();
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// The transfer id in `concordat send`'s output ("accepted: transfer T (message M)").
fn transfer_id(sent: &str) -> String {
    sent.split_whitespace()
        .skip_while(|w| *w != "transfer")
        .nth(1)
        .unwrap_or_else(|| panic!("no transfer id in {sent:?}"))
        .to_owned()
}

/// The inbox files of `spool` whose JSON satisfies `matches`, once there is at least one.
fn inbox_files(spool: &SpoolDir, what: &str, matches: impl Fn(&Value) -> bool) -> Vec<Value> {
    wait_for(what, OUTCOME_TIMEOUT, || {
        let found: Vec<Value> = spool
            .files("inbox")
            .map_err(|e| e.to_string())?
            .iter()
            .filter_map(|name| spool.read_json("inbox", name).ok())
            .filter(|v| matches(v))
            .collect();
        if found.is_empty() {
            Err(format!("inbox: {:?}", spool.files("inbox")))
        } else {
            Ok(found)
        }
    })
    .unwrap()
}

/// Waits until outbox file `name` of `spool` was moved into `folder`.
fn moved(spool: &SpoolDir, name: &str, folder: &str) {
    wait_for(&format!("{name} in {folder}/"), OUTCOME_TIMEOUT, || {
        if spool
            .moved(folder)
            .map_err(|e| e.to_string())?
            .iter()
            .any(|n| n == name)
        {
            Ok(())
        } else {
            Err(format!(
                "sent {:?}, refused {:?}, failed {:?}",
                spool.files("sent"),
                spool.files("refused"),
                spool.files("failed")
            ))
        }
    })
    .unwrap();
}

#[test]
fn a_consultation_opened_from_the_cli_is_answered_through_the_outbox_and_closed() {
    let fed = Federation::start();
    let ico = fed.agent("ico");
    let _nca = fed.agent("nca");
    let id = "nca:DSAR-2026-0012";

    // The transfer the request concerns: one the NCA sent the ICO about an incident.
    let payload = fed.file("assessment.json", r#"{"summary": "phishing campaign"}"#);
    let sent = fed
        .cli(
            "nca",
            &[
                "send",
                "--to",
                "ico",
                "--kind",
                "threat_assessment",
                "--incident",
                "INC-77",
                "--payload",
                payload.to_str().unwrap(),
            ],
        )
        .ok();
    let transfer = transfer_id(&sent);
    // Preparing the consultation: the NCA's transfers with the ICO about that incident.
    let found = fed
        .cli(
            "nca",
            &[
                "dsar",
                "find",
                "--with",
                "ico",
                "--incident",
                "INC-77",
                "--json",
            ],
        )
        .json();
    let ids: Vec<&str> = found["transfers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["transfer_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [transfer.as_str()], "{found}");

    let opened = fed
        .cli(
            "nca",
            &[
                "dsar",
                "open",
                "--with",
                "ico",
                "--ref",
                "DSAR-2026-0012",
                "--concerns",
                &transfer,
                "--respond-by",
                &date(14),
            ],
        )
        .ok();
    assert!(
        opened.starts_with(&format!(
            "opened subject-access consultation {id} with ico\n"
        )),
        "{opened}"
    );
    assert!(
        opened.contains(&format!("{}T23:59:59Z", date(14))),
        "{opened}"
    );

    // Closing before the ICO answered is refused, and changes nothing.
    let early = fed
        .cli("nca", &["dsar", "close", "DSAR-2026-0012"])
        .refused();
    assert!(early.starts_with("refused: CONSULTATION_OPEN: "), "{early}");

    // The ICO's agent writes the request to its inbox with the step's fields.
    let delivered = inbox_files(ico.spool(), "the consultation in the ICO's inbox", |v| {
        v["workflow"]["step"] == "dsar_open"
    });
    let w = &delivered[0]["workflow"];
    assert_eq!(delivered[0]["sender"], "nca", "{}", delivered[0]);
    assert_eq!(delivered[0]["kind"], "dsar_consultation");
    assert_eq!(w["reference"], "DSAR-2026-0012", "{w}");
    assert_eq!(w["concerns"], serde_json::json!([transfer]), "{w}");
    assert_eq!(delivered[0]["payload"]["id"], id);

    // The ICO answers through its outbox, the kind left to the step.
    ico.spool()
        .drop_message(
            "answer.json",
            &serde_json::json!({
                "recipients": ["nca"],
                "payload": {"answer": "no objection"},
                "workflow": {"dsar_answer": {"consultation_id": id, "no_objection": true}},
            }),
        )
        .unwrap();
    moved(ico.spool(), "answer.json", "sent");

    let status = fed.cli("nca", &["dsar", "status", id, "--json"]).json();
    let c = &status[0];
    assert_eq!(c["consultation_id"], id, "{status}");
    assert_eq!(c["state"], "answered", "{status}");
    assert_eq!(c["may_close"], true, "{status}");
    assert_eq!(c["parties"][0]["agency"], "ico", "{status}");
    assert_eq!(c["parties"][0]["state"], "no_objection", "{status}");
    let text = fed.cli("ico", &["dsar", "status"]).ok();
    assert!(text.contains(&format!("{id}  answered")), "{text}");

    let closed = fed.cli("nca", &["dsar", "close", "DSAR-2026-0012"]).ok();
    assert!(
        closed.starts_with(&format!("closed consultation {id}; told ico\n")),
        "{closed}"
    );
    let all = fed
        .cli("nca", &["dsar", "status", "--all", "--json"])
        .json();
    assert_eq!(all[0]["state"], "closed", "{all}");
    // Closed a second time: it does not fit the state.
    let again = fed.cli("nca", &["dsar", "close", id]).refused();
    assert!(again.starts_with("refused: WORKFLOW_CONFLICT: "), "{again}");

    // The auditor reads the story from the broker's log.
    let story = fed
        .cli("auditor", &["audit", "explain", "--workflow", id])
        .ok();
    let summary = story.lines().next().unwrap();
    assert!(
        summary.starts_with(&format!("Subject-access consultation {id}: ")),
        "{story}"
    );
    for step in [
        "opened by nca with ico",
        "nca's dsar_close refused (CONSULTATION_OPEN)",
        "ico: no objection",
        "closed by nca",
    ] {
        assert!(summary.contains(step), "{step} missing from {summary}");
    }
    let opened_at = summary.find("opened by").unwrap();
    let closed_at = summary.rfind("closed by nca").unwrap();
    assert!(opened_at < closed_at, "{summary}");
    // The NCA tells the same story from an export of its own entries, offline.
    let export = fed.dir.path().join("nca.jsonl");
    fed.cli(
        "nca",
        &["audit", "export", "--out", export.to_str().unwrap()],
    )
    .ok();
    let offline = fed
        .cli(
            "nca",
            &[
                "audit",
                "explain",
                "--workflow",
                id,
                "--file",
                export.to_str().unwrap(),
            ],
        )
        .ok();
    assert_eq!(offline, story);
    let none = fed.cli(
        "nca",
        &[
            "audit",
            "explain",
            "--workflow",
            "nca:NO-SUCH",
            "--file",
            export.to_str().unwrap(),
        ],
    );
    assert_eq!(none.code, Some(1), "{none:?}");
    assert!(
        none.stderr
            .contains("no entry of the log belongs to workflow nca:NO-SUCH"),
        "{none:?}"
    );
}

#[test]
fn malformed_workflow_files_go_to_failed_with_their_reason() {
    let fed = Federation::start();
    let ico = fed.agent("ico");
    let rows = [
        (
            "two-answers.json",
            serde_json::json!({"recipients": ["nca"], "payload": {},
                "workflow": {"dsar_answer": {"consultation_id": "nca:D", "no_objection": true,
                    "objection": "x"}}}),
            "give exactly one of",
        ),
        (
            "bad-date.json",
            serde_json::json!({"recipients": ["ncsc"], "payload": {},
                "workflow": {"comms_propose": {"reference": "p", "publish_after": "soon"}}}),
            "workflow.comms_propose.publish_after",
        ),
        (
            "wrong-kind.json",
            serde_json::json!({"recipients": ["nca"], "payload": {}, "kind": "threat_assessment",
                "workflow": {"dsar_close": {"consultation_id": "ico:D"}}}),
            "must be dsar_consultation",
        ),
        (
            "involve-more.json",
            serde_json::json!({"incident_involvement": "INC-1", "recipients": ["nca"]}),
            "holds nothing else",
        ),
    ];
    for (name, file, _) in &rows {
        ico.spool().drop_message(name, file).unwrap();
    }
    for (name, _, expected) in &rows {
        moved(ico.spool(), name, "failed");
        let error = std::fs::read_to_string(
            ico.spool()
                .folder("failed")
                .join(format!("{name}.error.txt")),
        )
        .unwrap();
        assert!(error.contains(expected), "{name}: {error}");
    }
    // A well-formed step the broker refuses goes to refused/ with its reason.
    ico.spool()
        .drop_message(
            "unknown.json",
            &serde_json::json!({"recipients": ["nca"], "payload": {},
                "workflow": {"dsar_answer": {"consultation_id": "nca:NO-SUCH",
                    "no_objection": true}}}),
        )
        .unwrap();
    moved(ico.spool(), "unknown.json", "refused");
    let reason = ico
        .spool()
        .read_json("refused", "unknown.json.reason.json")
        .unwrap();
    assert_eq!(reason["reason"], "WORKFLOW_UNKNOWN", "{reason}");
}

#[test]
fn a_statement_may_be_published_once_approved_and_past_its_date() {
    let fed = Federation::start();
    let draft = fed.file(
        "statement.md",
        "# Joint statement\n\nWe are investigating.\n",
    );
    let draft = draft.to_str().unwrap();

    let proposed = fed
        .cli(
            "ico",
            &[
                "comms",
                "propose",
                "--to",
                "ncsc",
                "--file",
                draft,
                "--publish-after",
                &date(-1),
                "--ref",
                "press-1",
            ],
        )
        .ok();
    assert!(
        proposed.starts_with("proposed statement ico:press-1 to ncsc"),
        "{proposed}"
    );
    let pending = fed
        .cli("ico", &["comms", "status", "press-1", "--json"])
        .json();
    assert_eq!(pending[0]["state"], "pending", "{pending}");
    assert_eq!(pending[0]["may_publish"], false, "{pending}");

    fed.cli("ncsc", &["comms", "approve", "ico:press-1"]).ok();
    let approved = fed
        .cli("ico", &["comms", "status", "press-1", "--json"])
        .json();
    assert_eq!(approved[0]["state"], "approved", "{approved}");
    assert_eq!(approved[0]["may_publish"], true, "{approved}");
    assert_eq!(approved[0]["parties"][0]["agency"], "ncsc", "{approved}");
    assert_eq!(approved[0]["parties"][0]["state"], "approved", "{approved}");
    let text = fed.cli("ncsc", &["comms", "status"]).ok();
    assert!(
        text.contains("ico:press-1  approved  may be published"),
        "{text}"
    );

    // Approved but not yet due: not to be published; an objection holds it back too.
    fed.cli(
        "ico",
        &[
            "comms",
            "propose",
            "--to",
            "ncsc",
            "--file",
            draft,
            "--publish-after",
            &date(3),
            "--ref",
            "press-2",
        ],
    )
    .ok();
    fed.cli("ncsc", &["comms", "approve", "ico:press-2"]).ok();
    let early = fed
        .cli("ico", &["comms", "status", "press-2", "--json"])
        .json();
    assert_eq!(early[0]["state"], "approved", "{early}");
    assert_eq!(early[0]["may_publish"], false, "{early}");
    let objected = fed
        .cli(
            "ncsc",
            &[
                "comms",
                "object",
                "ico:press-1",
                "--reason",
                "names a victim",
            ],
        )
        .ok();
    assert!(objected.contains("objected: names a victim"), "{objected}");
    let held = fed
        .cli("ico", &["comms", "status", "press-1", "--json"])
        .json();
    assert_eq!(held[0]["state"], "objected", "{held}");
    assert_eq!(held[0]["may_publish"], false, "{held}");
    assert_eq!(
        held[0]["parties"][0]["objection"], "names a victim",
        "{held}"
    );

    // The broker reads drafts: one naming an organisation needs its consent.
    let naming = fed.file("naming.md", "# Statement\n\nAcme Ltd was attacked.\n");
    let refused = fed
        .cli(
            "ico",
            &[
                "comms",
                "propose",
                "--to",
                "ncsc",
                "--file",
                naming.to_str().unwrap(),
                "--publish-after",
                &date(1),
            ],
        )
        .refused();
    assert!(
        refused.starts_with("refused: ORGANISATION_IDENTIFIED: "),
        "{refused}"
    );

    // Only a party asked may answer.
    let stranger = fed.cli("nca", &["comms", "approve", "ico:press-1"]);
    assert_ne!(stranger.code, Some(0), "{stranger:?}");
}

#[test]
fn two_agencies_involved_in_one_incident_are_each_told_of_the_other() {
    let fed = Federation::start();
    let ico = fed.agent("ico");
    let nca = fed.agent("nca");

    let first = fed
        .cli("ico", &["incident", "involve", "INC-2026-0042", "--json"])
        .json();
    assert_eq!(first["incident_ref"], "ico:INC-2026-0042", "{first}");
    assert_eq!(first["notified"], serde_json::json!([]), "{first}");

    // The NCA declares the ICO's incident through its agent's outbox.
    nca.spool()
        .drop_message(
            "involve.json",
            &serde_json::json!({"incident_involvement": "ico:INC-2026-0042"}),
        )
        .unwrap();
    moved(nca.spool(), "involve.json", "sent");
    let answer = nca
        .spool()
        .read_json("sent", "involve.json.involvement.json")
        .unwrap();
    assert_eq!(answer["incident_ref"], "ico:INC-2026-0042", "{answer}");
    assert_eq!(answer["notified"], serde_json::json!(["ico"]), "{answer}");
    assert_eq!(answer["duplicate"], false, "{answer}");

    for (spool, other) in [(ico.spool(), "nca"), (nca.spool(), "ico")] {
        let notices = inbox_files(spool, "a coordination notice", |v| {
            v["type"] == "notice" && v["kind"] == "incident_coordination"
        });
        assert_eq!(notices.len(), 1, "{notices:?}");
        assert_eq!(notices[0]["subject"], "ico:INC-2026-0042", "{}", notices[0]);
        assert_eq!(
            notices[0]["agencies"],
            serde_json::json!([other]),
            "{}",
            notices[0]
        );
        assert!(
            spool
                .files("inbox")
                .unwrap()
                .iter()
                .any(|n| n.starts_with("notice.") && n.ends_with(".json")),
            "{:?}",
            spool.files("inbox")
        );
    }

    // Declared again: nothing changes, no new notice.
    let again = fed
        .cli("ico", &["incident", "involve", "INC-2026-0042"])
        .ok();
    assert!(again.starts_with("already declared involved"), "{again}");
}
