//! The files through which `concordat-broker reload` talks to a running broker, both in its
//! data directory:
//! - [`PID_FILE`], `concordat-broker.pid`: the broker's process id, written atomically once
//!   it is serving (after it holds the database's lock, so a second broker refused by that
//!   lock never overwrites it) and removed when it stops cleanly;
//! - [`LAST_RELOAD_FILE`], `last-reload.json`: the outcome of the latest reload asked for by
//!   SIGHUP ([`LastReload`]), written atomically with the broker's pid and a generation number
//!   that counts the reloads of that process.
//!
//! [`request_reload`] reads the pid file, checks that the process is alive and is a broker,
//! sends SIGHUP and waits (bounded) for an outcome of that process with a newer generation.

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::reload::{ReloadError, ReloadOutcome};

/// The pid file's name in the data directory.
pub const PID_FILE: &str = "concordat-broker.pid";
/// The last reload's outcome, in the data directory.
pub const LAST_RELOAD_FILE: &str = "last-reload.json";
/// How long [`request_reload`] waits by default for the broker to report.
pub const DEFAULT_RELOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest outcome file read (a reload's outcome is a few KiB).
const MAX_OUTCOME_BYTES: u64 = 1024 * 1024;

/// Why a reload could not be asked for, or did not report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// There is no pid file: no broker serves this data directory.
    #[error(
        "no broker is running on {dir}: {PID_FILE} is missing (a broker writes it once it \
         serves and removes it when it stops)",
        dir = .0.display()
    )]
    NotRunning(PathBuf),
    /// The pid file does not hold a process id.
    #[error("{}: not a process id: {content:?}", file.display())]
    BadPidFile {
        /// The pid file.
        file: PathBuf,
        /// What it holds (its start).
        content: String,
    },
    /// The pid file names a process that no longer runs, or is no broker.
    #[error(
        "stale pid file {}: {why}; the broker is not running (it did not stop cleanly); \
         remove the file once you are sure",
        file.display()
    )]
    Stale {
        /// The pid file.
        file: PathBuf,
        /// What was found instead of a broker.
        why: String,
    },
    /// The process could not be signalled.
    #[error("sending SIGHUP to process {pid}: {source}")]
    Signal {
        /// The process id.
        pid: i32,
        /// The error.
        source: nix::Error,
    },
    /// The broker did not report within the time allowed.
    #[error(
        "the broker (process {pid}) did not report the reload's outcome in {} within {timeout:?}; \
         see its log",
        file.display()
    )]
    NoOutcome {
        /// The process id.
        pid: i32,
        /// The outcome file.
        file: PathBuf,
        /// How long was waited.
        timeout: Duration,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", file.display())]
    Io {
        /// The file.
        file: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// The outcome of one reload, as `last-reload.json` holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastReload {
    /// The broker's process id.
    pub pid: u32,
    /// Counts the reloads of that process, from 1.
    pub generation: u64,
    /// When the reload ended (RFC 3339, UTC).
    pub at: String,
    /// `ok` or `failed`.
    pub outcome: String,
    /// The configuration file read, or empty when only TLS files were.
    pub source: String,
    /// SHA-256 of the configuration text put in force (hex), or empty.
    pub config_sha256: String,
    /// What changed and is in force now.
    pub changes: Vec<String>,
    /// What changed in the file but waits for a restart.
    pub needs_restart: Vec<String>,
    /// Why the reload failed (the file and the key), or empty.
    pub error: String,
    /// Established connections closed because the new TLS material refuses them.
    pub connections_closed: usize,
}

impl LastReload {
    /// The record of `outcome`, the `generation`th reload of process `pid`.
    pub fn of(pid: u32, generation: u64, outcome: &Result<ReloadOutcome, ReloadError>) -> Self {
        let at = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let mut record = LastReload {
            pid,
            generation,
            at,
            outcome: "ok".into(),
            source: String::new(),
            config_sha256: String::new(),
            changes: Vec::new(),
            needs_restart: Vec::new(),
            error: String::new(),
            connections_closed: 0,
        };
        match outcome {
            Ok(o) => {
                record.connections_closed = o.closed.len();
                match &o.config {
                    Some(c) => {
                        record.source = c.source.clone();
                        record.config_sha256 = hex::encode(c.sha256);
                        record.changes = c.changes.clone();
                        record.needs_restart = c.needs_restart.clone();
                    }
                    None => {
                        for (what, changed) in [
                            ("certificate", o.certificate_changed),
                            ("key", o.key_changed),
                            ("client CA", o.client_ca_changed),
                            ("CRLs", o.crl_changed),
                        ] {
                            if changed {
                                record.changes.push(format!("tls: {what} changed"));
                            }
                        }
                    }
                }
            }
            Err(e) => {
                record.outcome = "failed".into();
                record.error = e.to_string();
            }
        }
        record
    }

    /// Whether the reload succeeded.
    pub fn ok(&self) -> bool {
        self.outcome == "ok"
    }

    /// The outcome as `concordat-broker reload` prints it.
    pub fn describe(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        if !self.ok() {
            let _ = writeln!(
                s,
                "reload failed (broker process {}, reload {}): {}",
                self.pid, self.generation, self.error
            );
            let _ = writeln!(s, "the configuration in force is unchanged");
            return s;
        }
        let what = if self.source.is_empty() {
            "the TLS files".to_owned()
        } else {
            format!("{} (SHA-256 {})", self.source, self.config_sha256)
        };
        let _ = writeln!(
            s,
            "reloaded {what} (broker process {}, reload {})",
            self.pid, self.generation
        );
        if self.changes.is_empty() {
            let _ = writeln!(s, "nothing changed");
        }
        for c in &self.changes {
            let _ = writeln!(s, "changed: {c}");
        }
        for c in &self.needs_restart {
            let _ = writeln!(s, "needs a restart (not applied): {c}");
        }
        if self.connections_closed > 0 {
            let _ = writeln!(
                s,
                "{} connection(s) closed: their certificates are no longer accepted",
                self.connections_closed
            );
        }
        s
    }
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, synced, renamed over it.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ControlError> {
    let io = |source| ControlError::Io {
        file: path.to_path_buf(),
        source,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// The pid file of a running broker; removed when dropped (a clean stop), if it still names
/// this process.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
}

impl PidFile {
    /// Writes this process's id to `data_dir`'s pid file, atomically.
    pub fn create(data_dir: &Path) -> Result<Self, ControlError> {
        let path = data_dir.join(PID_FILE);
        write_atomically(&path, format!("{}\n", std::process::id()).as_bytes())?;
        Ok(PidFile { path })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let ours = std::fs::read_to_string(&self.path)
            .is_ok_and(|t| t.trim() == std::process::id().to_string());
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Records `outcome` in `data_dir`'s [`LAST_RELOAD_FILE`].
pub fn record_reload(data_dir: &Path, record: &LastReload) -> Result<(), ControlError> {
    let path = data_dir.join(LAST_RELOAD_FILE);
    let mut json = serde_json::to_vec_pretty(record).map_err(|e| ControlError::Io {
        file: path.clone(),
        source: std::io::Error::other(e),
    })?;
    json.push(b'\n');
    write_atomically(&path, &json)
}

/// The last reload recorded in `data_dir`, if any can be read.
pub fn last_reload(data_dir: &Path) -> Option<LastReload> {
    use std::io::Read;
    let file = std::fs::File::open(data_dir.join(LAST_RELOAD_FILE)).ok()?;
    let mut text = String::new();
    file.take(MAX_OUTCOME_BYTES)
        .read_to_string(&mut text)
        .ok()?;
    serde_json::from_str(&text).ok()
}

/// The process id in `data_dir`'s pid file, checked to be a running broker.
pub fn running_broker(data_dir: &Path) -> Result<i32, ControlError> {
    let file = data_dir.join(PID_FILE);
    // A pid is a few digits: read no more than a line's worth.
    let read = std::fs::File::open(&file).and_then(|f| {
        use std::io::Read;
        let mut text = String::new();
        f.take(64).read_to_string(&mut text).map(|_| text)
    });
    let text = match read {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ControlError::NotRunning(data_dir.to_path_buf()));
        }
        Err(source) => return Err(ControlError::Io { file, source }),
    };
    let pid: i32 = match text.trim().parse() {
        Ok(pid) if pid > 0 => pid,
        _ => {
            return Err(ControlError::BadPidFile {
                file,
                content: text.trim().chars().take(40).collect(),
            });
        }
    };
    let stale = |why: String| ControlError::Stale {
        file: file.clone(),
        why,
    };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => {}
        Err(nix::Error::ESRCH) => return Err(stale(format!("no process {pid}"))),
        // EPERM: it exists, but is not ours to signal; SIGHUP will say so.
        Err(_) => {}
    }
    // The pid may have been reused by another program since: look at what it runs, where
    // /proc says.
    if let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) {
        let program = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        let name = Path::new(std::ffi::OsStr::new(
            std::str::from_utf8(program).unwrap_or_default(),
        ))
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
        if !name.starts_with("concordat-broker") {
            return Err(stale(format!(
                "process {pid} is {name:?}, not concordat-broker"
            )));
        }
    }
    Ok(pid)
}

/// Asks the broker serving `data_dir` to reload (SIGHUP) and waits up to `timeout` for its
/// outcome.
pub fn request_reload(data_dir: &Path, timeout: Duration) -> Result<LastReload, ControlError> {
    let pid = running_broker(data_dir)?;
    let ours = |r: &LastReload| i64::from(r.pid) == i64::from(pid);
    let before = last_reload(data_dir)
        .filter(ours)
        .map_or(0, |r| r.generation);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGHUP,
    )
    .map_err(|source| ControlError::Signal { pid, source })?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(r) = last_reload(data_dir).filter(|r| ours(r) && r.generation > before) {
            return Ok(r);
        }
        if Instant::now() >= deadline {
            return Err(ControlError::NoOutcome {
                pid,
                file: data_dir.join(LAST_RELOAD_FILE),
                timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// Each row is a pid file's content (or none) and the start of the error it must give.
    #[test]
    fn a_missing_bad_or_stale_pid_file_is_named() {
        // A process that has exited, whose pid is very probably free.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        let this = std::process::id();
        let rows: &[(Option<String>, &str)] = &[
            (None, "no broker is running"),
            (Some("not a pid\n".into()), "not a process id"),
            (Some("-5\n".into()), "not a process id"),
            (Some(format!("{gone}\n")), "stale pid file"),
            // This test process runs, but is not a broker.
            (Some(format!("{this}\n")), "stale pid file"),
        ];
        for (content, expected) in rows {
            let dir = tempfile::tempdir().unwrap();
            if let Some(c) = content {
                std::fs::write(dir.path().join(PID_FILE), c).unwrap();
            }
            let e = request_reload(dir.path(), Duration::from_millis(100))
                .unwrap_err()
                .to_string();
            assert!(e.contains(expected), "{content:?}: {e}");
        }
    }

    /// The pid file holds this process's id while the guard lives and is gone after; a file
    /// another process wrote meanwhile is left alone.
    #[test]
    fn the_pid_file_lives_as_long_as_its_guard() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PID_FILE);
        let guard = PidFile::create(dir.path()).unwrap();
        let written = std::fs::read_to_string(&path).unwrap();
        assert_eq!(written.trim(), std::process::id().to_string());
        drop(guard);
        assert!(!path.exists());
        let guard = PidFile::create(dir.path()).unwrap();
        std::fs::write(&path, "1\n").unwrap();
        drop(guard);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n");
    }

    /// An outcome written is read back whole; a failure says so and keeps its error.
    #[test]
    fn outcomes_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let failed = LastReload::of(7, 3, &Err(ReloadError::NoFiles));
        record_reload(dir.path(), &failed).unwrap();
        let back = last_reload(dir.path()).unwrap();
        assert_eq!(back, failed);
        assert!(!back.ok());
        assert!(
            back.describe().contains("nothing to re-read"),
            "{}",
            back.describe()
        );
        assert!(back.describe().contains("unchanged"));
    }
}
