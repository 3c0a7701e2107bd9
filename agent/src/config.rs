//! The agent's configuration (`agent.toml`): where the broker is, which certificates to use,
//! where the spool directory is, how to reconnect, and how long to wait for the broker.
//!
//! Relative paths are resolved against the configuration file's directory. Errors name the
//! file, the key and what is wrong.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::client::{BrokerUrls, ClientTls, Timeouts};

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The file.
        file: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{file}: {message}")]
    Syntax {
        /// The file.
        file: String,
        /// The parser's message, naming line and key.
        message: String,
    },
    /// A file a key names could not be read.
    #[error("{file}: {key}: cannot read {path}: {source}")]
    File {
        /// The configuration file.
        file: String,
        /// The key that names the file.
        key: &'static str,
        /// The file the key names.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A key has an unacceptable value.
    #[error("{file}: {key}: {problem}")]
    Invalid {
        /// The file.
        file: String,
        /// The key.
        key: &'static str,
        /// What is wrong.
        problem: String,
    },
}

/// A validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The configuration file this was loaded from (for messages).
    pub file: PathBuf,
    /// The broker's URL, `https://host:port`, or the URLs of several broker nodes, tried in
    /// turn.
    pub brokers: Vec<String>,
    /// The federation CA certificate.
    pub ca: PathBuf,
    /// This agency's client certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// The spool directory (`outbox/`, `sent/`, `refused/`, `inbox/`, `failed/`).
    pub spool: PathBuf,
    /// The first reconnect delay.
    pub min_backoff: Duration,
    /// The longest reconnect delay.
    pub max_backoff: Duration,
    /// The log filter when `RUST_LOG` is not set (`info`, `debug`, …).
    pub log_level: String,
    /// How the log is written: `text` or `json` lines (`log_format`).
    pub log_format: crate::logging::LogFormat,
    /// Deliveries in flight to this agent at once.
    pub window: u32,
    /// The broker's audit log key (`concordat-broker log-key` prints it).
    pub log_key: Option<concordat_proto::checkpoint::LogVerifier>,
    /// How long to wait for the broker (`[timeouts]`).
    pub timeouts: Timeouts,
}

/// `broker = "https://…"` or `broker = ["https://…", "https://…"]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// The most broker URLs an agent takes.
const MAX_BROKERS: usize = 16;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    broker: OneOrMany,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    spool: PathBuf,
    #[serde(default = "default_log_level")]
    log_level: String,
    #[serde(default)]
    log_format: crate::logging::LogFormat,
    #[serde(default = "default_window")]
    window: u32,
    log_key: Option<String>,
    #[serde(default)]
    reconnect: RawReconnect,
    #[serde(default)]
    timeouts: RawTimeouts,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTimeouts {
    connect_ms: u64,
    rpc_ms: u64,
    keepalive_interval_ms: u64,
    keepalive_timeout_ms: u64,
}

impl Default for RawTimeouts {
    fn default() -> Self {
        let t = Timeouts::default();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        RawTimeouts {
            connect_ms: ms(t.connect),
            rpc_ms: ms(t.rpc),
            keepalive_interval_ms: ms(t.keepalive_interval),
            keepalive_timeout_ms: ms(t.keepalive_timeout),
        }
    }
}

/// The longest timeout accepted: a day. Longer is a mistake, not a choice.
const MAX_TIMEOUT_MS: u64 = 24 * 3600 * 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawReconnect {
    min_backoff_ms: u64,
    max_backoff_ms: u64,
}

impl Default for RawReconnect {
    fn default() -> Self {
        RawReconnect {
            min_backoff_ms: 250,
            // Short, so that the agent is back within seconds of the broker (see `daemon`).
            max_backoff_ms: 2_000,
        }
    }
}

fn default_log_level() -> String {
    "info".into()
}

fn default_window() -> u32 {
    64
}

impl AgentConfig {
    /// Loads and validates `path`.
    pub fn load(path: &Path) -> Result<AgentConfig, AgentConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| AgentConfigError::Read {
            file: file.clone(),
            source,
        })?;
        let raw: Raw = toml::from_str(&text).map_err(|e| AgentConfigError::Syntax {
            file: file.clone(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let invalid = |key, problem: String| AgentConfigError::Invalid {
            file: file.clone(),
            key,
            problem,
        };
        let brokers = match raw.broker {
            OneOrMany::One(url) => vec![url],
            OneOrMany::Many(urls) => urls,
        };
        if brokers.is_empty() || brokers.len() > MAX_BROKERS {
            return Err(invalid(
                "broker",
                format!("give one URL or a list of 1 to {MAX_BROKERS} URLs"),
            ));
        }
        for url in &brokers {
            if !url.starts_with("https://") {
                return Err(invalid(
                    "broker",
                    format!("{url:?} must be an https:// URL"),
                ));
            }
        }
        let r = raw.reconnect;
        if r.min_backoff_ms == 0 || r.max_backoff_ms < r.min_backoff_ms {
            return Err(invalid(
                "reconnect.max_backoff_ms",
                "backoffs must be positive and max_backoff_ms >= min_backoff_ms".into(),
            ));
        }
        let t = raw.timeouts;
        for (key, value) in [
            ("timeouts.connect_ms", t.connect_ms),
            ("timeouts.rpc_ms", t.rpc_ms),
            ("timeouts.keepalive_interval_ms", t.keepalive_interval_ms),
            ("timeouts.keepalive_timeout_ms", t.keepalive_timeout_ms),
        ] {
            if value == 0 || value > MAX_TIMEOUT_MS {
                return Err(invalid(
                    key,
                    format!("{value} must be between 1 and {MAX_TIMEOUT_MS} (a day)"),
                ));
            }
        }
        let timeouts = Timeouts {
            connect: Duration::from_millis(t.connect_ms),
            rpc: Duration::from_millis(t.rpc_ms),
            keepalive_interval: Duration::from_millis(t.keepalive_interval_ms),
            keepalive_timeout: Duration::from_millis(t.keepalive_timeout_ms),
        };
        if raw.window == 0 {
            return Err(invalid("window", "must be at least 1".into()));
        }
        let log_key = raw
            .log_key
            .as_deref()
            .map(|k| k.parse())
            .transpose()
            .map_err(|e| {
                invalid(
                    "log_key",
                    format!("not a log verifier key (name+keyid+base64): {e}"),
                )
            })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(AgentConfig {
            file: path.to_path_buf(),
            brokers,
            ca: base.join(raw.ca),
            cert: base.join(raw.cert),
            key: base.join(raw.key),
            spool: base.join(raw.spool),
            min_backoff: Duration::from_millis(r.min_backoff_ms),
            max_backoff: Duration::from_millis(r.max_backoff_ms),
            log_level: raw.log_level,
            log_format: raw.log_format,
            window: raw.window,
            log_key,
            timeouts,
        })
    }

    /// The TLS client settings, read from the files. An error names this file, the key and
    /// the file it names.
    pub fn client_tls(&self) -> Result<ClientTls, AgentConfigError> {
        let read = |key, path: &Path| {
            std::fs::read(path).map_err(|source| AgentConfigError::File {
                file: self.file.display().to_string(),
                key,
                path: path.display().to_string(),
                source,
            })
        };
        let (ca, cert, key) = (
            read("ca", &self.ca)?,
            read("cert", &self.cert)?,
            read("key", &self.key)?,
        );
        let brokers =
            BrokerUrls::new(self.brokers.clone()).ok_or_else(|| AgentConfigError::Invalid {
                file: self.file.display().to_string(),
                key: "broker",
                problem: "no broker URL".into(),
            })?;
        Ok(ClientTls {
            brokers,
            ca_pem: ca,
            cert_pem: cert,
            key_pem: key,
            timeouts: self.timeouts,
        })
    }
}

/// A commented sample configuration whose spool directory is the configuration's own directory.
pub fn sample(agency: &str) -> String {
    format!(
        r#"# Concordat agent configuration. Relative paths are relative to this file's directory.

# The broker, and the mutual-TLS files of this agency (certificate CN = agency id).
# With several broker nodes, list them: the agent uses the first that
# connects and moves on to the next when its node goes away or answers UNAVAILABLE:
# broker = ["https://broker-a:7443", "https://broker-b:7443"]
broker = "https://localhost:7443"
ca = "ca.pem"
cert = "{agency}.pem"
key = "{agency}.key"

# The spool directory: drop JSON files in outbox/, read deliveries from inbox/.
spool = "."

# Log filter when RUST_LOG is not set: error, warn, info, debug, trace.
log_level = "info"
# Log lines on standard error: "text", or "json" (one object per line, for a SIEM).
log_format = "text"

# Deliveries in flight to this agent at once (the broker may cap it).
window = 64

# The broker's audit log key, from `concordat-broker log-key`. With it the agent checks every
# receipt's checkpoint and proofs, and stops sending if the log ever contradicts itself.
# log_key = "concordat-broker/audit+1a2b3c4d+AU..."

[reconnect]
# While the broker is unreachable, attempts back off exponentially with jitter between these
# bounds: a short ceiling brings the agent back within seconds of the broker's return. (A broker
# that answers "busy" is retried on a longer backoff, up to 30 s.)
min_backoff_ms = 250
max_backoff_ms = 2000

[timeouts]
# Connecting to the broker (TCP, TLS and HTTP/2 handshakes together).
connect_ms = 10000
# Each call's answer; for the inbox subscription, its start (the stream has no deadline).
rpc_ms = 30000
# An HTTP/2 ping every keepalive_interval_ms; unanswered within keepalive_timeout_ms, the
# connection is taken for dead and the agent reconnects.
keepalive_interval_ms = 30000
keepalive_timeout_ms = 20000
"#
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sample_loads_and_paths_are_relative_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, sample("ico")).unwrap();
        let c = AgentConfig::load(&path).unwrap();
        assert_eq!(c.cert, dir.path().join("ico.pem"));
        assert_eq!(c.spool, dir.path().join("."));
        assert_eq!(c.min_backoff, Duration::from_millis(250));
        assert_eq!(c.max_backoff, Duration::from_secs(2));
        assert_eq!(c.log_format, crate::logging::LogFormat::Text);
        assert_eq!(c.timeouts, Timeouts::default());
    }

    #[test]
    fn timeouts_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            sample("ico").replace("rpc_ms = 30000", "rpc_ms = 2500"),
        )
        .unwrap();
        let c = AgentConfig::load(&path).unwrap();
        assert_eq!(c.timeouts.rpc, Duration::from_millis(2500));
        assert_eq!(c.timeouts.connect, Duration::from_secs(10));
        // A file without the table gets the defaults.
        let without = sample("ico");
        let without = &without[..without.find("[timeouts]").unwrap()];
        std::fs::write(&path, without).unwrap();
        assert_eq!(
            AgentConfig::load(&path).unwrap().timeouts,
            Timeouts::default()
        );
        for (from, to, key) in [
            ("rpc_ms = 30000", "rpc_ms = 0", "timeouts.rpc_ms"),
            (
                "connect_ms = 10000",
                "connect_ms = 100000000000",
                "timeouts.connect_ms",
            ),
            (
                "keepalive_timeout_ms = 20000",
                "keepalive_timeout_ms = 0",
                "timeouts.keepalive_timeout_ms",
            ),
            (
                "rpc_ms = 30000",
                "rpc_ms = 1\ndeadline_ms = 5",
                "deadline_ms",
            ),
        ] {
            std::fs::write(&path, sample("ico").replace(from, to)).unwrap();
            let e = AgentConfig::load(&path).unwrap_err().to_string();
            assert!(e.contains(key), "{to}: {e}");
        }
    }

    #[test]
    fn log_format_is_read_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        let cases = [
            ("log_format = \"json\"", Ok(crate::logging::LogFormat::Json)),
            ("log_format = \"text\"", Ok(crate::logging::LogFormat::Text)),
            ("", Ok(crate::logging::LogFormat::Text)),
            ("log_format = \"xml\"", Err("log_format")),
            ("log_format = 1", Err("log_format")),
        ];
        for (line, expected) in cases {
            let text = sample("ico").replace("log_format = \"text\"", line);
            std::fs::write(&path, text).unwrap();
            match (AgentConfig::load(&path), expected) {
                (Ok(c), Ok(format)) => assert_eq!(c.log_format, format, "{line}"),
                (Err(e), Err(key)) => assert!(e.to_string().contains(key), "{line}: {e}"),
                (got, want) => panic!(
                    "{line}: {:?} where {want:?} was expected",
                    got.map(|c| c.log_format)
                ),
            }
        }
    }

    #[test]
    fn errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            sample("ico").replace("https://localhost", "http://localhost"),
        )
        .unwrap();
        let e = AgentConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("agent.toml: broker: "), "{e}");
        std::fs::write(
            &path,
            sample("ico").replace("max_backoff_ms = 2000", "max_backoff_ms = 1"),
        )
        .unwrap();
        let e = AgentConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("reconnect.max_backoff_ms"), "{e}");
    }

    #[test]
    fn broker_is_one_url_or_a_list_of_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        let one = "broker = \"https://localhost:7443\"";
        std::fs::write(&path, sample("ico")).unwrap();
        assert_eq!(
            AgentConfig::load(&path).unwrap().brokers,
            ["https://localhost:7443"]
        );
        let two = "broker = [\"https://a:7443\", \"https://b:7443\"]";
        std::fs::write(&path, sample("ico").replace(one, two)).unwrap();
        assert_eq!(
            AgentConfig::load(&path).unwrap().brokers,
            ["https://a:7443", "https://b:7443"]
        );
        for bad in [
            "broker = []",
            "broker = [\"https://a:7443\", \"http://b:7443\"]",
        ] {
            std::fs::write(&path, sample("ico").replace(one, bad)).unwrap();
            let e = AgentConfig::load(&path).unwrap_err().to_string();
            assert!(e.contains("agent.toml: broker: "), "{bad}: {e}");
        }
    }
}
