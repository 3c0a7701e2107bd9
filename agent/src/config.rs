//! The agent's configuration (`agent.toml`): where the broker is, which certificates to use,
//! where the spool directory is, and how to reconnect.
//!
//! Relative paths are resolved against the configuration file's directory. Errors name the
//! file, the key and what is wrong.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::client::{ClientError, ClientTls};

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
    /// The broker's URL, `https://host:port`.
    pub broker: String,
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
    /// Deliveries in flight to this agent at once.
    pub window: u32,
    /// The broker's audit log key (`concordat-broker log-key` prints it).
    pub log_key: Option<concordat_proto::checkpoint::LogVerifier>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    broker: String,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    spool: PathBuf,
    #[serde(default = "default_log_level")]
    log_level: String,
    #[serde(default = "default_window")]
    window: u32,
    log_key: Option<String>,
    #[serde(default)]
    reconnect: RawReconnect,
}

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
            max_backoff_ms: 30_000,
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
        if !raw.broker.starts_with("https://") {
            return Err(invalid(
                "broker",
                format!("{:?} must be an https:// URL", raw.broker),
            ));
        }
        let r = raw.reconnect;
        if r.min_backoff_ms == 0 || r.max_backoff_ms < r.min_backoff_ms {
            return Err(invalid(
                "reconnect.max_backoff_ms",
                "backoffs must be positive and max_backoff_ms >= min_backoff_ms".into(),
            ));
        }
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
            broker: raw.broker,
            ca: base.join(raw.ca),
            cert: base.join(raw.cert),
            key: base.join(raw.key),
            spool: base.join(raw.spool),
            min_backoff: Duration::from_millis(r.min_backoff_ms),
            max_backoff: Duration::from_millis(r.max_backoff_ms),
            log_level: raw.log_level,
            window: raw.window,
            log_key,
        })
    }

    /// The TLS client settings, read from the files.
    pub fn client_tls(&self) -> Result<ClientTls, ClientError> {
        ClientTls::from_files(&self.broker, &self.ca, &self.cert, &self.key)
    }
}

/// A commented sample configuration whose spool directory is the configuration's own directory.
pub fn sample(agency: &str) -> String {
    format!(
        r#"# Concordat agent configuration. Relative paths are relative to this file's directory.

# The broker, and the mutual-TLS files of this agency (certificate CN = agency id).
broker = "https://localhost:7443"
ca = "ca.pem"
cert = "{agency}.pem"
key = "{agency}.key"

# The spool directory: drop JSON files in outbox/, read deliveries from inbox/.
spool = "."

# Log filter when RUST_LOG is not set: error, warn, info, debug, trace.
log_level = "info"

# Deliveries in flight to this agent at once (the broker may cap it).
window = 64

# The broker's audit log key, from `concordat-broker log-key`. With it the agent checks every
# receipt's checkpoint and proofs, and stops sending if the log ever contradicts itself.
# log_key = "concordat-broker/audit+1a2b3c4d+AU..."

[reconnect]
# Exponential backoff with jitter between these bounds.
min_backoff_ms = 250
max_backoff_ms = 30000
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
            sample("ico").replace("max_backoff_ms = 30000", "max_backoff_ms = 1"),
        )
        .unwrap();
        let e = AgentConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("reconnect.max_backoff_ms"), "{e}");
    }
}
