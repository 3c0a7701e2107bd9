//! Clients of several broker nodes (docs/deployment.md): agents and the CLI list every node,
//! use the first that connects, and move to another when theirs goes away, losing and
//! duplicating nothing.
//!
//! Two sled-backed brokers cannot share a store, so "another node" here is a second broker
//! process started on another port over the same data directory once the first is killed:
//! from the clients' side that is exactly a node dying and its peer serving the same store.

use std::{
    collections::BTreeSet,
    net::{SocketAddr, TcpListener},
    process::Command,
    time::Duration,
};

use concordat_broker::config::Limits;
use concordat_tests::{
    binary,
    process::{AgentProcess, BrokerProcess, PkiFiles, wait_for, write_broker_files},
};
use tempfile::TempDir;

use crate::relay::{inbox_ids, logs, message, receipts};

/// How long an ordinary outcome (files sent, deliveries stored) may take.
pub(crate) const OUTCOME_TIMEOUT: Duration = Duration::from_secs(90);

/// Reconnecting quickly, and a short connect timeout so that a node that never answers costs
/// the agent little.
const AGENT_SETTINGS: &str = "[reconnect]\nmin_backoff_ms = 50\nmax_backoff_ms = 1000\n\
[timeouts]\nconnect_ms = 2000\n";

/// A port nothing listens on: connections to it are refused.
pub(crate) fn refused_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The PKI and broker configuration of a federation, in a temporary directory.
pub(crate) struct Nodes {
    pub(crate) dir: TempDir,
    pub(crate) pki: PkiFiles,
    pub(crate) config: std::path::PathBuf,
    pub(crate) data_dir: std::path::PathBuf,
}

impl Nodes {
    pub(crate) fn new() -> Nodes {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let (pki, config) = write_broker_files(
            dir.path(),
            &["ico", "ncsc", "nca", "auditor"],
            &data_dir,
            &Limits::default(),
        )
        .unwrap();
        Nodes {
            dir,
            pki,
            config,
            data_dir,
        }
    }

    /// The agent of `agency`, listing `brokers` in this order.
    pub(crate) fn agent(&self, agency: &str, brokers: &[SocketAddr]) -> AgentProcess {
        AgentProcess::start_nodes(
            &self.dir.path().join(agency),
            agency,
            brokers,
            &self.pki,
            AGENT_SETTINGS,
        )
        .unwrap()
    }

    /// The agent of `agency`, listing `brokers` in this order, with the log key
    /// (`log_key`): its witness checks every receipt's and delivery's proof and that each
    /// checkpoint extends the last it saw, whichever node signed it, and stops sending on an
    /// alarm. The log key is read from the first node's data directory (`concordat-broker
    /// log-key`), so that node must have started once.
    pub(crate) fn witnessing_agent(&self, agency: &str, brokers: &[SocketAddr]) -> AgentProcess {
        let key = concordat_tests::log_key(&self.config, &self.data_dir).unwrap();
        AgentProcess::start_nodes(
            &self.dir.path().join(agency),
            agency,
            brokers,
            &self.pki,
            &format!("log_key = \"{key}\"\n{AGENT_SETTINGS}"),
        )
        .unwrap()
    }

    /// `concordat status` as the NCA, given these `--broker` URLs; exit success and output.
    fn status(&self, brokers: &[SocketAddr]) -> (bool, String) {
        let mut command = Command::new(binary("concordat").unwrap());
        command.arg("status");
        for b in brokers {
            command
                .arg("--broker")
                .arg(format!("https://localhost:{}", b.port()));
        }
        let out = command
            .arg("--ca")
            .arg(self.pki.ca())
            .arg("--cert")
            .arg(self.pki.cert("nca"))
            .arg("--key")
            .arg(self.pki.key("nca"))
            .args(["--timeout", "3s"])
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

/// Drops `count` messages for the ICO, numbered from `first`, in the NCA's outbox.
pub(crate) fn drop_messages(nca: &AgentProcess, first: usize, count: usize) {
    for seq in first..first + count {
        nca.spool()
            .drop_message(&format!("m{seq:03}.json"), &message("ico", seq))
            .unwrap();
    }
}

/// Every file of the NCA's is in `sent/` with a receipt, and the ICO's inbox holds exactly
/// those messages, each once.
pub(crate) fn assert_all_delivered_once(
    total: usize,
    nca: &AgentProcess,
    ico: &AgentProcess,
    why: &str,
) {
    let (outbox, inbox) = (nca.spool(), ico.spool());
    wait_for("every file sent", OUTCOME_TIMEOUT, || {
        match outbox.count_moved("sent") {
            n if n == total => Ok(()),
            n => Err(format!("{n} of {total} sent")),
        }
    })
    .unwrap_or_else(|e| panic!("{why}: {e:#}\n{}{}", nca.log_tail(30), ico.log_tail(30)));
    let sent: BTreeSet<String> = receipts(outbox)
        .into_values()
        .map(|r| r.message_id)
        .collect();
    assert_eq!(sent.len(), total, "{why}: one receipt per file");
    wait_for(
        "every message delivered",
        OUTCOME_TIMEOUT,
        || match inbox_ids(inbox).len() {
            n if n == total => Ok(()),
            n => Err(format!("{n} of {total} delivered")),
        },
    )
    .unwrap_or_else(|e| panic!("{why}: {e:#}\n{}{}", nca.log_tail(30), ico.log_tail(30)));
    assert_eq!(
        inbox_ids(inbox),
        sent,
        "{why}: the inbox holds what was sent"
    );
    let messages = inbox
        .files("inbox")
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with("nca."))
        .count();
    assert_eq!(messages, total, "{why}: each message once");
}

/// An agent whose first broker URL refuses connections, and the CLI given a node that
/// refuses and one that never answers, use the node that does.
#[test]
fn agents_and_the_cli_use_the_first_broker_node_that_answers() {
    let nodes = Nodes::new();
    let broker = BrokerProcess::start(&nodes.config, &nodes.data_dir).unwrap();
    let dead = refused_port();
    let nca = nodes.agent("nca", &[dead, broker.addr()]);
    let ico = nodes.agent("ico", &[dead, broker.addr()]);
    drop_messages(&nca, 0, 10);
    assert_all_delivered_once(10, &nca, &ico, "first node refusing");
    let live = format!("https://localhost:{}", broker.addr().port());
    for agent in [&nca, &ico] {
        let log = agent.log_text();
        assert!(
            log.lines()
                .any(|l| l.contains("connected to broker node") && l.contains(&live)),
            "the agent logs the node it connected to:\n{}",
            agent.log_tail(20)
        );
    }

    // A node that accepts TCP connections and never answers: the CLI gives up on it within
    // its timeout and moves on.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let (ok, out) = nodes.status(&[silent.local_addr().unwrap(), dead, broker.addr()]);
    assert!(ok, "the CLI reaches the third node:\n{out}");
    // With no node answering, it says so, naming each.
    let (ok, out) = nodes.status(&[silent.local_addr().unwrap(), dead]);
    assert!(!ok, "no node answers:\n{out}");
    assert!(
        out.contains("no broker node could be reached")
            && out.contains(&format!("localhost:{}", dead.port())),
        "the error names every node tried:\n{out}"
    );
}

/// Agents on node A move to node B when A is killed with SIGKILL mid-run: every file sent
/// has its receipt, and the recipient's inbox holds each message exactly once.
#[test]
fn agents_move_to_another_node_when_theirs_is_killed() {
    const BEFORE: usize = 60;
    const AFTER: usize = 40;
    let nodes = Nodes::new();
    let mut a = BrokerProcess::start(&nodes.config, &nodes.data_dir).unwrap();
    let b_addr = refused_port();
    let nca = nodes.agent("nca", &[a.addr(), b_addr]);
    let ico = nodes.agent("ico", &[a.addr(), b_addr]);
    drop_messages(&nca, 0, BEFORE);
    wait_for("some files sent", OUTCOME_TIMEOUT, || {
        match nca.spool().count_moved("sent") {
            n if n >= BEFORE / 3 => Ok(()),
            n => Err(format!("{n} sent")),
        }
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&a, &[&nca, &ico])));
    a.kill().unwrap();
    // The peer node: another broker over the same store, on the agents' second URL.
    let b = BrokerProcess::start_on(&nodes.config, &nodes.data_dir, b_addr).unwrap();
    drop_messages(&nca, BEFORE, AFTER);
    assert_all_delivered_once(BEFORE + AFTER, &nca, &ico, "after node A was killed");
    let moved_to = format!("https://localhost:{}", b.addr().port());
    for agent in [&nca, &ico] {
        assert!(
            agent
                .log_text()
                .lines()
                .any(|l| l.contains("connected to broker node") && l.contains(&moved_to)),
            "the agent logs its move to node B:\n{}",
            agent.log_tail(30)
        );
    }
}
