//! A real PostgreSQL cluster for tests of storage on PostgreSQL (and for `concordat bench relay
//! --storage postgres`): a primary and one synchronous standby on loopback, each a `postgres`
//! child process of the test, with the failures a highly available deployment must survive (a
//! killed primary, a promotion, the old primary coming back stale).
//!
//! [`PgCluster::start`] lays out, in the directory it is given:
//! ```text
//! primary/       data directory of the primary (initdb)
//! standby/       data directory of the standby (pg_basebackup -R from the primary)
//! sockets/       the servers' Unix sockets (nothing else may use them: mode 0700)
//! primary.log    what the primary's postmaster writes, across restarts
//! standby.log    the same for the standby
//! ```
//! Both servers listen on 127.0.0.1 only, on free ports, and trust every loopback connection
//! (a test cluster: no passwords to manage). The user is `postgres`, the database `concordat`.
//!
//! Readiness is never a sleep. A server is up when its `postmaster.pid` names the process the
//! harness started and says `ready` (or `standby`): the same line `pg_ctl start -w` reads. The
//! cluster is ready when the primary's `pg_stat_replication` shows the standby `streaming` and
//! counted for synchronous commit. Both are polls every [`POLL_INTERVAL`] under a deadline.
//!
//! PostgreSQL refuses to run as root. When the tests run as root (CI here does), every
//! PostgreSQL program is started as the `postgres` user, with `setuid` in the child
//! ([`std::os::unix::process::CommandExt::uid`]) rather than through `runuser`, so that the
//! postmaster is the test's own child: its pid is the one to kill, and the test reaps it. The
//! cluster's directory is handed to `postgres` for that. Run as anyone else, the programs run
//! as that user.
//!
//! A panicking test stops its cluster as it unwinds. Ctrl-C stops the servers too: they stay in
//! the test's process group, and SIGINT is PostgreSQL's fast shutdown. A test process killed
//! outright (SIGKILL) cannot stop them, and leaves them running.

use std::{
    ffi::OsString,
    fmt::Write as _,
    fs::{self, File, OpenOptions},
    io::{Read as _, Seek as _, SeekFrom},
    net::TcpListener,
    os::unix::{
        fs::{MetadataExt as _, PermissionsExt as _},
        process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::{Pid, User, geteuid},
};

use crate::poll::{POLL_INTERVAL, log_tail, wait_for};

/// How to get PostgreSQL where it is missing, named by every error that finds none.
pub const INSTALL_HINT: &str = "install PostgreSQL: `apt-get install -y postgresql` (Debian)";
/// The `application_name` of the standby, the one that `synchronous_standby_names` lists.
pub const STANDBY_NAME: &str = "standby1";
/// The database made for the tests.
pub const DATABASE: &str = "concordat";
/// The superuser every URL connects as.
pub const USER: &str = "postgres";

/// How long a server may take to accept connections (crash recovery of a debug-speed test
/// machine included).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the standby may take to stream, and a promotion to finish.
const REPLICATION_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the processes of a killed or stopped server may take to be gone.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How many free ports a fresh server tries when another process takes the one it was given.
const PORT_ATTEMPTS: usize = 5;
/// The programs the harness runs; a directory holding all of them is an installation.
const TOOLS: [&str; 5] = ["initdb", "postgres", "pg_basebackup", "pg_ctl", "psql"];
/// Where Debian installs each major version (`/usr/lib/postgresql/15/bin`, ...).
const DEBIAN_ROOT: &str = "/usr/lib/postgresql";

/// The settings of both servers, appended to the primary's `postgresql.conf` (which
/// `pg_basebackup` copies to the standby). Durability as production will run it: every commit
/// flushed to the primary's disk, and (with [`SYNCHRONOUS_STANDBY`]) to the standby's, before it
/// is acknowledged.
const DURABLE_SETTINGS: &str = "\
fsync = on
full_page_writes = on
synchronous_commit = on
wal_level = replica
max_wal_senders = 4
hot_standby = on
listen_addresses = '127.0.0.1'
";

/// The primary's setting that makes every commit wait for the standby. It is added once the
/// standby exists: before, `CREATE DATABASE` would wait for it forever.
const SYNCHRONOUS_STANDBY: &str = "synchronous_standby_names = 'ANY 1 (standby1)'\n";

/// A PostgreSQL installation: the directory holding its server and client programs.
#[derive(Debug, Clone)]
pub struct PgInstall {
    bin: PathBuf,
}

impl PgInstall {
    /// Finds PostgreSQL: the installation whose `initdb` is on `PATH` (through symbolic links,
    /// so a link in `/usr/local/bin` counts), else the newest under `/usr/lib/postgresql/*/bin`.
    /// The error says where it looked and how to install it.
    pub fn find() -> anyhow::Result<Self> {
        Self::find_in(std::env::var_os("PATH"), Path::new(DEBIAN_ROOT))
    }

    /// [`PgInstall::find`] with the search path and the versioned root given.
    fn find_in(path: Option<OsString>, versioned_root: &Path) -> anyhow::Result<Self> {
        let on_path = path
            .iter()
            .flat_map(std::env::split_paths)
            .filter_map(|dir| fs::canonicalize(dir.join("initdb")).ok())
            .filter_map(|initdb| initdb.parent().map(Path::to_path_buf));
        let mut versioned: Vec<(Vec<u32>, PathBuf)> = fs::read_dir(versioned_root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let version = entry
                    .file_name()
                    .to_str()?
                    .split('.')
                    .map(str::parse)
                    .collect::<Result<Vec<u32>, _>>()
                    .ok()?;
                Some((version, entry.path().join("bin")))
            })
            .collect();
        versioned.sort_by(|a, b| b.0.cmp(&a.0));
        on_path
            .chain(versioned.into_iter().map(|(_, bin)| bin))
            .find(|bin| TOOLS.iter().all(|tool| bin.join(tool).is_file()))
            .map(|bin| PgInstall { bin })
            .ok_or_else(|| {
                anyhow!(
                    "PostgreSQL not found: no directory on PATH or under {}/*/bin holds all of {}; \
                     {INSTALL_HINT}",
                    versioned_root.display(),
                    TOOLS.join(", ")
                )
            })
    }

    /// The directory holding the programs.
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }
}

/// A primary with one synchronous standby, both running until this is dropped.
///
/// The servers keep their names whatever happens to them: [`PgCluster::primary_url`] is the
/// server started as the primary even once it is killed or a stale copy of itself;
/// [`PgCluster::multi_host_url`] is the one that follows the role.
#[derive(Debug)]
pub struct PgCluster {
    runner: Runner,
    primary: Server,
    standby: Server,
}

impl PgCluster {
    /// Creates and starts a cluster in `dir` (made if missing, expected empty), returning once
    /// the standby streams from the primary and counts for synchronous commit.
    ///
    /// Fails with [`INSTALL_HINT`] when PostgreSQL is not installed. As root, `dir` is handed to
    /// the `postgres` user, and each directory above it must be searchable by that user (a
    /// fresh `tempfile::tempdir()` is).
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        let install = PgInstall::find()?;
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // Processes are later recognised by their working directory, which the kernel reports
        // canonical.
        let dir = fs::canonicalize(dir).with_context(|| format!("resolving {}", dir.display()))?;
        let owner = Owner::for_postgres(&dir)?;
        let runner = Runner {
            install,
            owner,
            dir: dir.clone(),
        };
        let sockets = dir.join("sockets");
        fs::create_dir(&sockets).with_context(|| format!("creating {}", sockets.display()))?;
        fs::set_permissions(&sockets, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting {}", sockets.display()))?;
        runner.give(&sockets)?;

        let mut primary = Server::new("primary", &runner);
        runner.run(
            runner
                .command("initdb")
                .arg("--pgdata")
                .arg(&primary.data_dir)
                .args(["--username", USER, "--auth=trust"])
                .args(["--locale=C", "--encoding=UTF8", "--no-instructions"])
                // The files only have to outlive killed processes, not the machine: the page
                // cache does. The servers themselves run with fsync on.
                .arg("--no-sync"),
        )?;
        let mut settings = DURABLE_SETTINGS.to_owned();
        let _ = writeln!(
            settings,
            "unix_socket_directories = {}",
            conf_string(&sockets.to_string_lossy())
        );
        append_conf(&primary.data_dir, "for both servers", &settings)?;
        append_conf(
            &primary.data_dir,
            "for the primary",
            "cluster_name = 'primary'\n",
        )?;
        primary.start_on_a_free_port()?;
        runner.psql(primary.port, &format!("CREATE DATABASE {DATABASE}"))?;

        let mut standby = Server::new("standby", &runner);
        runner.run(
            runner
                .command("pg_basebackup")
                .arg("--pgdata")
                .arg(&standby.data_dir)
                .arg("--dbname")
                .arg(format!(
                    "host=127.0.0.1 port={} user={USER} application_name={STANDBY_NAME}",
                    primary.port
                ))
                // -R: standby.signal, and primary_conninfo with the application_name above.
                .args(["--write-recovery-conf", "--wal-method=stream"])
                .args(["--checkpoint=fast", "--no-sync"]),
        )?;
        let auto_conf = standby.data_dir.join("postgresql.auto.conf");
        let recovery = fs::read_to_string(&auto_conf)
            .with_context(|| format!("reading {}", auto_conf.display()))?;
        if !recovery.contains(&format!("application_name={STANDBY_NAME}")) {
            bail!(
                "pg_basebackup -R wrote no application_name={STANDBY_NAME} to primary_conninfo \
                 in {}:\n{recovery}",
                auto_conf.display()
            );
        }
        // Once promoted, the standby has no standby of its own: waiting for one would block
        // every write after a failover, so it commits alone (its copy of postgresql.conf does
        // not list one). The old primary keeps waiting for `standby1`, which is what keeps a
        // stale primary from acknowledging anything.
        append_conf(
            &standby.data_dir,
            "for the standby",
            "cluster_name = 'standby1'\n",
        )?;
        standby.start_on_a_free_port()?;
        append_conf(
            &primary.data_dir,
            "once the standby exists",
            SYNCHRONOUS_STANDBY,
        )?;
        runner.psql(primary.port, "SELECT pg_reload_conf()")?;

        let cluster = PgCluster {
            runner,
            primary,
            standby,
        };
        cluster.wait_for_synchronous_standby()?;
        Ok(cluster)
    }

    /// Polls the primary until it counts the standby for synchronous commit (which also shows
    /// that it has read [`SYNCHRONOUS_STANDBY`]).
    fn wait_for_synchronous_standby(&self) -> anyhow::Result<()> {
        let sql = format!(
            "SELECT state || ' ' || sync_state FROM pg_stat_replication \
             WHERE application_name = '{STANDBY_NAME}'"
        );
        wait_for(
            "the standby to stream synchronously from the primary",
            REPLICATION_TIMEOUT,
            || match self.runner.psql(self.primary.port, &sql) {
                Ok(state) if state == "streaming sync" || state == "streaming quorum" => Ok(()),
                Ok(state) if state.is_empty() => Err("no standby in pg_stat_replication".into()),
                Ok(state) => Err(format!("standby {state}")),
                Err(e) => Err(format!("{e:#}")),
            },
        )
        .map_err(|e| anyhow!("{e:#}\n{}", self.log_tails(20)))
    }

    /// The URL of the server started as the primary, database [`DATABASE`].
    pub fn primary_url(&self) -> String {
        url(&[self.primary.port], "")
    }

    /// The URL of the server started as the standby.
    pub fn standby_url(&self) -> String {
        url(&[self.standby.port], "")
    }

    /// A URL listing both servers, primary first, that connects to the first that accepts
    /// writes (`target_session_attrs=read-write`, as libpq and tokio-postgres read it), giving
    /// each 5 s to answer.
    pub fn multi_host_url(&self) -> String {
        url(
            &[self.primary.port, self.standby.port],
            "?target_session_attrs=read-write&connect_timeout=5",
        )
    }

    /// The port of the server started as the primary.
    pub fn primary_port(&self) -> u16 {
        self.primary.port
    }

    /// The port of the server started as the standby.
    pub fn standby_port(&self) -> u16 {
        self.standby.port
    }

    /// The data directory of the server started as the primary.
    pub fn primary_data_dir(&self) -> &Path {
        &self.primary.data_dir
    }

    /// The data directory of the server started as the standby.
    pub fn standby_data_dir(&self) -> &Path {
        &self.standby.data_dir
    }

    /// Kills the primary as losing its machine would: SIGKILL to the postmaster, then to every
    /// process it had forked (backends, WAL sender, checkpointer), and returns once none is
    /// left. No shutdown checkpoint, nothing sent to clients.
    pub fn kill_primary(&mut self) -> anyhow::Result<()> {
        self.primary.kill()
    }

    /// Promotes the standby (`pg_ctl promote`) and returns once it accepts writes
    /// (`pg_is_in_recovery()` is false).
    pub fn promote_standby(&mut self) -> anyhow::Result<()> {
        self.runner.run(
            self.runner
                .command("pg_ctl")
                .arg("promote")
                .arg("--pgdata")
                .arg(&self.standby.data_dir)
                .args(["--wait", "--timeout"])
                .arg(REPLICATION_TIMEOUT.as_secs().to_string()),
        )?;
        wait_for(
            "the promoted standby to leave recovery",
            REPLICATION_TIMEOUT,
            || match self
                .runner
                .psql(self.standby.port, "SELECT pg_is_in_recovery()")
            {
                Ok(in_recovery) if in_recovery == "f" => Ok(()),
                Ok(in_recovery) => Err(format!("pg_is_in_recovery() = {in_recovery}")),
                Err(e) => Err(format!("{e:#}")),
            },
        )
        .map_err(|e| anyhow!("{e:#}\n{}", self.standby.log_tail(20)))
    }

    /// Starts the old primary again after [`PgCluster::kill_primary`], from its data directory
    /// as the kill left it and on its old port: after crash recovery it is a primary again, on
    /// its old timeline, unaware of any promotion. Returns once it accepts connections.
    pub fn restart_old_primary(&mut self) -> anyhow::Result<()> {
        self.primary.restart()
    }

    /// The last `lines` lines of both servers' logs, for failure messages.
    pub fn log_tails(&self, lines: usize) -> String {
        format!(
            "{}{}",
            self.primary.log_tail(lines),
            self.standby.log_tail(lines)
        )
    }
}

/// How the harness runs PostgreSQL's programs: from one installation, in the cluster's
/// directory, as `postgres` when the tests run as root.
#[derive(Debug, Clone)]
struct Runner {
    install: PgInstall,
    owner: Option<Owner>,
    dir: PathBuf,
}

impl Runner {
    /// A command for the installation's `program`, run in the cluster's directory, as the
    /// cluster's owner, and without the `PG*` variables of the test's environment (`PGDATA`,
    /// `PGPORT`, `PGOPTIONS`, ...), which would override the cluster's settings.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.install.bin.join(program));
        command.current_dir(&self.dir).stdin(Stdio::null());
        if let Some(owner) = &self.owner {
            command.uid(owner.uid).gid(owner.gid);
        }
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                command.env_remove(key);
            }
        }
        command
    }

    /// Runs `command` to its end; returns its standard output, or an error with its standard
    /// error.
    fn run(&self, command: &mut Command) -> anyhow::Result<String> {
        let program = Path::new(command.get_program())
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let args: Vec<String> = command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let out = command
            .output()
            .with_context(|| format!("running {}", command.get_program().to_string_lossy()))?;
        if !out.status.success() {
            bail!(
                "{program} {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Runs one SQL statement as [`USER`] in database `postgres` on the server at `port`, and
    /// returns its result unaligned, without headers (`t`/`f` for booleans).
    fn psql(&self, port: u16, sql: &str) -> anyhow::Result<String> {
        self.run(
            self.command("psql")
                .args(["--no-psqlrc", "--no-align", "--tuples-only", "--quiet"])
                .args(["--set", "ON_ERROR_STOP=1", "--dbname"])
                .arg(format!(
                    "host=127.0.0.1 port={port} user={USER} dbname=postgres connect_timeout=10"
                ))
                .args(["--command", sql]),
        )
    }

    /// Hands `path` to the cluster's owner.
    fn give(&self, path: &Path) -> anyhow::Result<()> {
        match &self.owner {
            Some(owner) => owner.give(path),
            None => Ok(()),
        }
    }
}

/// The `postgres` user, who owns the cluster when the tests run as root.
#[derive(Debug, Clone, Copy)]
struct Owner {
    uid: u32,
    gid: u32,
}

impl Owner {
    /// `None` unless running as root; as root, the `postgres` user, to whom `dir` is given once
    /// every directory above it is known to let that user through.
    fn for_postgres(dir: &Path) -> anyhow::Result<Option<Owner>> {
        if !geteuid().is_root() {
            return Ok(None);
        }
        let user = User::from_name(USER)
            .context("looking up the postgres user")?
            .ok_or_else(|| {
                anyhow!(
                    "running as root, and PostgreSQL refuses to run as root, but there is no \
                     `postgres` user to run it as; {INSTALL_HINT} (its package creates the user)"
                )
            })?;
        let owner = Owner {
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        };
        for parent in dir.ancestors().skip(1) {
            let meta =
                fs::metadata(parent).with_context(|| format!("reading {}", parent.display()))?;
            let searchable = if meta.uid() == owner.uid {
                meta.mode() & 0o100 != 0
            } else {
                meta.mode() & 0o001 != 0
            };
            if !searchable {
                bail!(
                    "{} (mode {:o}) does not let the postgres user reach {}: put the cluster \
                     under a directory others may search, such as a fresh tempfile::tempdir()",
                    parent.display(),
                    meta.mode() & 0o7777,
                    dir.display()
                );
            }
        }
        owner.give(dir)?;
        Ok(Some(owner))
    }

    /// Makes `path` this user's.
    fn give(&self, path: &Path) -> anyhow::Result<()> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
            .with_context(|| format!("handing {} to the postgres user", path.display()))
    }
}

/// One server of the cluster: its data directory, port and log, and its postmaster while it
/// runs. Dropping it stops the server.
#[derive(Debug)]
struct Server {
    /// `primary` or `standby`, for messages.
    name: &'static str,
    data_dir: PathBuf,
    port: u16,
    log: PathBuf,
    runner: Runner,
    postmaster: Option<Child>,
}

/// Why a server did not start.
enum StartFailure {
    /// Another process holds the port (`postgres` could not bind it).
    PortTaken(anyhow::Error),
    /// Anything else.
    Other(anyhow::Error),
}

impl Server {
    /// The server `name` of the cluster that `runner` runs, not started yet.
    fn new(name: &'static str, runner: &Runner) -> Self {
        Server {
            name,
            data_dir: runner.dir.join(name),
            port: 0,
            log: runner.dir.join(format!("{name}.log")),
            runner: runner.clone(),
            postmaster: None,
        }
    }

    /// Starts the server on a free port, trying another if some other process takes it first.
    fn start_on_a_free_port(&mut self) -> anyhow::Result<()> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            self.port = free_port()?;
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(StartFailure::PortTaken(_)) if attempts < PORT_ATTEMPTS => continue,
                Err(StartFailure::PortTaken(e) | StartFailure::Other(e)) => return Err(e),
            }
        }
    }

    /// Starts the server again on its port, retrying while another process holds the port.
    fn restart(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            bail!("the {} is still running; kill it first", self.name);
        }
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(StartFailure::PortTaken(_)) if Instant::now() < deadline => {
                    std::thread::sleep(POLL_INTERVAL);
                }
                Err(StartFailure::PortTaken(e) | StartFailure::Other(e)) => return Err(e),
            }
        }
    }

    /// Starts `postgres` on `self.port` and waits until it accepts connections.
    fn spawn(&mut self) -> Result<(), StartFailure> {
        let other = StartFailure::Other;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))
            .map_err(other)?;
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let mut command = self.runner.command("postgres");
        command
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .stdout(log.try_clone().map_err(|e| other(e.into()))?)
            .stderr(log);
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", command.get_program().to_string_lossy()))
            .map_err(other)?;
        let pid = child.id();
        self.postmaster = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let exited = match self.postmaster.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => Some(status.to_string()),
                Some(Err(e)) => Some(e.to_string()),
                Some(Ok(None)) | None => None,
            };
            if let Some(status) = exited {
                self.postmaster = None;
                let text = self.log_since(log_start);
                let error = anyhow!(
                    "the {} (postgres on 127.0.0.1:{}) exited while starting ({status}):\n{text}",
                    self.name,
                    self.port
                );
                return Err(if text.contains("Address already in use") {
                    StartFailure::PortTaken(error)
                } else {
                    StartFailure::Other(error)
                });
            }
            if postmaster_status(&self.data_dir, pid)
                .is_some_and(|status| status == "ready" || status == "standby")
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = self.kill();
                return Err(other(anyhow!(
                    "the {} did not accept connections within {START_TIMEOUT:?}:\n{}",
                    self.name,
                    self.log_since(log_start)
                )));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    fn is_running(&mut self) -> bool {
        self.postmaster
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// SIGKILL to the postmaster, then to whatever of the server is left, until nothing is.
    fn kill(&mut self) -> anyhow::Result<()> {
        let mut postmaster = self
            .postmaster
            .take()
            .ok_or_else(|| anyhow!("the {} is not running", self.name))?;
        signal(&postmaster, Signal::SIGKILL);
        postmaster
            .wait()
            .with_context(|| format!("reaping the {}'s postmaster", self.name))?;
        self.kill_leftovers()
    }

    /// An immediate shutdown (SIGQUIT: no checkpoint, like `pg_ctl stop -m immediate`), SIGKILL
    /// if the postmaster has not exited within [`EXIT_TIMEOUT`], then SIGKILL to anything of
    /// the server still running.
    fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut postmaster) = self.postmaster.take() {
            signal(&postmaster, Signal::SIGQUIT);
            let exited = wait_for("the postmaster to exit", EXIT_TIMEOUT, || match postmaster
                .try_wait()
            {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err("running".into()),
                Err(e) => Err(e.to_string()),
            });
            if exited.is_err() {
                signal(&postmaster, Signal::SIGKILL);
                let _ = postmaster.wait();
            }
        }
        self.kill_leftovers()
    }

    /// SIGKILL to every process still running in the data directory, until none is.
    fn kill_leftovers(&self) -> anyhow::Result<()> {
        wait_for(
            &format!("every process of the {} to exit", self.name),
            EXIT_TIMEOUT,
            || {
                let left = server_processes(&self.data_dir);
                if left.is_empty() {
                    return Ok(());
                }
                for pid in &left {
                    let _ = kill(*pid, Signal::SIGKILL);
                }
                Err(format!("still running: {left:?}"))
            },
        )
    }

    /// The log written since byte `start`.
    fn log_since(&self, start: u64) -> String {
        let mut text = String::new();
        if let Ok(mut file) = File::open(&self.log)
            && file.seek(SeekFrom::Start(start)).is_ok()
        {
            let _ = file.read_to_string(&mut text);
        }
        text
    }

    /// The last `lines` lines of the log.
    fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, &format!("the {}", self.name), lines)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("stopping the PostgreSQL {}: {e:#}", self.name);
        }
    }
}

/// Sends `signal` to `child`, which may have exited already.
fn signal(child: &Child, signal: Signal) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

/// The status line of `data_dir/postmaster.pid` if the file is the one of the postmaster `pid`
/// (and not left by a killed one): `starting`, `ready`, `standby` or `stopping`. The layout is
/// PostgreSQL's (`src/include/utils/pidfile.h`): the pid on line 1, the status on line 8.
fn postmaster_status(data_dir: &Path, pid: u32) -> Option<String> {
    let text = fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    if lines.first()?.trim() != pid.to_string() {
        return None;
    }
    Some(lines.get(7)?.trim().to_owned())
}

/// The live processes working in `data_dir`: a server's postmaster and all it forked, whoever
/// their parent is now (PostgreSQL changes into its data directory at start, and its children
/// are forks that never exec). Zombies, dead already, do not count.
fn server_processes(data_dir: &Path) -> Vec<Pid> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            if fs::read_link(entry.path().join("cwd")).ok()? != data_dir {
                return None;
            }
            let stat = fs::read_to_string(entry.path().join("stat")).ok()?;
            let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
            (state != 'Z' && state != 'X').then(|| Pid::from_raw(pid))
        })
        .collect()
}

/// A port of 127.0.0.1 that nothing listened on a moment ago.
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// A `postgresql://` URL for the servers at `ports` of 127.0.0.1, then `query`.
fn url(ports: &[u16], query: &str) -> String {
    let hosts: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    format!("postgresql://{USER}@{}/{DATABASE}{query}", hosts.join(","))
}

/// `text` as a string literal of `postgresql.conf`.
fn conf_string(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Appends `settings` to `data_dir/postgresql.conf`, where later lines override earlier ones.
fn append_conf(data_dir: &Path, why: &str, settings: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let path = data_dir.join("postgresql.conf");
    let mut file = OpenOptions::new()
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    write!(
        file,
        "\n# Concordat test cluster, {why} (concordat-support, pg_cluster.rs)\n{settings}"
    )
    .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// Makes `dir` look like a PostgreSQL `bin` directory holding `tools`.
    fn fake_bin(dir: &Path, tools: &[&str]) -> PathBuf {
        fs::create_dir_all(dir).unwrap();
        for tool in tools {
            fs::write(dir.join(tool), "").unwrap();
        }
        dir.to_path_buf()
    }

    #[test]
    fn finds_the_installation_on_path_else_the_newest_complete_versioned_one() {
        let root = tempfile::tempdir().unwrap();
        let versioned = root.path().join("lib");
        fake_bin(&versioned.join("9.6/bin"), &TOOLS);
        let v13 = fake_bin(&versioned.join("13/bin"), &TOOLS);
        let v15 = fake_bin(&versioned.join("15/bin"), &TOOLS);
        // Newer, but without pg_basebackup: not an installation the harness can use.
        fake_bin(
            &versioned.join("16/bin"),
            &["initdb", "postgres", "pg_ctl", "psql"],
        );
        let linked = root.path().join("linked");
        fs::create_dir_all(&linked).unwrap();
        std::os::unix::fs::symlink(v13.join("initdb"), linked.join("initdb")).unwrap();
        let plain = fake_bin(&root.path().join("plain"), &TOOLS);
        let empty = fake_bin(&root.path().join("empty"), &[]);
        let old_only = root.path().join("old-only");
        fake_bin(&old_only.join("9.6/bin"), &TOOLS);

        let path = |dirs: &[&Path]| Some(std::env::join_paths(dirs).unwrap());
        let cases: [(&str, Option<OsString>, &Path, &Path); 5] = [
            (
                "nothing on PATH: the newest complete version",
                None,
                &versioned,
                &v15,
            ),
            (
                "an empty PATH entry changes nothing",
                path(&[&empty]),
                &versioned,
                &v15,
            ),
            (
                "a link on PATH names its installation",
                path(&[&empty, &linked]),
                &versioned,
                &v13,
            ),
            (
                "a full directory on PATH",
                path(&[&plain]),
                &versioned,
                &plain,
            ),
            (
                "9.6 is found when it is all there is",
                None,
                &old_only,
                &old_only.join("9.6/bin"),
            ),
        ];
        for (case, path, versioned_root, expected) in cases {
            let found = PgInstall::find_in(path, versioned_root).unwrap();
            assert_eq!(
                fs::canonicalize(found.bin_dir()).unwrap(),
                fs::canonicalize(expected).unwrap(),
                "{case}"
            );
        }
    }

    #[test]
    fn without_postgresql_the_error_says_how_to_install_it() {
        let root = tempfile::tempdir().unwrap();
        let partial = fake_bin(&root.path().join("lib/15/bin"), &["psql"]);
        let error = PgInstall::find_in(
            Some(std::env::join_paths([&partial]).unwrap()),
            &root.path().join("lib"),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("apt-get install -y postgresql"), "{error}");
        assert!(error.contains("pg_basebackup"), "{error}");
    }

    #[test]
    fn urls_list_the_servers_in_order() {
        assert_eq!(
            url(&[5432], ""),
            "postgresql://postgres@127.0.0.1:5432/concordat"
        );
        let multi = url(&[5432, 5433], "?target_session_attrs=read-write");
        assert_eq!(
            multi,
            "postgresql://postgres@127.0.0.1:5432,127.0.0.1:5433/concordat\
             ?target_session_attrs=read-write"
        );
    }

    #[test]
    fn conf_strings_double_their_quotes() {
        assert_eq!(conf_string("/tmp/a'b"), "'/tmp/a''b'");
    }
}
