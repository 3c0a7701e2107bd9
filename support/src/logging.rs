//! How the binaries write their logs to standard error: text for people, or one JSON object per
//! line for a SIEM (`--log-format json`, `log_format = "json"`).
//!
//! A JSON line is tracing-subscriber's `json` format: `timestamp` (RFC 3339, UTC), `level`,
//! `target` (the module), `fields` (the event's `message` and its structured fields), and
//! `span`/`spans` when the event happened inside one. Text carries ANSI colour only when
//! standard error is a terminal and `NO_COLOR` is unset or empty (<https://no-color.org>), so a
//! log file or a journal never gets escape codes. `RUST_LOG` overrides the default filter.
//!
//! The broker, the agent and the operator CLI all use it.

use std::{ffi::OsStr, fmt, io::IsTerminal, str::FromStr};

use serde::Deserialize;
use tracing_subscriber::EnvFilter;

/// The shape of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event (the default).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The name used in configuration files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?} is not a log format: text or json")),
        }
    }
}

/// Whether text logs may be coloured: only on a terminal, and never when `NO_COLOR` has a
/// non-empty value.
pub fn use_colour(stderr_is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(OsStr::is_empty)
}

/// Installs the process's subscriber, writing `format` to standard error, filtered by
/// `RUST_LOG` or else by `default_filter` (`info`, `warn`, `concordat_broker=debug`, …).
/// Fails if a subscriber is already installed.
pub fn init(
    format: LogFormat,
    default_filter: &str,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
        LogFormat::Text => {
            let colour = use_colour(
                std::io::stderr().is_terminal(),
                std::env::var_os("NO_COLOR").as_deref(),
            );
            builder.with_ansi(colour).try_init()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        let cases: [(bool, Option<&str>, bool); 6] = [
            (true, None, true),
            (true, Some(""), true),
            (true, Some("1"), false),
            (true, Some("false"), false),
            (false, None, false),
            (false, Some("1"), false),
        ];
        for (terminal, no_color, expected) in cases {
            assert_eq!(
                use_colour(terminal, no_color.map(OsStr::new)),
                expected,
                "terminal {terminal}, NO_COLOR {no_color:?}"
            );
        }
    }

    #[test]
    fn formats_parse_by_name_only() {
        for format in [LogFormat::Text, LogFormat::Json] {
            assert_eq!(format.as_str().parse::<LogFormat>(), Ok(format));
        }
        for bad in ["", "JSON", "xml", "0"] {
            assert!(bad.parse::<LogFormat>().is_err(), "{bad:?} parsed");
        }
    }
}
