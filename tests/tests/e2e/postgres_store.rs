//! Brokers on the PostgreSQL engine (`[storage] engine = "postgres"`, docs/deployment.md),
//! against a real primary with a synchronous standby, two broker nodes sharing one database
//! and two agents. One node killed with SIGKILL under load; one killed and restarted, then both
//! left running while the database fails over to its standby: nothing is lost or duplicated,
//! and the audit log stays one history that verifies offline from either node; when the old
//! primary comes back stale, a node that reaches it refuses to serve.

use std::{collections::BTreeMap, fs, io::Write as _};

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use concordat_broker::{
    audit_log::{self, DEFAULT_ORIGIN},
    refusal::reason_of,
};
use concordat_cli::audit_file::{self, Format};
use concordat_proto::{
    audit, checkpoint,
    ids::MessageId,
    pb::{self, audit_entry::Event},
};
use concordat_tests::{
    binary,
    postgres::PgCluster,
    process::{AgentProcess, BrokerProcess, POLL_INTERVAL, wait_for},
};
use serde_json::Value;

use crate::{
    failover::{Nodes, OUTCOME_TIMEOUT, assert_all_delivered_once, drop_messages, refused_port},
    relay::logs,
};

/// `concordat-broker check-config` on the configuration: its output.
fn check_config(config: &std::path::Path) -> String {
    let out = std::process::Command::new(binary("concordat-broker").unwrap())
        .arg("check-config")
        .arg(config)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

/// Waits until at least `n` of the NCA's files have been sent.
fn wait_sent(n: usize, broker: &BrokerProcess, nca: &AgentProcess, ico: &AgentProcess) {
    wait_for("files sent", OUTCOME_TIMEOUT, || {
        match nca.spool().count_moved("sent") {
            sent if sent >= n => Ok(()),
            sent => Err(format!("{sent} of {n} sent")),
        }
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(broker, &[nca, ico])));
}

/// Appends `[storage]` on PostgreSQL at `url` to the federation's configuration; for a
/// cluster, both its servers (`multi_host_url`), so that a broker finds the primary again
/// after a failover.
fn use_postgres(nodes: &Nodes, url: &str) {
    let mut config = fs::OpenOptions::new()
        .append(true)
        .open(&nodes.config)
        .unwrap();
    writeln!(
        config,
        "\n[storage]\nengine = \"postgres\"\nurl = \"{url}\""
    )
    .unwrap();
}

/// Node B, added as docs/deployment.md says: a data directory of its own holding the log key
/// and a copy of the first node's published checkpoint (the floor below which B refuses a
/// database: a stale primary), and a configuration of its own (its log sits beside it).
/// Returns its configuration and data directory.
fn add_node(nodes: &Nodes) -> (std::path::PathBuf, std::path::PathBuf) {
    let home = nodes.dir.path().join("node-b");
    let data = home.join("data");
    fs::create_dir_all(&data).unwrap();
    for file in [
        audit_log::LOG_KEY_FILE,
        audit_log::PUBLISHED_CHECKPOINT_FILE,
    ] {
        fs::copy(nodes.data_dir.join(file), data.join(file)).unwrap();
    }
    let config = home.join("broker.toml");
    fs::copy(&nodes.config, &config).unwrap();
    (config, data)
}

/// The whole log, exported by the auditor from `node`, verifies offline against the log key,
/// has no gap, and holds exactly one acceptance for each of `total` messages; returns its size.
/// A node's export covers what the database held when it was asked unless the node could not
/// sign that much in time (`a_node_answers_the_auditor_with_what_another_node_acknowledged_before`
/// tests that it can): the export is taken again until it holds `total` acceptances and at
/// least `at_least` entries, for at most `OUTCOME_TIMEOUT`, so that a node slow to recover
/// from a failover on a loaded machine is not taken for a wrong one.
fn assert_log_verifies(nodes: &Nodes, node: &BrokerProcess, total: usize, at_least: u64) -> u64 {
    let key = audit_log::load_key(&nodes.data_dir, DEFAULT_ORIGIN)
        .unwrap()
        .verifier();
    let path = nodes.dir.path().join("audit.jsonl");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let deadline = std::time::Instant::now() + OUTCOME_TIMEOUT;
    loop {
        let summary = rt.block_on(async {
            let auditor = nodes.pki.client(node.addr(), "auditor").unwrap();
            let client = auditor.connect().await.unwrap();
            audit_file::export(&client, pb::ExportRequest::default(), &path, Format::Jsonl)
                .await
                .unwrap()
        });
        let verified = audit_file::verify(&path, &key)
            .unwrap()
            .unwrap_or_else(|e| panic!("the export does not verify: {e}"));
        assert!(!verified.partial);
        assert_eq!(verified.entries, summary.tree_size);
        let text = fs::read_to_string(&path).unwrap();
        let mut accepted: BTreeMap<String, usize> = BTreeMap::new();
        for (index, line) in text.lines().skip(1).enumerate() {
            let record: Value = serde_json::from_str(line).unwrap();
            assert_eq!(record["index"].as_u64(), Some(index as u64), "a gap");
            let bytes = B64.decode(record["entry"].as_str().unwrap()).unwrap();
            if let Some(Event::TransferAccepted(t)) = audit::decode(&bytes).unwrap().event {
                *accepted
                    .entry(t.envelope.unwrap_or_default().message_id)
                    .or_default() += 1;
            }
        }
        assert!(
            accepted.values().all(|n| *n == 1),
            "a message accepted twice: {accepted:?}"
        );
        if accepted.len() == total && summary.tree_size >= at_least {
            return summary.tree_size;
        }
        assert!(
            accepted.len() <= total,
            "{} messages accepted, {total} sent",
            accepted.len()
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the node at {} exports {} entries with {} of the {total} acceptances; another node's log held {at_least} before:\n{}",
            node.addr(),
            summary.tree_size,
            accepted.len(),
            node.log_tail(40)
        );
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Two broker nodes on one database, serving at once (docs/deployment.md): the NCA's agent
/// sends through node A and the ICO's receives from node B, so every delivery crosses nodes.
/// B holds the ICO's deliveries while its subscriptions there are open, and A refuses to serve
/// them too. Node A is killed with SIGKILL under load and the NCA's agent moves to B. Every
/// acknowledged transfer reaches the ICO's inbox exactly once, and the log, exported from B,
/// has no gap, one acceptance per message, and verifies against the key the nodes share.
#[test]
fn two_broker_nodes_share_one_database_and_lose_nothing_when_one_is_killed() {
    const ROUND: usize = 40;
    let pg_dir = tempfile::tempdir().unwrap();
    let cluster = PgCluster::start(pg_dir.path()).unwrap_or_else(|e| panic!("{e:#}"));
    let nodes = Nodes::new();
    use_postgres(&nodes, &cluster.multi_host_url());
    let mut a = BrokerProcess::start(&nodes.config, &nodes.data_dir).unwrap();
    let (b_config, b_data) = add_node(&nodes);
    let b = BrokerProcess::start(&b_config, &b_data).unwrap();
    let nca = nodes.agent("nca", &[a.addr(), b.addr()]);
    let ico = nodes.agent("ico", &[b.addr(), a.addr()]);

    // Sent through A, delivered from B.
    drop_messages(&nca, 0, ROUND);
    assert_all_delivered_once(ROUND, &nca, &ico, "sent through A, received from B");
    // B serves the ICO's deliveries while its agent's subscription there is open: A refuses
    // to deliver them too, and says where they are.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        let client = nodes.pki.client(a.addr(), "ico").unwrap();
        let client = client.connect().await.unwrap();
        client
            .exchange()
            .subscribe(pb::SubscribeRequest { window: 1 })
            .await
            .expect_err("a second node delivering the ICO's items")
    });
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(
        reason_of(&status).as_deref(),
        Some("DELIVERIES_ON_ANOTHER_NODE")
    );

    // A dies under load; the NCA's agent moves to B.
    drop_messages(&nca, ROUND, 2 * ROUND);
    wait_sent(ROUND + ROUND / 4, &a, &nca, &ico);
    a.kill().unwrap();
    drop_messages(&nca, 3 * ROUND, ROUND);
    assert_all_delivered_once(4 * ROUND, &nca, &ico, "after node A was killed");
    let moved_to = format!("https://localhost:{}", b.addr().port());
    assert!(
        nca.log_text()
            .lines()
            .any(|l| l.contains("connected to broker node") && l.contains(&moved_to)),
        "the NCA's agent logs its move to node B:\n{}",
        nca.log_tail(30)
    );
    assert_log_verifies(&nodes, &b, 4 * ROUND, 0);
}

/// A broker whose database cannot be reached at start ends with an error that says so and
/// names the server it tried, before it says it listens; it used to panic instead (the
/// PostgreSQL engine's runtime dropped inside the broker's).
#[test]
fn a_broker_that_cannot_reach_its_database_says_so_at_start() {
    let nodes = Nodes::new();
    let port = refused_port().port();
    use_postgres(
        &nodes,
        &format!("postgres://postgres@127.0.0.1:{port}/concordat"),
    );
    let Err(e) = BrokerProcess::start(&nodes.config, &nodes.data_dir) else {
        panic!("a broker served without its database");
    };
    let e = format!("{e:#}");
    assert!(!e.contains("panicked"), "{e}");
    assert!(
        e.contains(&format!(
            "error: opening the database: PostgreSQL: connecting to 127.0.0.1:{port}: "
        )),
        "the error names the database and the server it tried: {e}"
    );
}

/// The size of the tree a checkpoint note signed with the nodes' key names.
fn checkpoint_size(nodes: &Nodes, note: &str) -> u64 {
    let key = audit_log::load_key(&nodes.data_dir, DEFAULT_ORIGIN)
        .unwrap()
        .verifier();
    checkpoint::open(note, &key)
        .unwrap_or_else(|e| panic!("{e}: {note}"))
        .size()
}

/// A node answers the auditor with everything the database held when it was asked: what
/// another node acknowledged a moment before is in the checkpoint and the export it gives,
/// though it may not have heard of that commit yet (before, it answered with the log it had
/// last caught up with; after a database failover, whose listener takes a while to connect
/// again, that was seconds behind).
#[test]
fn a_node_answers_the_auditor_with_what_another_node_acknowledged_before() {
    let pg_dir = tempfile::tempdir().unwrap();
    let cluster = PgCluster::start(pg_dir.path()).unwrap_or_else(|e| panic!("{e:#}"));
    let nodes = Nodes::new();
    use_postgres(&nodes, &cluster.multi_host_url());
    let a = BrokerProcess::start(&nodes.config, &nodes.data_dir).unwrap();
    let (b_config, b_data) = add_node(&nodes);
    let b = BrokerProcess::start(&b_config, &b_data).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let nca = nodes.pki.client(b.addr(), "nca").unwrap();
        let nca = nca.connect().await.unwrap();
        let auditor = nodes.pki.client(a.addr(), "auditor").unwrap();
        let auditor = auditor.connect().await.unwrap();
        for round in 0..10 {
            let envelope = pb::Envelope {
                message_id: MessageId::new_random().to_string(),
                recipients: vec!["ico".into()],
                kind: pb::MessageKind::ThreatAssessment as i32,
                content_type: "application/json".into(),
                tlp: pb::Tlp::Green as i32,
                payload: br#"{"summary":"seen by every node"}"#.to_vec(),
                ..Default::default()
            };
            let receipt = nca.exchange().send(envelope).await.unwrap().into_inner();
            let index = receipt.audit.unwrap_or_default().log_index;
            // Taking turns: a witness's question, then an export's first item.
            let note = if round % 2 == 0 {
                let mut audit = auditor.audit();
                let answer = audit.checkpoint(pb::CheckpointRequest::default()).await;
                answer.unwrap().into_inner().checkpoint
            } else {
                let mut audit = auditor.audit();
                let export = audit.export(pb::ExportRequest::default()).await;
                let mut stream = export.unwrap().into_inner();
                match stream.message().await.unwrap().and_then(|i| i.item) {
                    Some(pb::export_item::Item::Checkpoint(note)) => note,
                    other => panic!("an export begins with its checkpoint, not {other:?}"),
                }
            };
            let size = checkpoint_size(&nodes, &note);
            assert!(
                size > index,
                "round {round}: node B acknowledged entry {index}, node A answers with a tree of {size}"
            );
        }
    });
}

/// Two broker nodes on one database through a node crash and a database failover: node A is
/// killed with SIGKILL under load and started again; then the primary is killed under load and
/// the standby promoted, and both nodes carry on without a restart, finding the new primary
/// themselves. Nothing is lost or duplicated, and the log exported from either node is the
/// same one history that verifies offline. When the old primary comes back stale, neither
/// node, started again, serves from it.
#[test]
fn two_broker_nodes_lose_nothing_across_a_node_crash_and_a_database_failover() {
    const ROUND: usize = 40;
    let pg_dir = tempfile::tempdir().unwrap();
    let mut cluster = PgCluster::start(pg_dir.path()).unwrap_or_else(|e| panic!("{e:#}"));
    let nodes = Nodes::new();
    use_postgres(&nodes, &cluster.multi_host_url());
    // The cluster is set up for durability: check-config finds nothing to warn about.
    let checked = check_config(&nodes.config);
    assert!(
        checked.contains("store:         PostgreSQL at 127.0.0.1:"),
        "{checked}"
    );
    assert!(!checked.contains("warning: PostgreSQL"), "{checked}");
    let mut a = BrokerProcess::start(&nodes.config, &nodes.data_dir).unwrap();
    let a_addr = a.addr();
    let (b_config, b_data) = add_node(&nodes);
    let b = BrokerProcess::start(&b_config, &b_data).unwrap();
    // Both agents witness the log (docs/audit-log.md §3) across nodes, a crash and a
    // failover: a node's checkpoint behind one the agent saw from another node must not
    // read as a log that no longer extends it (an alarm, and the agent stops sending).
    let nca = nodes.witnessing_agent("nca", &[a_addr, b.addr()]);
    let ico = nodes.witnessing_agent("ico", &[b.addr(), a_addr]);

    // 1. Node A is killed mid-run and started again on the same address.
    drop_messages(&nca, 0, ROUND);
    wait_sent(ROUND / 4, &a, &nca, &ico);
    a.kill().unwrap();
    let a = BrokerProcess::start_on(&nodes.config, &nodes.data_dir, a_addr).unwrap();
    drop_messages(&nca, ROUND, ROUND);
    wait_sent(ROUND + ROUND / 4, &a, &nca, &ico);

    // 2. The primary dies under load and the standby is promoted, as a failover manager
    //    would; both nodes keep running and find the new primary themselves.
    cluster.kill_primary().unwrap();
    cluster.promote_standby().unwrap();
    drop_messages(&nca, 2 * ROUND, ROUND);
    // The promoted standby commits alone now: check-config says what that risks.
    let checked = check_config(&nodes.config);
    assert!(
        checked.contains("warning: PostgreSQL: synchronous_standby_names is empty"),
        "{checked}"
    );
    assert_all_delivered_once(
        3 * ROUND,
        &nca,
        &ico,
        "across a node crash and a database failover",
    );

    // Both witnesses kept a checkpoint (and raised no alarm: they went on sending and
    // storing).
    for agency in ["nca", "ico"] {
        let kept = nodes
            .dir
            .path()
            .join(agency)
            .join(".state")
            .join("checkpoint");
        assert!(kept.exists(), "{agency}'s witness kept no checkpoint");
    }

    // 3. The whole log, exported by the auditor from each node, verifies offline against
    //    the nodes' key and holds each message's acceptance once.
    //    B's covers A's, and A's own record of that export, which A logged before its end.
    let size = assert_log_verifies(&nodes, &a, 3 * ROUND, 0);
    assert_log_verifies(&nodes, &b, 3 * ROUND, size + 1);

    // 4. The old primary comes back, stale: it never saw the promotion and lacks what was
    //    committed since. Either node started now reaches it first (the URL lists it first)
    //    and refuses to serve: the log it finds is behind the checkpoint it published.
    drop((a, b));
    cluster.restart_old_primary().unwrap();
    for (node, config, data) in [
        ("A", &nodes.config, &nodes.data_dir),
        ("B", &b_config, &b_data),
    ] {
        let Err(e) = BrokerProcess::start(config, data) else {
            panic!("node {node} served from the stale primary");
        };
        let e = format!("{e:#}");
        assert!(
            e.contains("acknowledged history was lost"),
            "node {node}: {e}"
        );
    }
}
