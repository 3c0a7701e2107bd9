//! Real processes for crash and end-to-end tests: the test PKI and configurations written to
//! files, the `concordat-broker` and `concordat-agent` binaries run as children, and helpers for
//! the spool directory and for waiting on outcomes in the filesystem.
//!
//! A broker is ready when it prints its first stdout line, `concordat-broker listening on ADDR`,
//! which it does only once its socket is bound: nothing here sleeps to wait for readiness. The
//! only loops are polls for an *outcome* (a file appearing, a process exiting), every
//! [`POLL_INTERVAL`] and always under a deadline.
//!
//! Children are killed with SIGKILL ([`BrokerProcess::kill`]) or stopped with SIGTERM
//! ([`BrokerProcess::terminate`]); dropping a handle kills its process, so a failing test leaves
//! nothing running. Each child's stderr goes straight to a log file beside its configuration,
//! so a chatty process never blocks on a full pipe; the tails of the logs explain a failure.

use std::{
    fs,
    io::{BufRead, BufReader, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use concordat_agent::client::ClientTls;
use concordat_broker::config::Limits;
use nix::{sys::signal::Signal, unistd::Pid};

use crate::{TestPki, binary};
pub use concordat_support::poll::{POLL_INTERVAL, wait_for, wait_while_progressing};

/// How long a broker may take to bind its socket (a debug build on a busy machine).
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// The line prefix `concordat-broker serve` prints on stdout once it is listening.
pub const LISTENING: &str = "concordat-broker listening on ";

/// The test PKI written to a directory: `ca.pem`, `broker.pem`, `broker.key`, and
/// `<agency>.pem` / `<agency>.key` for each agency.
#[derive(Debug, Clone)]
pub struct PkiFiles {
    dir: PathBuf,
    serials: std::collections::BTreeMap<String, u64>,
}

impl PkiFiles {
    /// The client TLS settings of `agency` for a broker listening on `addr` (by the name
    /// `localhost`, which its certificate carries).
    pub fn client(&self, addr: SocketAddr, agency: &str) -> anyhow::Result<ClientTls> {
        Ok(ClientTls::from_files(
            &format!("https://localhost:{}", addr.port()),
            &self.ca(),
            &self.cert(agency),
            &self.key(agency),
        )?)
    }

    /// Writes the CA and broker certificate of `pki`, and a fresh client certificate for each of
    /// `agencies`, to `dir`.
    pub fn write(pki: &mut TestPki, dir: &Path, agencies: &[&str]) -> anyhow::Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let put = |name: &str, text: &str| {
            let path = dir.join(name);
            fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
        };
        put("ca.pem", &pki.ca_pem())?;
        put("broker.pem", &pki.broker.cert_pem)?;
        put("broker.key", &pki.broker.key_pem)?;
        let mut serials = std::collections::BTreeMap::new();
        for agency in agencies {
            let issued = pki.client_cert(agency)?;
            put(&format!("{agency}.pem"), &issued.cert_pem)?;
            put(&format!("{agency}.key"), &issued.key_pem)?;
            serials.insert((*agency).to_owned(), issued.serial);
        }
        Ok(PkiFiles {
            dir: dir.to_path_buf(),
            serials,
        })
    }

    /// The revocation list file, `crl.pem` (written by [`PkiFiles::write_crl`]).
    pub fn crl(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }

    /// Writes `crl.pem` atomically (a temporary file renamed over it): a CRL of `pki`'s CA
    /// revoking the certificates of `revoked`, which must be agencies written by
    /// [`PkiFiles::write`].
    pub fn write_crl(&self, pki: &TestPki, revoked: &[&str]) -> anyhow::Result<()> {
        let serials = revoked
            .iter()
            .map(|a| {
                self.serials
                    .get(*a)
                    .copied()
                    .ok_or_else(|| anyhow!("no certificate was written for {a}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        self.replace_crl(pki.crl(&serials)?.as_bytes())
    }

    /// Replaces `crl.pem` atomically with `bytes`, whatever they are.
    pub fn replace_crl(&self, bytes: &[u8]) -> anyhow::Result<()> {
        let tmp = self.dir.join(".crl.pem.tmp");
        fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, self.crl()).with_context(|| format!("renaming {}", tmp.display()))
    }

    /// The federation CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The certificate of `agency`.
    pub fn cert(&self, agency: &str) -> PathBuf {
        self.dir.join(format!("{agency}.pem"))
    }

    /// The private key of `agency`.
    pub fn key(&self, agency: &str) -> PathBuf {
        self.dir.join(format!("{agency}.key"))
    }
}

/// The files of a one-broker test in `dir`: a fresh PKI for `agencies` under `dir/pki` and the
/// broker's configuration `dir/broker.toml` (see [`write_broker_config`]) with its data in
/// `data_dir`. Returns the PKI files and the configuration's path.
pub fn write_broker_files(
    dir: &Path,
    agencies: &[&str],
    data_dir: &Path,
    limits: &Limits,
) -> anyhow::Result<(PkiFiles, PathBuf)> {
    let mut pki = TestPki::new()?;
    let files = PkiFiles::write(&mut pki, &dir.join("pki"), agencies)?;
    let config = dir.join("broker.toml");
    write_broker_config(&config, &files, data_dir, limits)?;
    Ok((files, config))
}

/// A path as a TOML basic string. Rust's debug quoting escapes what TOML needs escaped for the
/// paths of a temporary directory.
fn toml_path(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

/// Writes a broker configuration to `path`: listening on `127.0.0.1:0`, data in `data_dir`, the
/// TLS files of `pki`, the agencies `ico`, `ncsc` and `nca`, the auditor `auditor` (who may
/// export the audit log), the given `limits`, and two agreements in force permitting
/// `ncsc -> ico` and `nca -> ico` threat assessments (which may be opaque) and `ico -> ncsc`
/// incident records (nothing else: `nca -> ncsc` is refused with `NO_AGREEMENT`).
pub fn write_broker_config(
    path: &Path,
    pki: &PkiFiles,
    data_dir: &Path,
    limits: &Limits,
) -> anyhow::Result<()> {
    write_broker_config_with_crl(path, pki, data_dir, limits, None)
}

/// [`write_broker_config`], with `tls.crl` set to `crl` when given.
pub fn write_broker_config_with_crl(
    path: &Path,
    pki: &PkiFiles,
    data_dir: &Path,
    limits: &Limits,
    crl: Option<&Path>,
) -> anyhow::Result<()> {
    let crl = crl.map_or(String::new(), |p| format!("crl = {}\n", toml_path(p)));
    let text = format!(
        r#"# Written by concordat_tests::process for one test.
listen = "127.0.0.1:0"
data_dir = {data_dir}
auditors = ["auditor"]

[tls]
cert = {cert}
key = {key}
client_ca = {ca}
{crl}
[limits]
max_message_bytes = {max_message_bytes}
max_queue_depth = {max_queue_depth}
max_window = {max_window}
min_free_bytes = {min_free_bytes}
flush_timeout_ms = {flush_timeout_ms}

[[agencies]]
id = "ico"
name = "Information Commissioner's Office"

[[agencies]]
id = "ncsc"
name = "National Cyber Security Centre"

[[agencies]]
id = "nca"
name = "National Crime Agency"

[[agreements]]
id = "test-ico-ncsc"
title = "Test agreement between the ICO and the NCSC"
parties = ["ico", "ncsc"]
signed = 2024-01-01
review_by = 2099-12-31

[[agreements.flows]]
from = "ncsc"
to = "ico"
kinds = ["threat_assessment"]
clause = "1.1"
# Tests send arbitrary bytes on this flow.
opaque = true

[[agreements.flows]]
from = "ico"
to = "ncsc"
kinds = ["incident_record"]
clause = "1.2"

[[agreements]]
id = "test-ico-nca"
title = "Test agreement between the ICO and the NCA"
parties = ["ico", "nca"]
signed = 2024-01-01
review_by = 2099-12-31

[[agreements.flows]]
from = "nca"
to = "ico"
kinds = ["threat_assessment"]
clause = "2.1"
opaque = true
"#,
        data_dir = toml_path(data_dir),
        cert = toml_path(&pki.dir.join("broker.pem")),
        key = toml_path(&pki.dir.join("broker.key")),
        ca = toml_path(&pki.ca()),
        max_message_bytes = limits.max_message_bytes,
        max_queue_depth = limits.max_queue_depth,
        max_window = limits.max_window,
        min_free_bytes = limits.min_free_bytes,
        flush_timeout_ms = limits.flush_timeout.as_millis(),
    );
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// A child process with its stderr in a log file; killed on drop.
#[derive(Debug)]
struct Supervised {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Supervised {
    /// Spawns `command` with stdin closed, stdout as given and stderr appended to `log`.
    fn spawn(
        name: &str,
        mut command: Command,
        stdout: Stdio,
        log: &Path,
    ) -> anyhow::Result<Supervised> {
        let stderr = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        // Plain text in the logs: tracing's ANSI colours only get in the way of reading them.
        // (A test that sets `NO_COLOR` itself, to check the colour rules, keeps its value.)
        if !command.get_envs().any(|(key, _)| key == "NO_COLOR") {
            command.env("NO_COLOR", "1");
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Supervised {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    fn child(&mut self) -> anyhow::Result<&mut Child> {
        self.child
            .as_mut()
            .ok_or_else(|| anyhow!("{} is not running", self.name))
    }

    /// The process id, while it runs.
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends `signal` and waits up to `timeout` for the process to exit.
    fn signal_and_wait(&mut self, signal: Signal, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let name = self.name.clone();
        let child = self.child()?;
        if child.try_wait()?.is_none() {
            let pid = i32::try_from(child.id()).context("process id out of range")?;
            nix::sys::signal::kill(Pid::from_raw(pid), signal)
                .with_context(|| format!("sending {signal} to {name}"))?;
        }
        let waited = wait_for(
            &format!("{name} to exit after {signal}"),
            timeout,
            || match child.try_wait() {
                Ok(Some(status)) => Ok(status),
                Ok(None) => Err("still running".into()),
                Err(e) => Err(format!("cannot wait: {e}")),
            },
        );
        match waited {
            Ok(status) => {
                self.child = None;
                Ok(status)
            }
            Err(e) => {
                // Leave nothing running behind a failed test.
                let _ = child.kill();
                let _ = child.wait();
                self.child = None;
                Err(e)
            }
        }
    }

    /// SIGKILL, then reap.
    fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        self.signal_and_wait(Signal::SIGKILL, Duration::from_secs(10))
    }

    /// SIGTERM, then wait up to `timeout` for the exit; SIGKILL if it does not come.
    fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        self.signal_and_wait(Signal::SIGTERM, timeout)
    }

    /// The whole log (stderr) so far, empty if it cannot be read.
    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    fn log_tail(&self, lines: usize) -> String {
        concordat_support::poll::log_tail(&self.log, &self.name, lines)
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A `concordat-broker serve` child process.
#[derive(Debug)]
pub struct BrokerProcess {
    process: Supervised,
    config: PathBuf,
    data_dir: PathBuf,
    addr: SocketAddr,
    /// Environment variables set for the next [`BrokerProcess::restart`].
    env: Vec<(String, String)>,
    /// Extra arguments of `serve` (e.g. `--log-format json`), the same at every restart.
    args: Vec<String>,
}

impl BrokerProcess {
    /// Starts a broker for the configuration file `config` with its data in `data_dir`, on a
    /// free port of 127.0.0.1, and returns once it is listening. Its stderr goes to
    /// `broker.log` beside `config`.
    pub fn start(config: &Path, data_dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(config, data_dir, &[], &[])
    }

    /// [`BrokerProcess::start`] on `addr` (a port the test chose beforehand, for instance one
    /// an agent already lists), retrying the bind until [`STARTUP_TIMEOUT`] like
    /// [`BrokerProcess::restart`].
    pub fn start_on(config: &Path, data_dir: &Path, addr: SocketAddr) -> anyhow::Result<Self> {
        let (process, addr) = Self::spawn_retrying(config, data_dir, addr, &[], &[])?;
        Ok(BrokerProcess {
            process,
            config: config.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            addr,
            env: Vec::new(),
            args: Vec::new(),
        })
    }

    /// [`BrokerProcess::start`] with extra arguments for `serve` (kept for every restart) and
    /// environment variables (until [`BrokerProcess::set_env`] replaces them).
    pub fn start_with(
        config: &Path,
        data_dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let (process, addr) = Self::spawn(config, data_dir, any_port, &env, &args)?;
        Ok(BrokerProcess {
            process,
            config: config.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            addr,
            env,
            args,
        })
    }

    /// Sets the environment of the broker's next [`BrokerProcess::restart`] (for instance
    /// libfaketime's, to run it under another wall clock).
    pub fn set_env(&mut self, env: &[(&str, &str)]) {
        self.env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
    }

    /// Starts the broker again, on the same address and data directory, after it was killed
    /// or stopped. Returns once it is listening.
    ///
    /// The port was free a moment ago, but another socket (an agent's outgoing connection, say)
    /// may hold it for a while: binding is retried until [`STARTUP_TIMEOUT`].
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.process.is_running() {
            bail!("the broker is still running; kill or terminate it first");
        }
        let (process, addr) = Self::spawn_retrying(
            &self.config,
            &self.data_dir,
            self.addr,
            &self.env,
            &self.args,
        )?;
        self.process = process;
        self.addr = addr;
        Ok(())
    }

    /// [`BrokerProcess::spawn`] on `listen`, retrying while the port is still held.
    fn spawn_retrying(
        config: &Path,
        data_dir: &Path,
        listen: SocketAddr,
        env: &[(String, String)],
        args: &[String],
    ) -> anyhow::Result<(Supervised, SocketAddr)> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            match Self::spawn(config, data_dir, listen, env, args) {
                Ok(started) => return Ok(started),
                Err(e) if Instant::now() < deadline && format!("{e:#}").contains("binding") => {
                    std::thread::sleep(POLL_INTERVAL);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn spawn(
        config: &Path,
        data_dir: &Path,
        listen: SocketAddr,
        env: &[(String, String)],
        args: &[String],
    ) -> anyhow::Result<(Supervised, SocketAddr)> {
        let log = config.with_file_name("broker.log");
        let mut command = Command::new(binary("concordat-broker")?);
        command
            .envs(env.iter().map(|(k, v)| (k, v)))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg(listen.to_string())
            .args(args);
        let mut process = Supervised::spawn("concordat-broker", command, Stdio::piped(), &log)?;
        let stdout = process
            .child()?
            .stdout
            .take()
            .ok_or_else(|| anyhow!("the broker's stdout is not piped"))?;
        // The first line is the readiness signal; the thread then drains stdout until the
        // process exits, so that it never blocks on a full pipe.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(line) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let line = match rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => bail!("reading the broker's stdout: {e}"),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // Stdout closed without a line: the broker exited. Reap it for its status.
                let status = process.kill().ok();
                bail!(
                    "the broker exited before listening ({status:?}):\n{}",
                    process.log_tail(20)
                );
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!(
                    "the broker did not report listening within {STARTUP_TIMEOUT:?}:\n{}",
                    process.log_tail(20)
                );
            }
        };
        let addr = line
            .strip_prefix(LISTENING)
            .ok_or_else(|| anyhow!("unexpected first line from the broker: {line:?}"))?
            .trim()
            .parse::<SocketAddr>()
            .with_context(|| format!("parsing the address in {line:?}"))?;
        Ok((process, addr))
    }

    /// The address the broker listens on (the same after a restart).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Kills the broker with SIGKILL: no chance to flush or say goodbye.
    pub fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        self.process.kill()
    }

    /// Stops the broker with SIGTERM and waits up to `timeout` for it to exit.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        self.process.terminate(timeout)
    }

    /// Everything the broker has written to standard error so far (across restarts).
    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    /// The last `lines` lines of the broker's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }
}

/// A `concordat-agent run` child process over a spool directory.
#[derive(Debug)]
pub struct AgentProcess {
    process: Supervised,
    config: PathBuf,
    spool: SpoolDir,
}

impl AgentProcess {
    /// Writes `dir/agent.toml` for `agency` (spool directory `dir`, broker at `broker`, the
    /// certificate files of `pki`, reconnecting after 50 ms to 1 s) and starts the agent. The
    /// agent's stderr goes to `dir/agent.log`.
    pub fn start(
        dir: &Path,
        agency: &str,
        broker: SocketAddr,
        pki: &PkiFiles,
    ) -> anyhow::Result<Self> {
        Self::start_with(
            dir,
            agency,
            broker,
            pki,
            "[reconnect]\nmin_backoff_ms = 50\nmax_backoff_ms = 1000\n",
        )
    }

    /// [`AgentProcess::start`] with `rest` in place of its `[reconnect]` table: the end of
    /// `agent.toml`, which may begin with top-level keys (`log_format = "json"`) and add tables
    /// (`[timeouts]`). An empty `rest` leaves every other setting at its default.
    pub fn start_with(
        dir: &Path,
        agency: &str,
        broker: SocketAddr,
        pki: &PkiFiles,
        rest: &str,
    ) -> anyhow::Result<Self> {
        Self::start_nodes(dir, agency, &[broker], pki, rest)
    }

    /// [`AgentProcess::start_with`] for a federation of several broker nodes: `brokers` is the
    /// agent's list of broker URLs, in order.
    pub fn start_nodes(
        dir: &Path,
        agency: &str,
        brokers: &[SocketAddr],
        pki: &PkiFiles,
        rest: &str,
    ) -> anyhow::Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let config = dir.join("agent.toml");
        let urls: Vec<String> = brokers
            .iter()
            .map(|b| format!("\"https://localhost:{}\"", b.port()))
            .collect();
        let broker = match urls.as_slice() {
            [one] => one.clone(),
            many => format!("[{}]", many.join(", ")),
        };
        let text = format!(
            r#"# Written by concordat_tests::process for one test.
broker = {broker}
ca = {ca}
cert = {cert}
key = {key}
spool = "."
log_level = "info"
{rest}"#,
            ca = toml_path(&pki.ca()),
            cert = toml_path(&pki.cert(agency)),
            key = toml_path(&pki.key(agency)),
        );
        fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        let process = Self::spawn(&config)?;
        Ok(AgentProcess {
            process,
            config,
            spool: SpoolDir::new(dir),
        })
    }

    fn spawn(config: &Path) -> anyhow::Result<Supervised> {
        let log = config.with_file_name("agent.log");
        let mut command = Command::new(binary("concordat-agent")?);
        command.arg("run").arg("--config").arg(config);
        // The agent reports nothing on stdout; what it does shows in the spool and its log.
        Supervised::spawn("concordat-agent", command, Stdio::null(), &log)
    }

    /// Starts the agent again with the same configuration, after it was killed or stopped.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.process.is_running() {
            bail!("the agent is still running; kill or terminate it first");
        }
        self.process = Self::spawn(&self.config)?;
        Ok(())
    }

    /// Its spool directory.
    pub fn spool(&self) -> &SpoolDir {
        &self.spool
    }

    /// Waits up to `timeout` until the outbox file `name` has left the outbox and says for
    /// which folder: `sent`, `refused` or `failed`. Panics with the agent's log tail when it
    /// has not.
    pub fn outcome(&self, name: &str, timeout: Duration) -> String {
        wait_for(&format!("{name} sent or refused"), timeout, || {
            for folder in ["sent", "refused", "failed"] {
                if self
                    .spool
                    .moved(folder)
                    .map_err(|e| e.to_string())?
                    .iter()
                    .any(|f| f == name)
                {
                    return Ok(folder.to_owned());
                }
            }
            Err("still in the outbox".into())
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", self.log_tail(20)))
    }

    /// What the broker said of the refused outbox file `name` (`refused/<name>.reason.json`).
    pub fn refusal(&self, name: &str) -> anyhow::Result<concordat_agent::spool::ReasonFile> {
        let value = self
            .spool
            .read_json("refused", &format!("{name}.reason.json"))?;
        Ok(serde_json::from_value(value)?)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Kills the agent with SIGKILL.
    pub fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        self.process.kill()
    }

    /// Stops the agent with SIGTERM and waits up to `timeout` for it to exit.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        self.process.terminate(timeout)
    }

    /// Everything the agent has written to standard error so far (across restarts).
    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    /// The last `lines` lines of the agent's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }
}

/// The suffixes of the files the agent writes beside the outbox files it moves.
pub const SIDECARS: [&str; 4] = [
    ".receipt.json",
    ".reason.json",
    ".error.txt",
    ".involvement.json",
];

/// A spool directory as the agency's own systems see it: files go into `outbox/`, come out in
/// `sent/`, `refused/`, `failed/` and `inbox/`.
#[derive(Debug, Clone)]
pub struct SpoolDir {
    root: PathBuf,
}

impl SpoolDir {
    /// The spool directory at `root` (which need not exist yet).
    pub fn new(root: &Path) -> Self {
        SpoolDir {
            root: root.to_path_buf(),
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// One of its folders: `outbox`, `sent`, `refused`, `failed`, `inbox`.
    pub fn folder(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Drops `bytes` into the outbox as `name`, atomically: written as `.name.tmp` (which the
    /// agent ignores), then renamed.
    pub fn drop_bytes(&self, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let outbox = self.folder("outbox");
        fs::create_dir_all(&outbox).with_context(|| format!("creating {}", outbox.display()))?;
        let tmp = outbox.join(format!(".{name}.tmp"));
        let mut file =
            fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        file.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        drop(file);
        fs::rename(&tmp, outbox.join(name))
            .with_context(|| format!("renaming {} into the outbox", tmp.display()))
    }

    /// Drops an outbox message (see `concordat_agent::spool::OutboxMessage`) as `name`.
    pub fn drop_message(&self, name: &str, message: &serde_json::Value) -> anyhow::Result<()> {
        self.drop_bytes(name, &serde_json::to_vec(message)?)
    }

    /// The complete files in `folder`, sorted: no dot-files (partial writes), no directories.
    /// A folder that does not exist yet is empty.
    pub fn files(&self, folder: &str) -> anyhow::Result<Vec<String>> {
        let dir = self.folder(folder);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name.starts_with('.') || !entry.file_type()?.is_file() {
                continue;
            }
            names.push(name);
        }
        names.sort();
        Ok(names)
    }

    /// The leftovers of interrupted writes in `folder`: dot-files ending in `.tmp`.
    pub fn partial_files(&self, folder: &str) -> anyhow::Result<Vec<String>> {
        let dir = self.folder(folder);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        };
        let mut names = Vec::new();
        for entry in entries {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with(".tmp") {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// How many complete files in `folder` end with `suffix`.
    pub fn count(&self, folder: &str, suffix: &str) -> usize {
        self.files(folder)
            .map(|names| names.iter().filter(|n| n.ends_with(suffix)).count())
            .unwrap_or(0)
    }

    /// The outbox files that the agent has moved into `folder` (`sent`, `refused`, `failed`),
    /// without their sidecars. The agent writes the sidecar first and then moves the file, so a
    /// file listed here has its sidecar.
    pub fn moved(&self, folder: &str) -> anyhow::Result<Vec<String>> {
        Ok(self
            .files(folder)?
            .into_iter()
            .filter(|n| !SIDECARS.iter().any(|s| n.ends_with(s)))
            .collect())
    }

    /// How many outbox files the agent has moved into `folder`.
    pub fn count_moved(&self, folder: &str) -> usize {
        self.moved(folder).map(|names| names.len()).unwrap_or(0)
    }

    /// Reads and parses the JSON file `folder/name`.
    pub fn read_json(&self, folder: &str, name: &str) -> anyhow::Result<serde_json::Value> {
        let path = self.folder(folder).join(name);
        let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
    }
}

/// A tmpfs mounted for one test, unmounted on drop whatever the test's outcome.
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `mib` MiB on `path`, or says why not (it needs root, or the right to
    /// mount).
    pub fn mount(path: &Path, mib: u64) -> Result<Tmpfs, String> {
        fs::create_dir_all(path).map_err(|e| format!("creating {}: {e}", path.display()))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs refused ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            path: path.to_path_buf(),
        })
    }

    /// Fills the file system with `name`, until the kernel says it is full.
    pub fn fill(&self, name: &str) -> PathBuf {
        let path = self.path.join(name);
        let Ok(mut file) = fs::File::create(&path) else {
            panic!("creating {}", path.display());
        };
        let chunk = vec![0u8; 64 * 1024];
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        // The last partial chunk may have gone in: top up byte by byte.
        while file.write(&[0]).is_ok_and(|n| n == 1) {}
        path
    }

    /// Writes `name` until about `leave` bytes are left free.
    pub fn fill_leaving(&self, name: &str, leave: u64) -> PathBuf {
        let path = self.path.join(name);
        let Ok(mut file) = fs::File::create(&path) else {
            panic!("creating {}", path.display());
        };
        let chunk = vec![0xa5u8; 64 * 1024];
        while concordat_broker::store::free_bytes(&self.path).unwrap_or(0)
            > leave + chunk.len() as u64
        {
            if file.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = file.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let plain = Command::new("umount").arg(&self.path).status();
        if !plain.is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}
