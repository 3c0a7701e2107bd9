//! The broker's configuration: one TOML file, parsed once at start-up into validated types.
//!
//! A bad file is refused with a message that names the file, the key and what is wrong. Relative
//! paths in a file are resolved against the file's directory. Without a file the broker runs on
//! the embedded default ([`Config::embedded_default`]): the development PKI of `certs-dev/`
//! compiled into the binary, data in `./var/broker`, listening on 127.0.0.1:7443, and the
//! federation of `ico`, `ncsc` and `nca` with their two MoUs and a development consent key per
//! agency.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use concordat_proto::{
    envelope::{Kind, Tlp},
    ids::{AgencyId, OrgId},
    paserk::PublicKey,
    significance::Officer,
};
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, pem::PemObject,
};
use serde::Deserialize;

use crate::{
    policy::{
        Agreement, ConsentIssuer, Flow, LegalBases, LegalBasis, Organisations, Policy, ReviewStage,
    },
    registry::{Organisation, OrganisationSpec, Registry, RegistryError},
};

/// The default largest payload, 4 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// The largest payload any configuration may allow, 64 MiB.
pub const MAX_MESSAGE_BYTES_CEILING: usize = 64 * 1024 * 1024;

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The configuration file.
        file: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not fit the schema.
    #[error("{file}: {message}")]
    Syntax {
        /// The configuration file.
        file: String,
        /// The parser's explanation, which names the line and key.
        message: String,
    },
    /// A key has a value that is not acceptable.
    #[error("{file}: {key}: {problem}")]
    Invalid {
        /// The configuration file.
        file: String,
        /// The dotted key, e.g. `tls.cert` or `agencies[2].id`.
        key: String,
        /// What is wrong.
        problem: String,
    },
}

/// A validated broker configuration. Tests build one directly with [`Config::new`].
#[derive(Debug)]
pub struct Config {
    /// Where the configuration came from (a path, or `<embedded default>`), for messages.
    pub source: String,
    /// The address `concordat-broker serve` binds.
    pub listen: SocketAddr,
    /// Where the broker keeps its log key, its published checkpoint and, with the sled engine,
    /// its database.
    pub data_dir: PathBuf,
    /// The storage engine (`[storage]`): sled in `data_dir` unless PostgreSQL is configured.
    pub storage: StorageEngine,
    /// Certificates and keys for mutual TLS.
    pub tls: TlsMaterial,
    /// The files `tls` was read from, which a reload reads again; `None` for material that
    /// came from no file (the embedded default, a configuration built in code).
    pub tls_files: Option<TlsFiles>,
    /// How often the broker looks at the TLS files' modification times to reload them when
    /// they change; `None` (`tls.reload_poll_seconds = 0`) for never: SIGHUP still reloads.
    pub tls_reload_poll: Option<Duration>,
    /// The agencies of the federation, by id.
    pub agencies: BTreeMap<AgencyId, Agency>,
    /// Certificate Common Names allowed to call the `Audit` service.
    pub auditors: BTreeSet<AgencyId>,
    /// Size limits.
    pub limits: Limits,
    /// The agreements and trusted consent issuers.
    pub policy: Policy,
    /// SHA-256 of the configuration text, recorded in the audit log at start-up.
    pub digest: [u8; 32],
    /// The audit log's name: the origin line of its checkpoints and the name of its key.
    pub log_origin: String,
    /// Where to serve Prometheus metrics over plain HTTP (`/metrics`); off when `None`.
    pub metrics_listen: Option<SocketAddr>,
    /// The protected organisations (`[[organisations]]` and `organisations_file`).
    pub registry: Arc<Registry>,
    /// How `concordat-broker serve` writes its log (`log_format`; `--log-format` overrides).
    pub log_format: crate::logging::LogFormat,
    /// The file this configuration was loaded from, which a reload reads again; `None` for the
    /// embedded default and a configuration built in code.
    pub file: Option<ConfigFile>,
}

/// The file a configuration was loaded from, with the settings a command line may override as
/// the file wrote them: a reload compares a changed file with what the file said before, not
/// with the overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFile {
    /// The file.
    pub path: PathBuf,
    /// `listen` as written in the file.
    pub listen: SocketAddr,
    /// `data_dir` as written in the file (resolved against the file's directory).
    pub data_dir: PathBuf,
}

/// The engine that stores the broker's state (`[storage]`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StorageEngine {
    /// sled in `data_dir/db`: the embedded default.
    #[default]
    Sled,
    /// A PostgreSQL database.
    Postgres(PostgresStorage),
}

/// How to reach the PostgreSQL database (`[storage] engine = "postgres"`).
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresStorage {
    /// The connection URL (`postgres://…` or libpq key-value form); several hosts with
    /// `target_session_attrs=read-write` pick the primary, and pick it again after a failover.
    pub url: String,
    /// Connections besides the writer's.
    pub pool: usize,
    /// The CA certificates (PEM) that sign the servers' certificates, for `sslmode=require`.
    pub ca_file: Option<PathBuf>,
}

impl fmt::Debug for PostgresStorage {
    // The URL may hold a password: only its hosts are shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStorage")
            .field("hosts", &postgres_hosts(&self.url))
            .field("pool", &self.pool)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl PostgresStorage {
    /// The engine's connection options.
    pub fn options(&self) -> crate::store::postgres::PgOptions {
        crate::store::postgres::PgOptions {
            url: self.url.clone(),
            pool: self.pool,
            ca_file: self.ca_file.clone(),
        }
    }
}

/// The hosts and ports a PostgreSQL URL names, for messages (never its password): see
/// [`crate::store::postgres::servers`].
pub fn postgres_hosts(url: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(c) => crate::store::postgres::servers(&c),
        Err(_) => "<unparsable URL>".into(),
    }
}

/// The most connections `[storage] pool` may ask for.
pub const MAX_POSTGRES_POOL: usize = 64;

/// An agency of the federation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agency {
    /// Its display name, e.g. "National Crime Agency".
    pub name: String,
}

/// Limits that protect the broker from oversized or excessive input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The largest payload accepted in one envelope, in bytes.
    pub max_message_bytes: usize,
    /// The most items one recipient's queue may hold; beyond it sends are refused.
    pub max_queue_depth: u64,
    /// The most deliveries in flight (sent, not acknowledged) on one subscription.
    pub max_window: u32,
    /// Below this much free space in the data directory's file system, `Send` is refused
    /// with `STORAGE_FULL` (acknowledgements and subscriptions go on, so queues drain).
    pub min_free_bytes: u64,
    /// A flush that takes longer fails its requests with `STORAGE_UNAVAILABLE` and turns
    /// health `NOT_SERVING` (see [`crate::store`]).
    pub flush_timeout: std::time::Duration,
    /// Limits on connections: how many, from where, and how long they may take to start.
    pub connections: ConnectionLimits,
}

/// Limits on connections, which keep a flood of idle or slow sockets from locking agencies
/// out (see [`crate::connections`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// The most connections still in their handshake (TCP accepted, TLS or the HTTP/2 preface
    /// not finished) from one source address; more are closed at once.
    pub max_handshakes_per_source: usize,
    /// The most connections open at once, in handshake or established. When full, the oldest
    /// connection still in its handshake is shed to make room; if none is, the new one is
    /// refused. Established (authenticated) connections are never shed for a newcomer.
    pub max_connections: usize,
    /// How long the TLS handshake may take, from accept.
    pub handshake_timeout: Duration,
    /// How long after the TLS handshake the client may take to send the HTTP/2 preface.
    pub preface_timeout: Duration,
}

/// The default handshakes in progress per source address.
pub const DEFAULT_MAX_HANDSHAKES_PER_SOURCE: usize = 16;
/// The default total connection cap.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// The default TLS handshake deadline.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// The default HTTP/2 preface deadline.
pub const DEFAULT_PREFACE_TIMEOUT: Duration = Duration::from_secs(3);
/// The default interval between looks at the TLS files.
pub const DEFAULT_TLS_RELOAD_POLL: Duration = Duration::from_secs(5);

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_handshakes_per_source: DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            preface_timeout: DEFAULT_PREFACE_TIMEOUT,
        }
    }
}

/// The default queue depth limit per recipient.
pub const DEFAULT_MAX_QUEUE_DEPTH: u64 = 100_000;
/// The default (and largest) in-flight window of a subscription.
pub const DEFAULT_MAX_WINDOW: u32 = 64;
/// The default free-space floor: 256 MiB.
pub const DEFAULT_MIN_FREE_BYTES: u64 = 256 * 1024 * 1024;
/// The default bound on one flush: 10 s.
pub const DEFAULT_FLUSH_TIMEOUT_MS: u64 = 10_000;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_queue_depth: DEFAULT_MAX_QUEUE_DEPTH,
            max_window: DEFAULT_MAX_WINDOW,
            min_free_bytes: DEFAULT_MIN_FREE_BYTES,
            flush_timeout: std::time::Duration::from_millis(DEFAULT_FLUSH_TIMEOUT_MS),
            connections: ConnectionLimits::default(),
        }
    }
}

/// The broker's certificate chain and key, the federation CA that client certificates must chain
/// to, and the certificate revocation lists to check them against.
pub struct TlsMaterial {
    /// The broker's certificate chain, leaf first.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The broker's private key.
    pub key: PrivateKeyDer<'static>,
    /// The federation CA certificates.
    pub client_ca: Vec<CertificateDer<'static>>,
    /// Revocation lists issued by the federation CA (may be empty).
    pub crls: Vec<CertificateRevocationListDer<'static>>,
}

impl fmt::Debug for TlsMaterial {
    // The private key never reaches a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("cert_chain", &self.cert_chain.len())
            .field("key", &"<redacted>")
            .field("client_ca", &self.client_ca.len())
            .field("crls", &self.crls.len())
            .finish()
    }
}

/// The files the TLS material is read from, as absolute or working-directory-relative paths
/// (already resolved against the configuration file's directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The broker's certificate chain (`tls.cert`).
    pub cert: PathBuf,
    /// The broker's private key (`tls.key`).
    pub key: PathBuf,
    /// The federation CA (`tls.client_ca`).
    pub client_ca: PathBuf,
    /// The revocation lists (`tls.crl`), if any.
    pub crl: Option<PathBuf>,
}

/// Why the TLS files could not be loaded: which file, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", file.display())]
pub struct TlsFileError {
    /// The file.
    pub file: PathBuf,
    /// What is wrong.
    pub problem: String,
}

impl TlsFiles {
    /// The files in the order they are read, each with its configuration key.
    pub fn all(&self) -> Vec<(&'static str, &Path)> {
        let mut files = vec![
            ("tls.cert", self.cert.as_path()),
            ("tls.key", self.key.as_path()),
            ("tls.client_ca", self.client_ca.as_path()),
        ];
        if let Some(crl) = &self.crl {
            files.push(("tls.crl", crl.as_path()));
        }
        files
    }

    /// Reads and parses the files. The error names the file that is wrong.
    pub fn load(&self) -> Result<TlsMaterial, TlsFileError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|e| TlsFileError {
                file: path.to_path_buf(),
                problem: format!("cannot read: {e}"),
            })
        };
        let cert = read(&self.cert)?;
        let key = read(&self.key)?;
        let client_ca = read(&self.client_ca)?;
        let crl = self.crl.as_deref().map(read).transpose()?;
        TlsMaterial::from_pem(&cert, &key, &client_ca, crl.as_deref()).map_err(
            |(which, problem)| TlsFileError {
                file: match which {
                    "cert" => self.cert.clone(),
                    "key" => self.key.clone(),
                    "client_ca" => self.client_ca.clone(),
                    _ => self.crl.clone().unwrap_or_default(),
                },
                problem,
            },
        )
    }
}

impl TlsMaterial {
    /// Parses PEM text: the broker's certificate chain and key, the client CA and optional CRLs.
    /// The error names which of the four is wrong.
    pub fn from_pem(
        cert: &[u8],
        key: &[u8],
        client_ca: &[u8],
        crl: Option<&[u8]>,
    ) -> Result<Self, (&'static str, String)> {
        let cert_chain = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ("cert", format!("not a PEM certificate chain: {e}")))?;
        if cert_chain.is_empty() {
            return Err(("cert", "contains no certificate".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| ("key", format!("not a PEM private key: {e}")))?;
        let client_ca = CertificateDer::pem_slice_iter(client_ca)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ("client_ca", format!("not a PEM certificate: {e}")))?;
        if client_ca.is_empty() {
            return Err(("client_ca", "contains no certificate".into()));
        }
        let crls = match crl {
            None => Vec::new(),
            Some(pem) => {
                let crls = CertificateRevocationListDer::pem_slice_iter(pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| ("crl", format!("not a PEM CRL: {e}")))?;
                if crls.is_empty() {
                    return Err(("crl", "contains no CRL".into()));
                }
                crls
            }
        };
        Ok(TlsMaterial {
            cert_chain,
            key,
            client_ca,
            crls,
        })
    }
}

impl Config {
    /// A configuration built in code (tests, the demo): default limits, no auditors.
    pub fn new(
        listen: SocketAddr,
        data_dir: PathBuf,
        tls: TlsMaterial,
        agencies: BTreeMap<AgencyId, Agency>,
    ) -> Self {
        // The policy knows the federation's agencies (recipients are checked against them).
        let policy = Policy {
            agencies: agencies.keys().cloned().collect(),
            ..Policy::default()
        };
        Config {
            source: "<in code>".into(),
            listen,
            data_dir,
            storage: StorageEngine::Sled,
            tls,
            tls_files: None,
            tls_reload_poll: None,
            agencies,
            auditors: BTreeSet::new(),
            limits: Limits::default(),
            policy,
            digest: [0; 32],
            log_origin: crate::audit_log::DEFAULT_ORIGIN.into(),
            metrics_listen: None,
            registry: Arc::new(Registry::default()),
            log_format: crate::logging::LogFormat::default(),
            file: None,
        }
    }

    /// Loads and validates the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut config = Self::parse(&text, &file, &Disk { base })?;
        config.file = Some(ConfigFile {
            path: path.to_path_buf(),
            listen: config.listen,
            data_dir: config.data_dir.clone(),
        });
        Ok(config)
    }

    /// Validates `text` as the configuration file at `path` would be (relative paths against
    /// its directory), without reading `path` itself: what a tool that edits the file checks
    /// before it writes (`concordat agreement reviewed`).
    pub fn parse_as(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::parse(text, &path.display().to_string(), &Disk { base })
    }

    /// The embedded default: the development PKI, `./var/broker`, 127.0.0.1:7443, and the
    /// federation of `ico`, `ncsc` and `nca`.
    pub fn embedded_default() -> Result<Self, ConfigError> {
        let mut config = Self::parse(DEFAULT_CONFIG, "<embedded default>", &Embedded)?;
        // Compiled in: there is nothing to reload.
        config.tls_files = None;
        config.tls_reload_poll = None;
        Ok(config)
    }

    /// Parses configuration text. `file` names it in errors; `files` resolves the paths it names.
    pub fn parse(text: &str, file: &str, files: &dyn FileSource) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            file: file.into(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let invalid = |key: &str, problem: String| ConfigError::Invalid {
            file: file.into(),
            key: key.into(),
            problem,
        };

        let listen = raw.listen.parse().map_err(|e| {
            invalid(
                "listen",
                format!("{:?} is not an address:port ({e})", raw.listen),
            )
        })?;
        if raw.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty".into()));
        }
        let data_dir = files.resolve(&raw.data_dir);
        let storage =
            storage_engine(raw.storage, files).map_err(|(key, problem)| invalid(key, problem))?;

        let read = |key: &str, path: &Path| {
            files
                .read(path)
                .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))
        };
        // A PASERK public key given inline (`key`) or in a file (`key_file`), exactly one of
        // the two; `at` names a key of the table it is in.
        let public_key = |at: &dyn Fn(&str) -> String,
                          key: Option<String>,
                          key_file: Option<PathBuf>|
         -> Result<PublicKey, ConfigError> {
            let text = match (key, key_file) {
                (Some(k), None) => k,
                (None, Some(path)) => {
                    let bytes = read(&at("key_file"), &path)?;
                    String::from_utf8(bytes)
                        .map_err(|_| invalid(&at("key_file"), "is not UTF-8 text".into()))?
                        .trim()
                        .to_owned()
                }
                _ => {
                    return Err(invalid(
                        &at("key"),
                        "give exactly one of key and key_file".into(),
                    ));
                }
            };
            text.parse()
                .map_err(|e| invalid(&at("key"), format!("not a PASERK k4.public key: {e}")))
        };
        let cert = read("tls.cert", &raw.tls.cert)?;
        let key = read("tls.key", &raw.tls.key)?;
        let client_ca = read("tls.client_ca", &raw.tls.client_ca)?;
        let crl = raw
            .tls
            .crl
            .as_deref()
            .map(|p| read("tls.crl", p))
            .transpose()?;
        let tls = TlsMaterial::from_pem(&cert, &key, &client_ca, crl.as_deref()).map_err(
            |(which, problem)| {
                // The file too, as a reload's errors name it.
                let path = match which {
                    "cert" => Some(&raw.tls.cert),
                    "key" => Some(&raw.tls.key),
                    "client_ca" => Some(&raw.tls.client_ca),
                    _ => raw.tls.crl.as_ref(),
                };
                let problem = match path {
                    Some(p) => format!("{}: {problem}", files.resolve(p).display()),
                    None => problem,
                };
                invalid(&format!("tls.{which}"), problem)
            },
        )?;
        let tls_files = Some(TlsFiles {
            cert: files.resolve(&raw.tls.cert),
            key: files.resolve(&raw.tls.key),
            client_ca: files.resolve(&raw.tls.client_ca),
            crl: raw.tls.crl.as_deref().map(|p| files.resolve(p)),
        });
        let tls_reload_poll = match raw.tls.reload_poll_seconds {
            0 => None,
            s if s > 86_400 => {
                return Err(invalid(
                    "tls.reload_poll_seconds",
                    format!("must be at most 86400 (0 turns polling off), got {s}"),
                ));
            }
            s => Some(Duration::from_secs(s)),
        };

        if raw.agencies.is_empty() {
            return Err(invalid(
                "agencies",
                "at least one agency must be declared".into(),
            ));
        }
        let mut agencies = BTreeMap::new();
        for (i, a) in raw.agencies.into_iter().enumerate() {
            let id: AgencyId = a
                .id
                .parse()
                .map_err(|e| invalid(&format!("agencies[{i}].id"), format!("{:?} {e}", a.id)))?;
            if a.name.trim().is_empty() {
                return Err(invalid(
                    &format!("agencies[{i}].name"),
                    "must not be empty".into(),
                ));
            }
            if agencies
                .insert(id.clone(), Agency { name: a.name })
                .is_some()
            {
                return Err(invalid(
                    &format!("agencies[{i}].id"),
                    format!("{id} is declared twice"),
                ));
            }
        }
        let mut auditors = BTreeSet::new();
        for (i, a) in raw.auditors.into_iter().enumerate() {
            let key = format!("auditors[{i}]");
            let id: AgencyId = a.parse().map_err(|e| invalid(&key, format!("{a:?} {e}")))?;
            if agencies.contains_key(&id) {
                return Err(invalid(
                    &key,
                    format!("{id} is also an agency; use a separate certificate"),
                ));
            }
            if !auditors.insert(id.clone()) {
                return Err(invalid(&key, format!("{id} is listed twice")));
            }
        }

        let max = raw.limits.max_message_bytes;
        if max == 0 || max > MAX_MESSAGE_BYTES_CEILING {
            return Err(invalid(
                "limits.max_message_bytes",
                format!("must be between 1 and {MAX_MESSAGE_BYTES_CEILING}, got {max}"),
            ));
        }
        if raw.limits.max_queue_depth == 0 {
            return Err(invalid(
                "limits.max_queue_depth",
                "must be at least 1".into(),
            ));
        }
        if raw.limits.max_window == 0 || raw.limits.max_window > 4096 {
            return Err(invalid(
                "limits.max_window",
                format!("must be between 1 and 4096, got {}", raw.limits.max_window),
            ));
        }
        if !(100..=600_000).contains(&raw.limits.flush_timeout_ms) {
            return Err(invalid(
                "limits.flush_timeout_ms",
                format!(
                    "must be between 100 and 600000 (10 minutes), got {}",
                    raw.limits.flush_timeout_ms
                ),
            ));
        }
        let ranged = |key: &str, value: u64, min: u64, max: u64| {
            if value < min || value > max {
                Err(invalid(
                    &format!("limits.{key}"),
                    format!("must be between {min} and {max}, got {value}"),
                ))
            } else {
                Ok(value)
            }
        };
        let connections = ConnectionLimits {
            max_handshakes_per_source: ranged(
                "max_handshakes_per_source",
                raw.limits.max_handshakes_per_source,
                1,
                1_000_000,
            )? as usize,
            max_connections: ranged("max_connections", raw.limits.max_connections, 1, 10_000_000)?
                as usize,
            handshake_timeout: Duration::from_millis(ranged(
                "handshake_timeout_ms",
                raw.limits.handshake_timeout_ms,
                100,
                60_000,
            )?),
            preface_timeout: Duration::from_millis(ranged(
                "preface_timeout_ms",
                raw.limits.preface_timeout_ms,
                100,
                60_000,
            )?),
        };
        let limits = Limits {
            max_message_bytes: max,
            max_queue_depth: raw.limits.max_queue_depth,
            max_window: raw.limits.max_window,
            min_free_bytes: raw.limits.min_free_bytes,
            flush_timeout: std::time::Duration::from_millis(raw.limits.flush_timeout_ms),
            connections,
        };

        let metrics_listen = raw
            .metrics_listen
            .as_deref()
            .map(|a| {
                a.parse::<SocketAddr>().map_err(|e| {
                    invalid(
                        "metrics_listen",
                        format!("{a:?} is not an address:port ({e})"),
                    )
                })
            })
            .transpose()?;
        let log_origin = raw
            .log_origin
            .unwrap_or_else(|| crate::audit_log::DEFAULT_ORIGIN.into());
        if log_origin.is_empty()
            || log_origin.len() > 128
            || log_origin
                .chars()
                .any(|c| c.is_whitespace() || c == '+' || c.is_control())
        {
            return Err(invalid(
                "log_origin",
                "must be 1 to 128 characters without spaces or '+'".into(),
            ));
        }
        let mut policy = Policy {
            clock_skew: time::Duration::seconds(i64::from(raw.clock_skew_seconds)),
            enforce_review: raw.enforce_review,
            agencies: agencies.keys().cloned().collect(),
            ..Policy::default()
        };
        if raw.clock_skew_seconds > 3600 {
            return Err(invalid("clock_skew_seconds", "must be at most 3600".into()));
        }
        if let Some(text) = &raw.workflows.dsar_reminder_before {
            let d = humantime::parse_duration(text)
                .map_err(|e| invalid("workflows.dsar_reminder_before", e.to_string()))?;
            if d > std::time::Duration::from_secs(365 * 24 * 3600) {
                return Err(invalid(
                    "workflows.dsar_reminder_before",
                    "must be at most a year".into(),
                ));
            }
            policy.workflows.reminder_before = time::Duration::try_from(d)
                .map_err(|_| invalid("workflows.dsar_reminder_before", "is out of range".into()))?;
        }
        for (i, issuer) in raw.consent_issuers.into_iter().enumerate() {
            let at = |k: &str| format!("consent_issuers[{i}].{k}");
            let key = public_key(&at, issuer.key, issuer.key_file)?;
            let agency = match issuer.agency {
                None => None,
                Some(a) => {
                    let id: AgencyId = a
                        .parse()
                        .map_err(|e| invalid(&at("agency"), format!("{a:?} {e}")))?;
                    if !agencies.contains_key(&id) {
                        return Err(invalid(
                            &at("agency"),
                            format!("{id} is not a declared agency"),
                        ));
                    }
                    Some(id)
                }
            };
            let organisations = if issuer.organisations.iter().any(|o| o == "*") {
                if issuer.organisations.len() > 1 {
                    return Err(invalid(
                        &at("organisations"),
                        "\"*\" must stand alone".into(),
                    ));
                }
                if agency.is_none() {
                    return Err(invalid(
                        &at("organisations"),
                        "only an agency's consent desk may speak for every organisation; list the organisations".into(),
                    ));
                }
                Organisations::Any
            } else if issuer.organisations.is_empty() {
                return Err(invalid(
                    &at("organisations"),
                    "must list organisations or be [\"*\"]".into(),
                ));
            } else {
                let mut set = BTreeSet::new();
                for o in &issuer.organisations {
                    set.insert(
                        o.parse::<OrgId>()
                            .map_err(|e| invalid(&at("organisations"), format!("{o:?} {e}")))?,
                    );
                }
                Organisations::Only(set)
            };
            let key_id = key.key_id();
            if policy.issuers.contains_key(&key_id) {
                return Err(invalid(&at("key"), format!("{key_id} is declared twice")));
            }
            policy.issuers.insert(
                key_id,
                ConsentIssuer {
                    key,
                    agency,
                    organisations,
                },
            );
        }
        for (i, o) in raw.significance_officers.into_iter().enumerate() {
            let at = |k: &str| format!("significance_officers[{i}].{k}");
            if o.id.trim().is_empty()
                || o.id.len() > 64
                || o.id.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(invalid(
                    &at("id"),
                    "must be 1 to 64 characters without spaces".into(),
                ));
            }
            let agency: AgencyId = o
                .agency
                .parse()
                .map_err(|e| invalid(&at("agency"), format!("{:?} {e}", o.agency)))?;
            if !agencies.contains_key(&agency) {
                return Err(invalid(
                    &at("agency"),
                    format!("{agency} is not a declared agency"),
                ));
            }
            let key = public_key(&at, o.key, o.key_file)?;
            let key_id = key.key_id();
            if policy.significance_officers.contains_key(&key_id)
                || policy.issuers.contains_key(&key_id)
            {
                return Err(invalid(
                    &at("key"),
                    format!("{key_id} is declared twice (an officer's key is no other key)"),
                ));
            }
            if let Some(other) = policy
                .significance_officers
                .values()
                .find(|x| x.id == o.id && x.agency != agency)
            {
                return Err(invalid(
                    &at("id"),
                    format!("{} is already an officer of {}", o.id, other.agency),
                ));
            }
            policy.significance_officers.insert(
                key_id,
                Officer {
                    id: o.id,
                    agency,
                    key,
                },
            );
        }
        let mut agreement_ids = BTreeSet::new();
        for (i, a) in raw.agreements.into_iter().enumerate() {
            let at = |k: &str| format!("agreements[{i}].{k}");
            if a.id.trim().is_empty() || a.id.len() > 64 || a.id.chars().any(|c| c.is_whitespace())
            {
                return Err(invalid(
                    &at("id"),
                    "must be 1 to 64 characters without spaces".into(),
                ));
            }
            if !agreement_ids.insert(a.id.clone()) {
                return Err(invalid(&at("id"), format!("{} is declared twice", a.id)));
            }
            let mut parties = BTreeSet::new();
            for p in &a.parties {
                let id: AgencyId = p
                    .parse()
                    .map_err(|e| invalid(&at("parties"), format!("{p:?} {e}")))?;
                if !agencies.contains_key(&id) {
                    return Err(invalid(
                        &at("parties"),
                        format!("{id} is not a declared agency"),
                    ));
                }
                parties.insert(id);
            }
            if parties.len() < 2 {
                return Err(invalid(
                    &at("parties"),
                    "an agreement needs at least two parties".into(),
                ));
            }
            let signed = toml_date(&a.signed).map_err(|p| invalid(&at("signed"), p))?;
            // The review date: explicit, or two years after the last review or the signing.
            let explicit = a
                .review_by
                .as_ref()
                .map(|d| toml_date(d).map_err(|p| invalid(&at("review_by"), p)))
                .transpose()?;
            if explicit.is_some_and(|d| d < signed) {
                return Err(invalid(
                    &at("review_by"),
                    "is before the signing date".into(),
                ));
            }
            let reviewed = a
                .reviewed
                .as_ref()
                .map(|d| toml_date(d).map_err(|p| invalid(&at("reviewed"), p)))
                .transpose()?;
            if reviewed.is_some_and(|d| d < signed) {
                return Err(invalid(
                    &at("reviewed"),
                    format!("is before the signing date {signed}"),
                ));
            }
            let (review_by, basis) =
                crate::policy::agreements::review_due(signed, reviewed, explicit);
            let days = |key: &str, value: Option<u32>, default: u32| {
                let value = value.unwrap_or(default);
                u16::try_from(value)
                    .ok()
                    .filter(|d| *d <= MAX_REVIEW_DAYS)
                    .ok_or_else(|| {
                        invalid(
                            &at(key),
                            format!("must be between 0 and {MAX_REVIEW_DAYS} days, got {value}"),
                        )
                    })
            };
            let review = crate::policy::ReviewTerms {
                basis,
                warning_days: days(
                    "review_warning_days",
                    a.review_warning_days,
                    raw.review_warning_days,
                )?,
                grace_days: days(
                    "review_grace_days",
                    a.review_grace_days,
                    u32::from(crate::policy::agreements::DEFAULT_REVIEW_GRACE_DAYS),
                )?,
            };
            let mut flows = Vec::new();
            for (j, f) in a.flows.into_iter().enumerate() {
                let fat = |k: &str| format!("agreements[{i}].flows[{j}].{k}");
                let from: AgencyId = f
                    .from
                    .parse()
                    .map_err(|e| invalid(&fat("from"), format!("{:?} {e}", f.from)))?;
                let to: AgencyId =
                    f.to.parse()
                        .map_err(|e| invalid(&fat("to"), format!("{:?} {e}", f.to)))?;
                for (k, id) in [("from", &from), ("to", &to)] {
                    if !parties.contains(id) {
                        return Err(invalid(
                            &fat(k),
                            format!("{id} is not a party to this agreement"),
                        ));
                    }
                }
                if from == to {
                    return Err(invalid(
                        &fat("to"),
                        "a flow needs two different agencies".into(),
                    ));
                }
                let mut kinds = BTreeSet::new();
                for k in &f.kinds {
                    kinds.insert(
                        k.parse::<Kind>()
                            .map_err(|e| invalid(&fat("kinds"), e.to_string()))?,
                    );
                }
                if kinds.is_empty() {
                    return Err(invalid(&fat("kinds"), "must name at least one kind".into()));
                }
                if f.clause.trim().is_empty() {
                    return Err(invalid(
                        &fat("clause"),
                        "must cite the clause that permits the flow".into(),
                    ));
                }
                let max_tlp = f
                    .max_tlp
                    .as_deref()
                    .map(|t| {
                        t.parse::<Tlp>().map_err(|_| {
                            invalid(
                                &fat("max_tlp"),
                                format!(
                                    "{t:?} is not a TLP level (clear, green, amber, amber+strict, \
                                     red)"
                                ),
                            )
                        })
                    })
                    .transpose()?;
                let legal_bases = match &f.legal_bases {
                    None => LegalBases::default(),
                    Some(names) => {
                        let mut bases = Vec::with_capacity(names.len());
                        for name in names {
                            let basis: LegalBasis =
                                name.parse().map_err(|e| invalid(&fat("legal_bases"), e))?;
                            if bases.contains(&basis) {
                                return Err(invalid(
                                    &fat("legal_bases"),
                                    format!("names {basis} twice"),
                                ));
                            }
                            bases.push(basis);
                        }
                        LegalBases::of(&bases)
                    }
                };
                let consent_refusal_note = match f.consent_refusal_note {
                    Some(n) if n.trim().is_empty() || n.len() > 1000 => {
                        return Err(invalid(
                            &fat("consent_refusal_note"),
                            "must be a sentence of 1 to 1000 characters".into(),
                        ));
                    }
                    other => other.map(|n| n.trim().to_owned()),
                };
                flows.push(Flow {
                    from,
                    to,
                    kinds,
                    clause: f.clause,
                    opaque: f.opaque,
                    max_tlp,
                    legal_bases,
                    consent_refusal_note,
                });
            }
            if flows.is_empty() {
                return Err(invalid(
                    &at("flows"),
                    "an agreement must permit at least one flow".into(),
                ));
            }
            if let Some(days) = a.dsar_response_days {
                if !(1..=366).contains(&days) {
                    return Err(invalid(
                        &at("dsar_response_days"),
                        "must be 1 to 366 days".into(),
                    ));
                }
                policy.workflows.response_days.insert(a.id.clone(), days);
            }
            policy.agreements.push(Agreement {
                id: a.id,
                title: a.title,
                parties,
                signed,
                review_by,
                review,
                flows,
            });
        }

        let registry = Arc::new(load_registry(
            raw.organisations,
            raw.organisations_file.as_deref(),
            file,
            files,
        )?);

        use sha2::Digest;
        Ok(Config {
            source: file.into(),
            listen,
            data_dir,
            storage,
            tls,
            tls_files,
            tls_reload_poll,
            agencies,
            auditors,
            limits,
            policy,
            digest: sha2::Sha256::digest(text.as_bytes()).into(),
            log_origin,
            metrics_listen,
            registry,
            log_format: raw.log_format,
            file: None,
        })
    }

    /// A short human-readable summary, as `check-config` prints it.
    pub fn summary(&self) -> String {
        use fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "configuration: {}", self.source);
        let _ = writeln!(s, "listen:        {}", self.listen);
        let _ = writeln!(s, "data_dir:      {}", self.data_dir.display());
        let _ = match &self.storage {
            StorageEngine::Sled => writeln!(
                s,
                "store:         sled in {}",
                self.data_dir.join("db").display()
            ),
            StorageEngine::Postgres(pg) => writeln!(
                s,
                "store:         PostgreSQL at {} ({} pooled connections{})",
                postgres_hosts(&pg.url),
                pg.pool,
                pg.ca_file
                    .as_ref()
                    .map_or(String::new(), |f| format!(", CA {}", f.display()))
            ),
        };
        let _ = writeln!(s, "audit log:     {}", self.log_origin);
        let _ = writeln!(
            s,
            "metrics:       {}",
            self.metrics_listen
                .map_or("off".to_owned(), |a| format!("http://{a}/metrics"))
        );
        let _ = writeln!(
            s,
            "tls:           {} certificate(s) in chain, {} client CA(s), {} CRL(s)",
            self.tls.cert_chain.len(),
            self.tls.client_ca.len(),
            self.tls.crls.len()
        );
        let _ = writeln!(s, "agencies:      {}", self.agencies.len());
        for (id, a) in &self.agencies {
            let _ = writeln!(s, "  {id:<12} {}", a.name);
        }
        let auditors: Vec<&str> = self.auditors.iter().map(AgencyId::as_str).collect();
        let _ = writeln!(s, "auditors:      {}", auditors.join(", "));
        let _ = writeln!(s, "max message:   {} bytes", self.limits.max_message_bytes);
        let _ = writeln!(
            s,
            "max queue:     {} items per recipient",
            self.limits.max_queue_depth
        );
        let _ = writeln!(
            s,
            "max window:    {} deliveries in flight",
            self.limits.max_window
        );
        let _ = writeln!(
            s,
            "storage:       Send refused below {} bytes free; flushes bounded to {} ms",
            self.limits.min_free_bytes,
            self.limits.flush_timeout.as_millis()
        );
        let c = &self.limits.connections;
        let _ = writeln!(
            s,
            "connections:   at most {}, {} handshakes per source address; TLS within {:?}, HTTP/2 preface within {:?}",
            c.max_connections, c.max_handshakes_per_source, c.handshake_timeout, c.preface_timeout
        );
        let _ = writeln!(
            s,
            "tls reload:    on SIGHUP{}",
            self.tls_reload_poll.map_or(String::new(), |p| format!(
                " and when the files change (looked at every {p:?})"
            ))
        );
        let identifiers_only = self
            .registry
            .organisations()
            .iter()
            .filter(|o| o.match_on == crate::registry::MatchOn::Identifiers)
            .count();
        let _ = writeln!(
            s,
            "organisations: {} registered ({identifiers_only} matched by identifiers only)",
            self.registry.len()
        );
        let _ = writeln!(
            s,
            "significance officers: {}",
            self.policy.significance_officers.len()
        );
        let _ = writeln!(s, "consent issuers: {}", self.policy.issuers.len());
        let mut issuers: Vec<_> = self.policy.issuers.iter().collect();
        issuers.sort_by_key(|(id, _)| id.to_string());
        for (id, issuer) in issuers {
            let desk = issuer
                .agency
                .as_ref()
                .map_or("(organisation key)".to_owned(), |a| {
                    format!("consent desk of {a}")
                });
            let orgs = match &issuer.organisations {
                Organisations::Any => "any organisation".to_owned(),
                Organisations::Only(set) => {
                    set.iter().map(OrgId::as_str).collect::<Vec<_>>().join(", ")
                }
            };
            let _ = writeln!(s, "  {id}  {desk}; for {orgs}");
        }
        let workflows = &self.policy.workflows;
        let _ = writeln!(
            s,
            "workflows:     consulted agencies reminded {} before a deadline; answers due {} \
             days after a consultation opens unless its agreement sets dsar_response_days",
            humantime::format_duration(
                std::time::Duration::try_from(workflows.reminder_before).unwrap_or_default()
            ),
            crate::workflow::DEFAULT_DSAR_RESPONSE_DAYS
        );
        let today = time::OffsetDateTime::now_utc().date();
        let _ = writeln!(
            s,
            "agreements:    {} (reviews {})",
            self.policy.agreements.len(),
            if self.policy.enforce_review {
                "enforced"
            } else {
                "not enforced"
            }
        );
        for a in &self.policy.agreements {
            let parties: Vec<&str> = a.parties.iter().map(AgencyId::as_str).collect();
            let stage = a.review_stage(today);
            let status = if !a.in_force(today) {
                "not yet in force".to_owned()
            } else {
                match stage {
                    ReviewStage::Current => "in force; review current".to_owned(),
                    ReviewStage::Due => "in force; review DUE".to_owned(),
                    ReviewStage::Overdue => "in force; review OVERDUE (within grace)".to_owned(),
                    ReviewStage::Lapsed if self.policy.enforce_review => {
                        "review LAPSED: its flows are refused".to_owned()
                    }
                    ReviewStage::Lapsed => "in force; review LAPSED (not enforced)".to_owned(),
                }
            };
            let _ = writeln!(
                s,
                "  {} [{}] signed {}: {status}",
                a.id,
                parties.join(", "),
                a.signed,
            );
            let _ = writeln!(
                s,
                "    review: stage {stage}; review by {} ({}); warnings from {}; grace ends {}",
                a.review_by,
                a.review.basis,
                a.warning_from(),
                a.grace_end()
            );
            if let Some(days) = workflows.response_days.get(&a.id) {
                let _ = writeln!(
                    s,
                    "    subject-access consultations: answers due {days} days after opening"
                );
            }
            for f in &a.flows {
                let kinds: Vec<&str> = f.kinds.iter().map(|k| k.as_str()).collect();
                let _ = writeln!(
                    s,
                    "    {} -> {}: {}{}{}  ({})",
                    f.from,
                    f.to,
                    kinds.join(", "),
                    if f.opaque {
                        ", opaque payloads allowed"
                    } else {
                        ""
                    },
                    f.max_tlp
                        .map(|t| format!(", at most TLP:{}", t.as_str().to_uppercase()))
                        .unwrap_or_default(),
                    f.clause
                );
                if f.legal_bases != LegalBases::default() {
                    let _ = writeln!(
                        s,
                        "      legal bases for specific content: {}",
                        f.legal_bases
                    );
                }
                if let Some(note) = &f.consent_refusal_note {
                    let _ = writeln!(s, "      consent refusals add: {note}");
                }
            }
        }
        s
    }

    /// Warnings about the configuration as of `today`: agreements due, overdue or lapsed for
    /// review, one sentence each (the same as decisions under them carry).
    pub fn warnings(&self, today: time::Date) -> Vec<String> {
        self.policy
            .agreements
            .iter()
            .filter(|a| a.in_force(today))
            .filter_map(|a| a.review_warning(today, self.policy.enforce_review))
            .collect()
    }
}

/// Where the files a configuration names are read from.
pub trait FileSource {
    /// Reads the file at `path` (as written in the configuration).
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>>;
    /// Resolves a directory path written in the configuration.
    fn resolve(&self, path: &Path) -> PathBuf;
}

/// Files on disk, relative paths resolved against the configuration file's directory.
struct Disk {
    base: PathBuf,
}

impl FileSource for Disk {
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        std::fs::read(self.resolve(path))
    }
    fn resolve(&self, path: &Path) -> PathBuf {
        self.base.join(path)
    }
}

/// The development PKI compiled into the binary; directories relative to the working directory.
struct Embedded;

/// The embedded default configuration.
const DEFAULT_CONFIG: &str = include_str!("default.toml");

/// The files of `certs-dev/` that the embedded default names.
const EMBEDDED_FILES: &[(&str, &[u8])] = &[
    ("ca.pem", include_bytes!("../../certs-dev/ca.pem")),
    ("broker.pem", include_bytes!("../../certs-dev/broker.pem")),
    ("broker.key", include_bytes!("../../certs-dev/broker.key")),
    (
        "consent/ico.pub",
        include_bytes!("../../certs-dev/consent/ico.pub"),
    ),
    (
        "consent/ncsc.pub",
        include_bytes!("../../certs-dev/consent/ncsc.pub"),
    ),
    (
        "consent/nca.pub",
        include_bytes!("../../certs-dev/consent/nca.pub"),
    ),
];

impl FileSource for Embedded {
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        EMBEDDED_FILES
            .iter()
            .find(|(name, _)| Path::new(name) == path)
            .map(|(_, bytes)| bytes.to_vec())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "not embedded"))
    }
    fn resolve(&self, path: &Path) -> PathBuf {
        path.to_path_buf()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    engine: String,
    url: Option<String>,
    pool: Option<usize>,
    ca_file: Option<PathBuf>,
}

/// Validates `[storage]`; an error is the key and what is wrong with it.
fn storage_engine(
    raw: Option<RawStorage>,
    files: &dyn FileSource,
) -> Result<StorageEngine, (&'static str, String)> {
    let Some(raw) = raw else {
        return Ok(StorageEngine::Sled);
    };
    match raw.engine.as_str() {
        "sled" => {
            for (key, set) in [
                ("storage.url", raw.url.is_some()),
                ("storage.pool", raw.pool.is_some()),
                ("storage.ca_file", raw.ca_file.is_some()),
            ] {
                if set {
                    return Err((key, "applies to engine = \"postgres\" only".into()));
                }
            }
            Ok(StorageEngine::Sled)
        }
        "postgres" => {
            let Some(url) = raw.url else {
                return Err((
                    "storage.url",
                    "is required with engine = \"postgres\" (e.g. \"postgres://broker@db1,db2/concordat?target_session_attrs=read-write\")".into(),
                ));
            };
            // The parser's message never quotes the URL, which may hold a password.
            if let Err(e) = url.parse::<tokio_postgres::Config>() {
                return Err((
                    "storage.url",
                    format!("is not a PostgreSQL connection URL: {e}"),
                ));
            }
            let pool = raw.pool.unwrap_or(4);
            if !(1..=MAX_POSTGRES_POOL).contains(&pool) {
                return Err((
                    "storage.pool",
                    format!("is {pool}; it must be between 1 and {MAX_POSTGRES_POOL}"),
                ));
            }
            Ok(StorageEngine::Postgres(PostgresStorage {
                url,
                pool,
                ca_file: raw.ca_file.map(|p| files.resolve(&p)),
            }))
        }
        other => Err((
            "storage.engine",
            format!("{other:?} is not a storage engine: \"sled\" (the default) or \"postgres\""),
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: String,
    data_dir: PathBuf,
    storage: Option<RawStorage>,
    tls: RawTls,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    agencies: Vec<RawAgency>,
    #[serde(default)]
    auditors: Vec<String>,
    #[serde(default = "default_clock_skew")]
    clock_skew_seconds: u32,
    log_origin: Option<String>,
    metrics_listen: Option<String>,
    #[serde(default)]
    log_format: crate::logging::LogFormat,
    /// Absent: true, refusal on (a production configuration is strict; the embedded
    /// development default turns it off).
    #[serde(default = "default_enforce_review")]
    enforce_review: bool,
    /// The days before an agreement's review date from which decisions carry a warning.
    #[serde(default = "default_review_warning_days")]
    review_warning_days: u32,
    #[serde(default)]
    consent_issuers: Vec<RawIssuer>,
    #[serde(default)]
    agreements: Vec<RawAgreement>,
    #[serde(default)]
    significance_officers: Vec<RawOfficer>,
    #[serde(default)]
    organisations: Vec<RawOrganisation>,
    organisations_file: Option<PathBuf>,
    #[serde(default)]
    workflows: RawWorkflows,
}

/// `[workflows]`: the deadlines of the workflows the broker tracks (docs/workflows.md).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawWorkflows {
    /// How long before a consulted agency's deadline it is reminded, e.g. "3d"; "0s" for never.
    dsar_reminder_before: Option<String>,
}

fn default_clock_skew() -> u32 {
    60
}

fn default_enforce_review() -> bool {
    true
}

fn default_review_warning_days() -> u32 {
    u32::from(crate::policy::agreements::DEFAULT_REVIEW_WARNING_DAYS)
}

/// The longest warning window or grace period, in days: two years, the review interval.
pub const MAX_REVIEW_DAYS: u16 = 730;

/// Reads the registry: the `[[organisations]]` of the configuration, then those of
/// `organisations_file` (a TOML file of `[[organisations]]` tables, relative to the
/// configuration's directory). Errors name the file the entry is in and its key there.
fn load_registry(
    inline: Vec<RawOrganisation>,
    registry_file: Option<&Path>,
    file: &str,
    files: &dyn FileSource,
) -> Result<Registry, ConfigError> {
    // Each entry with the file and index it came from, for messages.
    let mut entries: Vec<(String, usize, RawOrganisation)> = inline
        .into_iter()
        .enumerate()
        .map(|(i, o)| (file.to_owned(), i, o))
        .collect();
    if let Some(path) = registry_file {
        let bytes = files.read(path).map_err(|e| ConfigError::Invalid {
            file: file.into(),
            key: "organisations_file".into(),
            problem: format!("cannot read {}: {e}", path.display()),
        })?;
        let name = files.resolve(path).display().to_string();
        let text = String::from_utf8(bytes).map_err(|_| ConfigError::Invalid {
            file: file.into(),
            key: "organisations_file".into(),
            problem: format!("{name} is not UTF-8 text"),
        })?;
        let raw: RawRegistryFile = toml::from_str(&text).map_err(|e| ConfigError::Syntax {
            file: name.clone(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        entries.extend(
            raw.organisations
                .into_iter()
                .enumerate()
                .map(|(i, o)| (name.clone(), i, o)),
        );
    }
    let mut organisations = Vec::with_capacity(entries.len());
    for (source, i, raw) in &entries {
        let spec = OrganisationSpec {
            id: raw.id.clone(),
            legal_name: raw.legal_name.clone(),
            other_names: raw.other_names.clone(),
            company_number: raw.company_number.clone(),
            charity_number: raw.charity_number.clone(),
            domains: raw.domains.clone(),
            email_domains: raw.email_domains.clone(),
            match_on: raw.match_on.clone(),
            not_names: raw.not_names.clone(),
        };
        let org = Organisation::new(spec).map_err(|e| registry_error(source, *i, e))?;
        organisations.push(org);
    }
    Registry::new(organisations).map_err(|e| match e {
        RegistryError::Duplicate { index, id } => {
            let (source, i) = entries
                .get(index)
                .map_or((file, index), |(s, i, _)| (s.as_str(), *i));
            ConfigError::Invalid {
                file: source.into(),
                key: format!("organisations[{i}].id"),
                problem: format!("{id} is registered twice"),
            }
        }
        other => registry_error(file, 0, other),
    })
}

fn registry_error(file: &str, index: usize, e: RegistryError) -> ConfigError {
    match e {
        RegistryError::Field { field, problem } => ConfigError::Invalid {
            file: file.into(),
            key: format!("organisations[{index}].{field}"),
            problem,
        },
        other => ConfigError::Invalid {
            file: file.into(),
            key: "organisations".into(),
            problem: other.to_string(),
        },
    }
}

/// A file named by `organisations_file`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistryFile {
    #[serde(default)]
    organisations: Vec<RawOrganisation>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOrganisation {
    id: String,
    legal_name: String,
    #[serde(default)]
    other_names: Vec<String>,
    company_number: Option<String>,
    charity_number: Option<String>,
    #[serde(default)]
    domains: Vec<String>,
    #[serde(default)]
    email_domains: Vec<String>,
    #[serde(rename = "match")]
    match_on: Option<String>,
    #[serde(default)]
    not_names: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIssuer {
    key: Option<String>,
    key_file: Option<PathBuf>,
    agency: Option<String>,
    #[serde(default)]
    organisations: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgreement {
    id: String,
    title: String,
    parties: Vec<String>,
    signed: toml::value::Datetime,
    /// Absent: two years after `reviewed`, or after `signed`.
    review_by: Option<toml::value::Datetime>,
    /// The last completed review.
    reviewed: Option<toml::value::Datetime>,
    /// Overrides the top-level `review_warning_days`.
    review_warning_days: Option<u32>,
    /// Days after `review_by` before a lapsed agreement's flows are refused (default 90).
    review_grace_days: Option<u32>,
    #[serde(default)]
    flows: Vec<RawFlow>,
    /// Days a consulted agency has to answer a subject-access consultation under this
    /// agreement, unless the request sets its own deadline.
    dsar_response_days: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlow {
    from: String,
    to: String,
    kinds: Vec<String>,
    clause: String,
    /// Whether the flow may carry payloads the broker cannot inspect.
    #[serde(default)]
    opaque: bool,
    /// The most restrictive TLP marking the flow may carry.
    #[serde(default)]
    max_tlp: Option<String>,
    /// The legal bases for organisation- or incident-specific content; absent: consent.
    legal_bases: Option<Vec<String>>,
    /// A sentence appended to every consent refusal on this flow.
    consent_refusal_note: Option<String>,
}

/// `[[significance_officers]]`: an officer who may designate incidents of national
/// significance for an agency.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOfficer {
    id: String,
    agency: String,
    key: Option<String>,
    key_file: Option<PathBuf>,
}

/// A TOML local date (`2023-09-12`, unquoted) as a `time::Date`.
fn toml_date(d: &toml::value::Datetime) -> Result<time::Date, String> {
    match (d.date, d.time, d.offset) {
        (Some(date), None, None) => {
            let month = time::Month::try_from(date.month).map_err(|e| e.to_string())?;
            time::Date::from_calendar_date(i32::from(date.year), month, date.day)
                .map_err(|e| e.to_string())
        }
        _ => Err(format!(
            "{d} is not a date such as 2024-09-10 (unquoted, no time)"
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
    crl: Option<PathBuf>,
    #[serde(default = "default_reload_poll_seconds")]
    reload_poll_seconds: u64,
}

fn default_reload_poll_seconds() -> u64 {
    DEFAULT_TLS_RELOAD_POLL.as_secs()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    max_message_bytes: usize,
    max_queue_depth: u64,
    max_window: u32,
    min_free_bytes: u64,
    flush_timeout_ms: u64,
    max_handshakes_per_source: u64,
    max_connections: u64,
    handshake_timeout_ms: u64,
    preface_timeout_ms: u64,
}

impl Default for RawLimits {
    fn default() -> Self {
        let d = Limits::default();
        RawLimits {
            max_message_bytes: d.max_message_bytes,
            max_queue_depth: d.max_queue_depth,
            max_window: d.max_window,
            min_free_bytes: d.min_free_bytes,
            flush_timeout_ms: u64::try_from(d.flush_timeout.as_millis()).unwrap_or(u64::MAX),
            max_handshakes_per_source: d.connections.max_handshakes_per_source as u64,
            max_connections: d.connections.max_connections as u64,
            handshake_timeout_ms: d.connections.handshake_timeout.as_millis() as u64,
            preface_timeout_ms: d.connections.preface_timeout.as_millis() as u64,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgency {
    id: String,
    name: String,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::embedded_default().expect("embedded default must load");
        assert_eq!(c.listen, "127.0.0.1:7443".parse().unwrap());
        assert_eq!(c.data_dir, PathBuf::from("./var/broker"));
        let ids: Vec<&str> = c.agencies.keys().map(AgencyId::as_str).collect();
        assert_eq!(ids, ["ico", "nca", "ncsc"]);
        assert!(c.auditors.contains(&"auditor".parse().unwrap()));
        assert_eq!(c.limits.max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES);
    }

    /// Each row: a change to the default configuration text and the key its error must name.
    /// The default flows model the MoUs' legal bases, and officers' keys are read.
    #[test]
    fn legal_bases_and_significance_officers_are_read() {
        use crate::policy::LegalBasis::{Consent, NationalSignificance};
        let c = Config::embedded_default().unwrap();
        let bases = |from: &str, to: &str, kind: Kind| {
            c.policy
                .agreements
                .iter()
                .flat_map(|a| &a.flows)
                .find(|f| f.from.as_str() == from && f.to.as_str() == to && f.kinds.contains(&kind))
                .map(|f| f.legal_bases.clone())
                .unwrap()
        };
        let incident = Kind::IncidentRecord;
        assert_eq!(
            bases("ico", "ncsc", incident),
            LegalBases::of(&[NationalSignificance])
        );
        assert_eq!(bases("ncsc", "ico", incident), LegalBases::of(&[Consent]));
        assert_eq!(bases("nca", "ico", incident), LegalBases::of(&[Consent]));
        assert_eq!(bases("ico", "nca", incident), LegalBases::of(&[Consent]));
        // Absent, a flow accepts consent, as every flow did before legal bases existed.
        assert_eq!(
            bases("ncsc", "ico", Kind::ThreatAssessment),
            LegalBases::default()
        );
        assert!(c.policy.significance_officers.is_empty());

        let key = concordat_proto::paserk::SecretKey::generate();
        let text = DEFAULT_CONFIG.replacen(
            "# The MoUs, as code.",
            &format!(
                "[[significance_officers]]\nid = \"ico-duty\"\nagency = \"ico\"\nkey = \"{}\"\n\
                 [[significance_officers]]\nid = \"ico-duty\"\nagency = \"ncsc\"\nkey = \"{}\"\n#",
                key.public(),
                concordat_proto::paserk::SecretKey::generate().public()
            ),
            1,
        );
        let err = Config::parse(&text, "test.toml", &Embedded).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("test.toml: significance_officers[1].id: "),
            "{err}"
        );
        let text = text.replacen(
            "id = \"ico-duty\"\nagency = \"ncsc\"",
            "id = \"ncsc-duty\"\nagency = \"ncsc\"",
            1,
        );
        let c = Config::parse(&text, "test.toml", &Embedded).unwrap();
        let officer = &c.policy.significance_officers[&key.key_id()];
        assert_eq!(
            (officer.id.as_str(), officer.agency.as_str()),
            ("ico-duty", "ico")
        );
        assert_eq!(c.policy.significance_officers.len(), 2);
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "listen = \"127.0.0.1:7443\"",
                "listen = \"nowhere\"",
                "listen",
            ),
            (
                "client_ca = \"ca.pem\"",
                "client_ca = \"missing.pem\"",
                "tls.client_ca",
            ),
            ("cert = \"broker.pem\"", "cert = \"broker.key\"", "tls.cert"),
            ("id = \"nca\"", "id = \"N C A\"", "agencies[2].id"),
            ("id = \"nca\"", "id = \"ico\"", "agencies[2].id"),
            (
                "auditors = [\"auditor\"]",
                "auditors = [\"ico\"]",
                "auditors[0]",
            ),
            (
                "max_message_bytes = 4194304",
                "max_message_bytes = 0",
                "limits.max_message_bytes",
            ),
            (
                "max_message_bytes = 4194304",
                "max_message_bytes = 4194304\nhandshake_timeout_ms = 0",
                "limits.handshake_timeout_ms",
            ),
            (
                "max_message_bytes = 4194304",
                "max_message_bytes = 4194304\nmax_handshakes_per_source = 0",
                "limits.max_handshakes_per_source",
            ),
            (
                "client_ca = \"ca.pem\"",
                "client_ca = \"ca.pem\"\nreload_poll_seconds = 100000",
                "tls.reload_poll_seconds",
            ),
            (
                "company_number = \"01234567\"",
                "company_number = \"1234\"",
                "organisations[0].company_number",
            ),
            (
                "id = \"globex-plc\"",
                "id = \"acme-ltd\"",
                "organisations[1].id",
            ),
            (
                "legal_name = \"Globex PLC\"",
                "legal_name = \" \"",
                "organisations[1].legal_name",
            ),
            (
                "domains = [\"globex.example\"]",
                "domains = [\"globex\"]",
                "organisations[1].domains[0]",
            ),
            (
                "domains = [\"globex.example\"]",
                "domains = [\"globex.example\"]\nmatch = \"names\"",
                "organisations[1].match",
            ),
            (
                "clause = \"Information sharing: relevant cyber threat information\"",
                "clause = \"x\"\nmax_tlp = \"orange\"",
                "agreements[0].flows[0].max_tlp",
            ),
            (
                "legal_bases = [\"national_significance\"]",
                "legal_bases = [\"gdpr\"]",
                "agreements[0].flows[4].legal_bases",
            ),
            (
                "signed = 2023-09-12",
                "signed = 2023-09-12\ndsar_response_days = 0",
                "agreements[0].dsar_response_days",
            ),
            (
                "# The MoUs, as code.",
                "[workflows]\ndsar_reminder_before = \"soon\"\n# The MoUs, as code.",
                "workflows.dsar_reminder_before",
            ),
            (
                "legal_bases = [\"national_significance\"]",
                "legal_bases = [\"consent\", \"consent\"]",
                "agreements[0].flows[4].legal_bases",
            ),
            (
                "# The MoUs, as code.",
                "[[significance_officers]]\nid = \"a\"\nagency = \"mi5\"\nkey = \"k4.public.x\"\n#",
                "significance_officers[0].agency",
            ),
            (
                "signed = 2024-09-10",
                "signed = 2024-09-10\nreviewed = 2024-09-09",
                "agreements[1].reviewed",
            ),
            (
                "signed = 2024-09-10",
                "signed = 2024-09-10\nreviewed = \"2025-01-01\"",
                "",
            ),
            (
                "signed = 2024-09-10",
                "signed = 2024-09-10\nreview_by = 2024-09-09",
                "agreements[1].review_by",
            ),
            (
                "signed = 2024-09-10",
                "signed = 2024-09-10\nreview_grace_days = 731",
                "agreements[1].review_grace_days",
            ),
            (
                "signed = 2023-09-12",
                "signed = 2023-09-12\nreview_warning_days = 100000",
                "agreements[0].review_warning_days",
            ),
            (
                "consent_refusal_note = \"The NCA does not notify the ICO of an incident on an \
                 organisation's behalf: the organisation must report the incident to the ICO \
                 itself.\"",
                "consent_refusal_note = \" \"",
                "agreements[1].flows[2].consent_refusal_note",
            ),
            (
                "# The MoUs, as code.",
                "[[significance_officers]]\nid = \"a\"\nagency = \"ico\"\nkey = \"k4.public.x\"\n#",
                "significance_officers[0].key",
            ),
        ];
        for (from, to, key) in cases {
            assert!(DEFAULT_CONFIG.contains(from), "default lacks {from}");
            let text = DEFAULT_CONFIG.replacen(from, to, 1);
            let err = Config::parse(&text, "test.toml", &Embedded).unwrap_err();
            let shown = err.to_string();
            // An empty key: the parser's own message (a type error names the line).
            let want = if key.is_empty() {
                "test.toml: ".to_owned()
            } else {
                format!("test.toml: {key}: ")
            };
            assert!(
                shown.starts_with(&want),
                "{to:?}: expected key {key}, got {shown}"
            );
        }
    }

    #[test]
    fn a_flow_s_max_tlp_is_read() {
        let from = "clause = \"Information sharing: relevant cyber threat information\"";
        let text =
            DEFAULT_CONFIG.replacen(from, &format!("{from}\nmax_tlp = \"TLP:AMBER+STRICT\""), 1);
        let config = Config::parse(&text, "test.toml", &Embedded).unwrap();
        let flows = &config.policy.agreements[0].flows;
        assert_eq!(
            flows[0].max_tlp,
            Some(concordat_proto::envelope::Tlp::AmberStrict)
        );
        assert_eq!(flows[1].max_tlp, None);
    }

    #[test]
    fn connection_limits_and_reload_poll_are_read() {
        let defaults = Config::parse(DEFAULT_CONFIG, "test.toml", &Embedded).unwrap();
        assert_eq!(defaults.limits.connections, ConnectionLimits::default());
        assert_eq!(defaults.tls_reload_poll, Some(DEFAULT_TLS_RELOAD_POLL));
        let text = DEFAULT_CONFIG
            .replacen(
                "[limits]",
                "[limits]\nmax_handshakes_per_source = 4\nmax_connections = 100\nhandshake_timeout_ms = 1500\npreface_timeout_ms = 2500",
                1,
            )
            .replacen(
                "client_ca = \"ca.pem\"",
                "client_ca = \"ca.pem\"\nreload_poll_seconds = 0",
                1,
            );
        let c = Config::parse(&text, "test.toml", &Embedded).unwrap();
        assert_eq!(
            c.limits.connections,
            ConnectionLimits {
                max_handshakes_per_source: 4,
                max_connections: 100,
                handshake_timeout: Duration::from_millis(1500),
                preface_timeout: Duration::from_millis(2500),
            }
        );
        assert_eq!(c.tls_reload_poll, None);
        let files = c.tls_files.unwrap();
        assert_eq!(files.client_ca, PathBuf::from("ca.pem"));
        assert_eq!(files.crl, None);
        // The embedded default has no files to reload.
        assert!(Config::embedded_default().unwrap().tls_files.is_none());
    }

    #[test]
    fn embedded_default_registers_acme_and_globex() {
        let c = Config::embedded_default().unwrap();
        let ids: Vec<&str> = c
            .registry
            .organisations()
            .iter()
            .map(|o| o.id.as_str())
            .collect();
        assert_eq!(ids, ["acme-ltd", "globex-plc"]);
        let matcher = crate::registry::Matcher::new(&c.registry).unwrap();
        let found: Vec<String> = matcher
            .scan("ACME Limited (01234567) and mail.globex.example")
            .map(|m| format!("{} {}", m.org, m.kind))
            .collect();
        assert_eq!(
            found,
            [
                "acme-ltd name",
                "acme-ltd company number",
                "globex-plc name",
                "globex-plc domain"
            ]
        );
    }

    /// The registry may live in its own file; its errors name that file and the key there,
    /// and a duplicate across the two places is found.
    #[test]
    fn organisations_file_is_read_and_its_errors_name_it() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Disk {
            base: dir.path().to_path_buf(),
        };
        let text = DEFAULT_CONFIG.replacen(
            "[tls]",
            "organisations_file = \"registry.toml\"\n\n[tls]",
            1,
        );
        for (name, bytes) in EMBEDDED_FILES {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
        let registry_file = dir.path().join("registry.toml");
        let shown_file = registry_file.display().to_string();

        let cases: &[(&str, Result<usize, String>)] = &[
            (
                "[[organisations]]\nid = \"initech\"\nlegal_name = \"Initech Inc.\"\ncharity_number = \"1234567\"\n",
                Ok(3),
            ),
            (
                "[[organisations]]\nid = \"initech\"\nlegal_name = \"Initech\"\n\n[[organisations]]\nid = \"hooli\"\nlegal_name = \"Hooli\"\nemail_domains = [\"hooli..example\"]\n",
                Err(format!("{shown_file}: organisations[1].email_domains[0]: ")),
            ),
            (
                "[[organisations]]\nid = \"acme-ltd\"\nlegal_name = \"Acme again\"\n",
                Err(format!(
                    "{shown_file}: organisations[0].id: acme-ltd is registered twice"
                )),
            ),
            (
                "[[organisations]]\nid = \"x\"\nlegal_nam = \"X\"\n",
                Err(format!("{shown_file}: ")),
            ),
        ];
        for (registry, want) in cases {
            std::fs::write(&registry_file, registry).unwrap();
            match (Config::parse(&text, "broker.toml", &disk), want) {
                (Ok(c), Ok(n)) => assert_eq!(c.registry.len(), *n, "{registry}"),
                (Err(e), Err(prefix)) => {
                    let shown = e.to_string();
                    assert!(shown.starts_with(prefix.as_str()), "{registry}: {shown}");
                }
                (got, want) => panic!("{registry}: got {got:?}, want {want:?}"),
            }
        }
        std::fs::remove_file(&registry_file).unwrap();
        let shown = Config::parse(&text, "broker.toml", &disk)
            .unwrap_err()
            .to_string();
        assert!(
            shown.starts_with("broker.toml: organisations_file: cannot read"),
            "{shown}"
        );
    }

    /// The review dates: derived from `signed` in the embedded default (which leaves the
    /// refusal stage off), moved by `reviewed`, overridden by `review_by`; grace and warning
    /// windows read per agreement and at the top; `enforce_review` on when absent.
    #[test]
    fn review_dates_windows_and_enforcement_are_read() {
        use time::macros::date;

        use crate::policy::{ReviewBasis, ReviewStage};
        let c = Config::embedded_default().unwrap();
        assert!(!c.policy.enforce_review, "the development default");
        let dates: Vec<_> = c
            .policy
            .agreements
            .iter()
            .map(|a| (a.id.as_str(), a.review_by, a.grace_end(), a.review.basis))
            .collect();
        assert_eq!(
            dates,
            [
                (
                    "ico-ncsc-2023",
                    date!(2025 - 09 - 12),
                    date!(2025 - 12 - 11),
                    ReviewBasis::Signed
                ),
                (
                    "ico-nca-2024",
                    date!(2026 - 09 - 10),
                    date!(2026 - 12 - 09),
                    ReviewBasis::Signed
                ),
            ]
        );
        // Both are past review today by these rules: the summary and the warnings say so.
        let today = date!(2026 - 12 - 02);
        let warnings = c.warnings(today);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("ico-ncsc-2023") && warnings[0].contains("2025-12-11"));
        assert!(warnings[1].contains("ico-nca-2024") && warnings[1].contains("2026-12-09"));

        let text = DEFAULT_CONFIG
            .replacen("enforce_review = false\n", "review_warning_days = 30\n", 1)
            .replacen(
                "signed = 2023-09-12",
                "signed = 2023-09-12\nreviewed = 2024-02-29\nreview_grace_days = 10",
                1,
            )
            .replacen(
                "signed = 2024-09-10",
                "signed = 2024-09-10\nreviewed = 2025-01-01\nreview_by = 2027-06-30\nreview_warning_days = 7",
                1,
            );
        let c = Config::parse(&text, "test.toml", &Embedded).unwrap();
        assert!(c.policy.enforce_review, "absent, reviews are enforced");
        let [ncsc, nca] = &c.policy.agreements[..] else {
            panic!("two agreements");
        };
        assert_eq!(
            (
                nca.review_by,
                nca.review.basis,
                nca.review.warning_days,
                nca.review.grace_days
            ),
            (date!(2027 - 06 - 30), ReviewBasis::Explicit, 7, 90)
        );
        assert_eq!(
            (
                ncsc.review_by,
                ncsc.review.basis,
                ncsc.review.warning_days,
                ncsc.review.grace_days
            ),
            (
                date!(2026 - 02 - 28),
                ReviewBasis::Reviewed(date!(2024 - 02 - 29)),
                30,
                10
            )
        );
        assert_eq!(
            ncsc.review_stage(date!(2026 - 03 - 10)),
            ReviewStage::Overdue
        );
        assert_eq!(
            ncsc.review_stage(date!(2026 - 03 - 11)),
            ReviewStage::Lapsed
        );
        let summary = c.summary();
        assert!(
            summary.contains("review by 2026-02-28 (two years after the review of 2024-02-29)"),
            "{summary}"
        );
        assert!(summary.contains("grace ends 2026-03-10"), "{summary}");
    }

    #[test]
    fn the_workflow_settings_are_read_and_shown() {
        let text = DEFAULT_CONFIG
            .replacen(
                "signed = 2024-09-10",
                "signed = 2024-09-10\ndsar_response_days = 15",
                1,
            )
            .replacen(
                "# The MoUs, as code.",
                "[workflows]\ndsar_reminder_before = \"2d\"\n# The MoUs, as code.",
                1,
            );
        let c = Config::parse(&text, "test.toml", &Embedded).unwrap();
        assert_eq!(c.policy.workflows.reminder_before, time::Duration::days(2));
        assert_eq!(
            c.policy.workflows.response_days.get("ico-nca-2024"),
            Some(&15)
        );
        let summary = c.summary();
        assert!(
            summary.contains("reminded 2days before a deadline"),
            "{summary}"
        );
        assert!(
            summary.contains("subject-access consultations: answers due 15 days after opening"),
            "{summary}"
        );
    }

    #[test]
    fn unknown_keys_are_refused_with_file_and_line() {
        let text = DEFAULT_CONFIG.replacen("[limits]", "[limits]\nmax_mesage_bytes = 1", 1);
        let shown = Config::parse(&text, "test.toml", &Embedded)
            .unwrap_err()
            .to_string();
        assert!(shown.starts_with("test.toml: "), "{shown}");
        assert!(shown.contains("max_mesage_bytes"), "{shown}");
        assert!(shown.contains("line"), "{shown}");
    }

    /// `[storage]`: sled unless PostgreSQL is configured; a PostgreSQL URL is required,
    /// parsed, and never shown with its password; the pool is bounded; the sled engine takes
    /// none of PostgreSQL's keys.
    #[test]
    fn storage_engines() {
        let with = |table: &str| DEFAULT_CONFIG.replacen("[tls]", &format!("{table}\n[tls]"), 1);
        let c = Config::parse(DEFAULT_CONFIG, "t.toml", &Embedded).unwrap();
        assert_eq!(c.storage, StorageEngine::Sled);
        let c = Config::parse(&with("[storage]\nengine = \"sled\""), "t.toml", &Embedded).unwrap();
        assert_eq!(c.storage, StorageEngine::Sled);
        let url =
            "postgres://broker:s3cret@db1:5432,db2:5433/concordat?target_session_attrs=read-write";
        let c = Config::parse(
            &with(&format!(
                "[storage]\nengine = \"postgres\"\nurl = \"{url}\"\npool = 8"
            )),
            "t.toml",
            &Embedded,
        )
        .unwrap();
        let StorageEngine::Postgres(pg) = &c.storage else {
            panic!("{:?}", c.storage)
        };
        assert_eq!((pg.url.as_str(), pg.pool), (url, 8));
        for shown in [format!("{:?}", c.storage), c.summary()] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(shown.contains("db1:5432,db2:5433"), "{shown}");
        }
        for (table, key) in [
            ("[storage]\nengine = \"postgres\"", "storage.url"),
            (
                "[storage]\nengine = \"postgres\"\nurl = \"postgres://h/d?sslmode=sometimes\"",
                "storage.url",
            ),
            (
                "[storage]\nengine = \"postgres\"\nurl = \"postgres://h/d\"\npool = 0",
                "storage.pool",
            ),
            (
                "[storage]\nengine = \"postgres\"\nurl = \"postgres://h/d\"\npool = 65",
                "storage.pool",
            ),
            (
                "[storage]\nengine = \"sled\"\nurl = \"postgres://h/d\"",
                "storage.url",
            ),
            ("[storage]\nengine = \"rocksdb\"", "storage.engine"),
        ] {
            let err = Config::parse(&with(table), "t.toml", &Embedded).unwrap_err();
            assert!(
                err.to_string().starts_with(&format!("t.toml: {key}: ")),
                "{table}: {err}"
            );
        }
    }
}
