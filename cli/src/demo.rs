//! `concordat demo`: the whole system in one process on loopback.
//!
//! It starts the broker with the default federation (ICO, NCSC, NCA and their two MoUs) on
//! `127.0.0.1:0` with an in-memory PKI and fresh consent-desk keys, starts one agent per agency
//! over its own spool directory, and plays a short exchange by dropping files in outboxes:
//!
//! 1. an NCA threat assessment to the ICO;
//! 2. an anonymised ICO incident summary to the NCSC;
//! 3. an NCSC organisation-specific incident record, refused for lack of consent;
//! 4. the same record with a consent token from the NCSC consent desk, accepted;
//! 5. the NCSC consent desk revokes that token, and the ICO receives a recall notice;
//! 6. an ICO incident-specific record to the NCSC (a flow whose legal basis is national
//!    significance) is refused without a designation, then flows once two ICO officers have
//!    designated the incident of national significance and countersigned it;
//! 7. a subject-access consultation: the NCA consults the ICO about the threat assessment it
//!    sent in step 1, cannot close the consultation before the ICO answers, the ICO answers no
//!    objection, and the NCA closes it.
//!
//! It prints each decision and where each file landed, stops everything and exits.

use std::{
    collections::HashMap,
    io::Write,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use concordat_broker::{
    config::{Config, TlsMaterial},
    policy::{ConsentIssuer, Organisations},
};
use concordat_proto::{
    consent::RevocationTarget, envelope::Kind, paserk::SecretKey, significance::Officer,
};
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};

use crate::{
    operator::{self, ConsentRequest},
    pki::Ca,
};
use concordat_agent::{
    client::{ClientTls, Timeouts},
    daemon::{self, AgentEvent, AgentSettings},
    spool::atomic_write,
};

/// How long the demo waits for any one outcome before giving up.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

const AGENCIES: [&str; 3] = ["ico", "ncsc", "nca"];

struct Running {
    events: HashMap<&'static str, mpsc::UnboundedReceiver<AgentEvent>>,
    /// Each agency's connection settings (the revocation goes out with the NCSC's).
    tls: HashMap<&'static str, ClientTls>,
    root: PathBuf,
    /// The transfer id of the last file accepted.
    last_transfer: String,
}

impl Running {
    fn spool(&self, agency: &str) -> PathBuf {
        self.root.join(agency)
    }

    fn shown(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .display()
            .to_string()
    }

    /// Drops `json` as `name` in `agency`'s outbox the way an agency system should: write a
    /// temporary file, then rename.
    fn drop_file(&self, agency: &str, name: &str, json: &serde_json::Value) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(json)?;
        atomic_write(&self.spool(agency).join("outbox"), name, &bytes)
            .with_context(|| format!("writing {agency}/outbox/{name}"))
    }

    /// Waits for `agency`'s agent to report an event matching `pick`.
    async fn wait<T>(
        &mut self,
        agency: &'static str,
        mut pick: impl FnMut(AgentEvent) -> Option<T>,
    ) -> anyhow::Result<T> {
        let rx = self.events.get_mut(agency).context("no such agent")?;
        let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
        loop {
            let event = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .with_context(|| format!("timed out waiting for the {agency} agent"))?
                .with_context(|| format!("the {agency} agent stopped"))?;
            if let AgentEvent::Alarm { message } = &event {
                bail!("the {agency} agent raised an alarm about the audit log: {message}");
            }
            if let Some(found) = pick(event) {
                return Ok(found);
            }
        }
    }

    /// Waits until `agency`'s outbox file `file` was decided; prints the outcome.
    async fn decided(
        &mut self,
        out: &mut dyn Write,
        agency: &'static str,
        file: &str,
    ) -> anyhow::Result<Result<String, String>> {
        let event = self
            .wait(agency, |e| match &e {
                AgentEvent::Sent { file: f, .. }
                | AgentEvent::Refused { file: f, .. }
                | AgentEvent::Failed { file: f, .. }
                    if f == file =>
                {
                    Some(e)
                }
                _ => None,
            })
            .await?;
        match event {
            AgentEvent::Sent { path, receipt, .. } => {
                writeln!(out, "   accepted: transfer {}", receipt.transfer_id)?;
                self.last_transfer.clone_from(&receipt.transfer_id);
                for a in &receipt.authorities {
                    writeln!(
                        out,
                        "     to {} under agreement {}: {}",
                        a.recipient, a.agreement_id, a.clause
                    )?;
                }
                if !receipt.consent_jti.is_empty() {
                    writeln!(
                        out,
                        "     with consent {} from {}",
                        receipt.consent_jti, receipt.consent_issuer
                    )?;
                }
                for w in &receipt.warnings {
                    writeln!(out, "     warning: {w}")?;
                }
                writeln!(out, "   file: {} (receipt beside it)", self.shown(&path))?;
                Ok(Ok(receipt.message_id))
            }
            AgentEvent::Refused {
                path,
                reason,
                message,
                ..
            } => {
                writeln!(out, "   refused: {reason}: {message}")?;
                writeln!(out, "   file: {} (reason beside it)", self.shown(&path))?;
                Ok(Err(reason))
            }
            AgentEvent::Failed { path, error, .. } => {
                bail!(
                    "the demo's own file {} failed to parse: {error}",
                    self.shown(&path)
                )
            }
            AgentEvent::Delivered { .. }
            | AgentEvent::Alarm { .. }
            | AgentEvent::Involved { .. } => {
                bail!("unexpected event")
            }
        }
    }

    /// Drops `json` as `name` in `from`'s outbox, prints its acceptance, and waits until `to`
    /// has it in its inbox; returns the message id. `step` names the step in errors.
    async fn relay(
        &mut self,
        out: &mut dyn Write,
        (from, to): (&'static str, &'static str),
        name: &str,
        json: &serde_json::Value,
        step: &str,
    ) -> anyhow::Result<String> {
        self.drop_file(from, name, json)?;
        let id = self
            .decided(out, from, name)
            .await?
            .map_err(|reason| anyhow::anyhow!("{step} was refused: {reason}"))?;
        self.delivered(out, to, &format!("{from}.{id}.json"))
            .await?;
        Ok(id)
    }

    /// Waits until `agency` has an inbox file whose name starts with `prefix`; prints it.
    async fn delivered(
        &mut self,
        out: &mut dyn Write,
        agency: &'static str,
        name: &str,
    ) -> anyhow::Result<()> {
        let path = self
            .wait(agency, |e| match e {
                AgentEvent::Delivered { path, .. }
                    if path.file_name().is_some_and(|n| n == name) =>
                {
                    Some(path)
                }
                _ => None,
            })
            .await?;
        writeln!(out, "   delivered: {}", self.shown(&path))?;
        Ok(())
    }
}

/// Runs the demo in `root` (a fresh temporary directory when `None`, removed afterwards),
/// printing to `out`.
pub async fn run(root: Option<PathBuf>, out: &mut dyn Write) -> anyhow::Result<()> {
    let temp;
    let root = match root {
        Some(dir) => {
            if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() {
                bail!(
                    "{} is not empty; give a new or empty directory",
                    dir.display()
                );
            }
            std::fs::create_dir_all(&dir)?;
            dir
        }
        None => {
            temp = tempfile::tempdir().context("creating a temporary directory")?;
            temp.path().to_path_buf()
        }
    };

    // The PKI, in memory.
    let mut ca = Ca::generate("Concordat demo CA")?;
    let broker_cert = ca.issue_server(&["localhost", "127.0.0.1"], 1)?;
    let desks: HashMap<&str, SecretKey> = AGENCIES
        .iter()
        .map(|a| (*a, SecretKey::generate()))
        .collect();
    // Two ICO officers who may designate incidents of national significance.
    let officers = [
        ("ico-duty-director", SecretKey::generate()),
        ("ico-deputy-commissioner", SecretKey::generate()),
    ];

    // The broker: the default federation, with this run's PKI, keys and data directory.
    let mut config = Config::embedded_default()?;
    config.tls = TlsMaterial::from_pem(
        broker_cert.cert_pem.as_bytes(),
        broker_cert.key_pem.as_bytes(),
        ca.cert_pem().as_bytes(),
        None,
    )
    .map_err(|(which, problem)| anyhow::anyhow!("demo TLS {which}: {problem}"))?;
    config.data_dir = root.join("broker");
    config.metrics_listen = None;
    config.policy.issuers.clear();
    for (agency, key) in &desks {
        config.policy.issuers.insert(
            key.key_id(),
            ConsentIssuer {
                key: key.public(),
                agency: Some(agency.parse()?),
                organisations: Organisations::Any,
            },
        );
    }
    for (id, key) in &officers {
        config.policy.significance_officers.insert(
            key.key_id(),
            Officer {
                id: (*id).to_owned(),
                agency: "ico".parse()?,
                key: key.public(),
            },
        );
    }
    // The broker's log key is created here, before the broker starts, so the agents can be given
    // its verifier and check every receipt.
    std::fs::create_dir_all(&config.data_dir)?;
    let log_key =
        concordat_broker::audit_log::load_or_create_key(&config.data_dir, &config.log_origin)?
            .verifier();
    let today = OffsetDateTime::now_utc().date();
    let warnings = config.warnings(today);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop_broker, broker_stop) = tokio::sync::oneshot::channel::<()>();
    let broker = tokio::spawn(concordat_broker::serve(config, listener, async {
        let _ = broker_stop.await;
    }));

    // One agent per agency.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut agents = Vec::new();
    let mut events = HashMap::new();
    let mut tls = HashMap::new();
    for agency in AGENCIES {
        let cert = ca.issue_client(agency, 1)?;
        let client = ClientTls {
            brokers: format!("https://localhost:{}", addr.port()).into(),
            ca_pem: ca.cert_pem().into_bytes(),
            cert_pem: cert.cert_pem.into_bytes(),
            key_pem: cert.key_pem.into_bytes(),
            timeouts: Timeouts::default(),
        };
        tls.insert(agency, client.clone());
        concordat_agent::spool::Spool::open(&root.join(agency))?;
        let settings = AgentSettings {
            tls: client,
            spool: root.join(agency),
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
            window: 16,
            log_key: Some(log_key.clone()),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        events.insert(agency, rx);
        agents.push(tokio::spawn(daemon::run(
            settings,
            stop_rx.clone(),
            Some(tx),
        )));
    }
    let mut demo = Running {
        events,
        tls,
        root: root.clone(),
        last_transfer: String::new(),
    };

    writeln!(
        out,
        "Concordat demo: broker on {addr}, agents for ICO, NCSC and NCA"
    )?;
    writeln!(out, "spools under {}", root.display())?;
    for w in &warnings {
        writeln!(out, "note: {w}")?;
    }
    let outcome = script(&mut demo, out, &desks, &officers).await;

    let _ = stop_tx.send(true);
    for agent in agents {
        agent.await??;
    }
    let _ = stop_broker.send(());
    broker.await??;
    outcome?;
    writeln!(out, "done: broker and agents stopped")?;
    Ok(())
}

async fn script(
    demo: &mut Running,
    out: &mut dyn Write,
    desks: &HashMap<&str, SecretKey>,
    officers: &[(&str, SecretKey); 2],
) -> anyhow::Result<()> {
    writeln!(out, "\n1. NCA sends a threat assessment to the ICO")?;
    let assessment = demo
        .relay(
            out,
            ("nca", "ico"),
            "01-threat-assessment.json",
            &serde_json::json!({
            "recipients": ["ico"],
            "kind": "threat_assessment",
            "tlp": "amber",
            "content_type": "application/json",
            "payload": {"title": "Ransomware affiliates targeting UK education", "confidence": "high"},
        }),
            "step 1",
        )
        .await
        .map(|_| demo.last_transfer.clone())?;

    writeln!(
        out,
        "\n2. ICO sends an anonymised incident summary to the NCSC"
    )?;
    demo.relay(
        out,
        ("ico", "ncsc"),
        "02-incident-summary.json",
        &serde_json::json!({
            "recipients": ["ncsc"],
            "kind": "incident_record",
            "tlp": "green",
            "payload": {"period": "2026-Q3", "sector": "education", "reported_breaches": 41},
        }),
        "step 2",
    )
    .await?;

    writeln!(
        out,
        "\n3. NCSC sends an incident record naming an organisation, without its consent"
    )?;
    let record = serde_json::json!({"organisation": "acme-ltd", "incident": "INC-2026-0042", "summary": "credential stuffing against staff portal"});
    demo.drop_file(
        "ncsc",
        "03-incident-acme.json",
        &serde_json::json!({
            "recipients": ["ico"],
            "kind": "incident_record",
            "organisation": "acme-ltd",
            "incident_ref": "INC-2026-0042",
            "tlp": "amber+strict",
            "payload": record,
        }),
    )?;
    if demo
        .decided(out, "ncsc", "03-incident-acme.json")
        .await?
        .is_ok()
    {
        bail!("step 3 should have been refused");
    }

    writeln!(
        out,
        "\n4. The same record sent as anonymised, its organisation field removed: the broker reads the payload"
    )?;
    demo.drop_file(
        "ncsc",
        "04-incident-acme-anonymised.json",
        &serde_json::json!({
            "recipients": ["ico"],
            "kind": "incident_record",
            "incident_ref": "INC-2026-0042",
            "tlp": "amber+strict",
            "payload": record,
        }),
    )?;
    match demo
        .decided(out, "ncsc", "04-incident-acme-anonymised.json")
        .await?
    {
        Ok(_) => bail!("step 4 should have been refused"),
        Err(reason) if reason != "ORGANISATION_IDENTIFIED" => {
            bail!("step 4 should have been refused ORGANISATION_IDENTIFIED, not {reason}")
        }
        Err(_) => {}
    }

    writeln!(
        out,
        "\n5. The same record with a consent token from the NCSC consent desk"
    )?;
    let desk = desks.get("ncsc").context("no NCSC desk")?;
    let token = operator::issue_consent(
        desk,
        &ConsentRequest {
            organisation: "acme-ltd".parse()?,
            from: "ncsc".parse()?,
            to: vec!["ico".parse()?],
            kinds: vec![Kind::IncidentRecord],
            purpose: "Acme Ltd agrees the NCSC may share this incident with the ICO".into(),
            incidents: vec!["INC-2026-0042".into()],
            payload: None,
            valid_for: Duration::from_secs(7 * 24 * 3600),
            max_uses: Some(1),
        },
        OffsetDateTime::now_utc(),
    )?;
    let claims = concordat_proto::consent::verify(&token, &desk.public())?;
    writeln!(
        out,
        "   consent token {} issued by {}",
        claims.jti(),
        claims.iss()
    )?;
    let id = demo
        .relay(
            out,
            ("ncsc", "ico"),
            "05-incident-acme-consented.json",
            &serde_json::json!({
                "recipients": ["ico"],
                "kind": "incident_record",
                "organisation": "acme-ltd",
                "incident_ref": "INC-2026-0042",
                "tlp": "amber+strict",
                "payload": record,
                "consent_token": token,
            }),
            "step 5",
        )
        .await?;

    writeln!(
        out,
        "\n6. Acme Ltd withdraws consent: the NCSC consent desk revokes the token"
    )?;
    let statement = operator::revocation(
        desk,
        RevocationTarget::Token(claims.jti()),
        OffsetDateTime::now_utc(),
    )?;
    let ncsc = demo.tls.get("ncsc").context("no NCSC settings")?;
    let response = operator::send_revocation(ncsc, statement).await?;
    writeln!(
        out,
        "   revoked; {} recall notice(s) queued",
        response.recall_notices
    )?;
    demo.delivered(out, "ico", &format!("ncsc.{id}.recall.json"))
        .await?;

    national_significance(demo, out, desks, officers).await?;
    consultation(demo, out, &assessment).await
}

/// Step 8: the NCA consults the ICO before answering a subject-access request that concerns the
/// threat assessment (transfer `concerns`) it sent the ICO; the consultation can be closed
/// only once the ICO has answered.
async fn consultation(
    demo: &mut Running,
    out: &mut dyn Write,
    concerns: &str,
) -> anyhow::Result<()> {
    const REFERENCE: &str = "DSAR-2026-0012";
    let id = format!("nca:{REFERENCE}");
    writeln!(
        out,
        "\n8. A person asks the NCA for their data; before answering, the NCA consults the ICO, which received it in step 1"
    )?;
    let step = |step: serde_json::Value| {
        serde_json::json!({
            "recipients": [if step.get("dsar_answer").is_some() { "nca" } else { "ico" }],
            "payload": {"note": "Subject-access consultation under the ICO-NCA MoU", "id": id},
            "workflow": step,
        })
    };
    demo.relay(
        out,
        ("nca", "ico"),
        "08-dsar-open.json",
        &step(serde_json::json!({"dsar_open": {"reference": REFERENCE, "concerns": [concerns]}})),
        "step 8 (open)",
    )
    .await?;
    consultation_status(demo, out, &id).await?;

    writeln!(
        out,
        "\n   the NCA tries to close it before the ICO has answered"
    )?;
    let close = step(serde_json::json!({"dsar_close": {"consultation_id": id}}));
    demo.drop_file("nca", "08-dsar-close-early.json", &close)?;
    match demo.decided(out, "nca", "08-dsar-close-early.json").await? {
        Err(reason) if reason == "CONSULTATION_OPEN" => {}
        other => {
            bail!("closing before the answer should have been refused CONSULTATION_OPEN: {other:?}")
        }
    }

    writeln!(out, "\n   the ICO answers: no objection")?;
    demo.relay(
        out,
        ("ico", "nca"),
        "08-dsar-answer.json",
        &step(serde_json::json!({"dsar_answer": {"consultation_id": id, "no_objection": true}})),
        "step 8 (answer)",
    )
    .await?;
    consultation_status(demo, out, &id).await?;

    writeln!(
        out,
        "\n   the NCA closes the consultation and can answer the request"
    )?;
    demo.relay(
        out,
        ("nca", "ico"),
        "08-dsar-close.json",
        &close,
        "step 8 (close)",
    )
    .await?;
    consultation_status(demo, out, &id).await
}

/// Prints consultation `id` as the broker tracks it (`concordat dsar status`).
async fn consultation_status(demo: &Running, out: &mut dyn Write, id: &str) -> anyhow::Result<()> {
    let nca = demo.tls.get("nca").context("no NCA settings")?;
    let list = crate::workflows::dsar_status(nca, Some(id), true)
        .await?
        .map_err(|r| anyhow::anyhow!("consultation status: {}", r.text.trim()))?;
    for c in list {
        write!(out, "   consultation {}: {}", c.consultation_id, c.state)?;
        if c.may_close && c.state != "closed" {
            write!(out, " (may be closed)")?;
        }
        writeln!(out)?;
        for p in &c.parties {
            writeln!(
                out,
                "     {}: {}, due {}",
                p.agency,
                p.state,
                p.due.as_deref().unwrap_or("-")
            )?;
        }
    }
    Ok(())
}

/// Step 6: an incident-specific record flows from the ICO to the NCSC only once two different
/// ICO officers have designated the incident of national significance.
async fn national_significance(
    demo: &mut Running,
    out: &mut dyn Write,
    desks: &HashMap<&str, SecretKey>,
    [(first_id, first), (second_id, second)]: &[(&str, SecretKey); 2],
) -> anyhow::Result<()> {
    const REFERENCE: &str = "ICO-2026-0077";
    writeln!(
        out,
        "\n7. ICO sends an incident-specific record to the NCSC (consent given, no designation)"
    )?;
    let desk = desks.get("ico").context("no ICO desk")?;
    let token = operator::issue_consent(
        desk,
        &ConsentRequest {
            organisation: "acme-ltd".parse()?,
            from: "ico".parse()?,
            to: vec!["ncsc".parse()?],
            kinds: vec![Kind::IncidentRecord],
            purpose: "Acme Ltd agrees the ICO may share this incident with the NCSC".into(),
            incidents: vec![REFERENCE.into()],
            payload: None,
            valid_for: Duration::from_secs(7 * 24 * 3600),
            max_uses: None,
        },
        OffsetDateTime::now_utc(),
    )?;
    let record = serde_json::json!({
        "incident": {
            "reference": REFERENCE,
            "first_seen": "2026-11-30T09:15:00Z",
            "categories": ["ransomware"],
            "sectors": ["health"],
            "summary": "Ransomware at a supplier of appointment systems to NHS trusts nationwide."
        },
        "granularity": "incident_specific",
        "organisations": ["acme-ltd"],
    });
    let message = |designation: Option<&str>| {
        let mut m = serde_json::json!({
            "recipients": ["ncsc"],
            "kind": "incident_record",
            "organisation": "acme-ltd",
            "incident_ref": REFERENCE,
            "content_type": "application/vnd.concordat.incident+json;version=1",
            "tlp": "amber",
            "payload": record,
            "consent_token": token,
        });
        if let (Some(d), Some(map)) = (designation, m.as_object_mut()) {
            map.insert("designation_file".into(), d.into());
        }
        m
    };
    demo.drop_file("ico", "07-incident-specific.json", &message(None))?;
    if demo
        .decided(out, "ico", "07-incident-specific.json")
        .await?
        .is_ok()
    {
        bail!("step 7 without a designation should have been refused");
    }

    writeln!(
        out,
        "\n   {first_id} designates {REFERENCE} of national significance; {second_id} countersigns"
    )?;
    let now = OffsetDateTime::now_utc();
    let (half, _) = operator::designate(
        first,
        &operator::DesignationRequest {
            agency: "ico".parse()?,
            incident: REFERENCE.into(),
            to: vec!["ncsc".parse()?],
            grounds: "Disruption to NHS appointment systems across England".into(),
            valid_for: Duration::from_secs(3 * 24 * 3600),
        },
        now,
    )?;
    let (file, claims) = operator::countersign_designation(&half, second, now)?;
    let designations = demo.spool("ico").join("designations");
    std::fs::create_dir_all(&designations)?;
    atomic_write(&designations, "ico-2026-0077.designation", file.as_bytes())?;
    writeln!(
        out,
        "   designation {} (two officers), valid until {}",
        claims.jti(),
        concordat_broker::policy::rfc3339(claims.expires_at())
    )?;
    demo.relay(
        out,
        ("ico", "ncsc"),
        "07-incident-specific-designated.json",
        &message(Some("designations/ico-2026-0077.designation")),
        "step 7",
    )
    .await?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    /// The demo plays to the end, national significance included: the incident-specific
    /// record is refused without a designation and delivered with one.
    #[tokio::test]
    async fn the_demo_plays_every_step() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut out = Vec::new();
        super::run(None, &mut out).await.unwrap();
        let out = String::from_utf8(out).unwrap();
        for expected in [
            "refused: CONSENT_MISSING",
            "refused: ORGANISATION_IDENTIFIED",
            "1 recall notice(s) queued",
            "refused: NATIONAL_SIGNIFICANCE_REQUIRED",
            "ico-deputy-commissioner countersigns",
            "file: ico/sent/07-incident-specific-designated.json",
            "refused: CONSULTATION_OPEN",
            "consultation nca:DSAR-2026-0012: answered (may be closed)",
            "ico: no_objection",
            "consultation nca:DSAR-2026-0012: closed",
            "file: nca/sent/08-dsar-close.json",
            "done: broker and agents stopped",
        ] {
            assert!(out.contains(expected), "{expected:?} missing from:\n{out}");
        }
    }
}
