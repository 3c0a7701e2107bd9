//! Waiting for a condition without sleeping for a guessed time: a poll every
//! [`POLL_INTERVAL`], always under a deadline, whose error says what was awaited and what was
//! last seen; and [`log_tail`], what a waited-for process last wrote, for such errors. Used by the test harness and by `concordat bench relay --storage postgres`,
//! which start servers and wait for them to be ready.

use std::{
    fmt::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::bail;

/// How often [`wait_for`] looks again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Polls `check` every [`POLL_INTERVAL`] until it returns `Ok`, for at most `timeout`.
///
/// `check` returns `Err(state)` while the condition does not hold, describing what it saw; the
/// error on timeout names `what` was awaited and that last state.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    check: impl FnMut() -> Result<T, String>,
) -> anyhow::Result<T> {
    wait_while_progressing(what, timeout, timeout, check)
}

/// Like [`wait_for`], but also gives up once the state that `check` reports has not changed
/// for `stall`: a count that stops short of its goal fails the test in `stall`, not `timeout`.
pub fn wait_while_progressing<T>(
    what: &str,
    stall: Duration,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> anyhow::Result<T> {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut last: Option<(String, Instant)> = None;
    loop {
        let state = match check() {
            Ok(value) => return Ok(value),
            Err(state) => state,
        };
        let now = Instant::now();
        let since = match &last {
            Some((seen, since)) if *seen == state => *since,
            _ => now,
        };
        if now >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}; last seen: {state}");
        }
        if now.duration_since(since) >= stall {
            bail!(
                "no progress for {stall:?} (after {:?}) waiting for {what}; stuck at: {state}",
                now.duration_since(started)
            );
        }
        last = Some((state, since));
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// The last `lines` lines of the log file `path`, under a heading naming `what` wrote it (empty
/// if the file cannot be read).
pub fn log_tail(path: &Path, what: &str, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let mut out = format!("--- last lines of {what} ({}) ---\n", path.display());
    for line in &all[all.len().saturating_sub(lines)..] {
        let _ = writeln!(out, "{line}");
    }
    out
}
