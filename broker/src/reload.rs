//! Reloading a running broker: its configuration file, and its TLS material (certificate, key,
//! client CA, CRLs).
//!
//! A reload is asked for through a [`ReloadHandle`] (the binary sends one on SIGHUP, which
//! `concordat-broker reload` sends). When the broker was started from a configuration file, a
//! reload reads that file again and validates it completely, with the same code as start-up
//! ([`Config::load`]), builds the new TLS server configuration and compiles the new
//! organisation registry. Only if all of that succeeds is anything changed: the reload is
//! recorded in the audit log as a `config_loaded` entry naming what changed, then the new
//! [`Rules`] (agreements, consent issuers, significance officers, the registry and its
//! matcher, the limits that can change live) and the new TLS material are put in force, each
//! as one swap. A reload that fails at any step keeps the configuration in force whole and
//! says why, naming the file and the key. Settings that only take effect at start-up are
//! reported as needing a restart and left as they are (see [`crate::live`]).
//!
//! Without a configuration file (a configuration built in code) a reload reads the TLS files
//! again, if there are any; on the embedded default there is nothing to re-read. The TLS files
//! are also reloaded by themselves when they change: [`Reloader`] looks at their modification
//! time, size and inode every [`crate::config::Config::tls_reload_poll`]. After any reload of
//! the TLS material, every established connection's certificate is checked with the new
//! verifier, and those it refuses (revoked, or expired since) are closed.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    config::{Config, ConfigError, TlsFileError, TlsFiles, TlsMaterial},
    connections::{ClosedConnection, Connections},
    live::{Current, Rules},
    registry::{Matcher, RegistryError},
    store::{Op, Store},
    tls::{CurrentTls, ServerTls, TlsError, server_tls},
};

/// Why a reload did not take effect. The material in force stays as it was.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    /// The configuration came from no file and names no TLS files (the embedded default, or a
    /// configuration built in code).
    #[error(
        "the broker runs on a configuration that came from no file (the embedded default, or \
         one built in code): there is nothing to re-read; restart it with --config FILE"
    )]
    NoFiles,
    /// A file could not be read or parsed.
    #[error("{0}")]
    File(#[from] TlsFileError),
    /// The configuration file could not be read or is not valid.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The organisation registry could not be compiled for the leak check.
    #[error("{file}: organisations: {source}")]
    Registry {
        /// The configuration file.
        file: String,
        /// What is wrong.
        source: RegistryError,
    },
    /// The reload could not be recorded in the audit log, so it was not applied.
    #[error("recording the reload in the audit log: {0}")]
    Audit(String),
    /// The files parse but do not make a usable configuration.
    #[error("{files}: {source}")]
    Tls {
        /// The files the problem is in.
        files: String,
        /// What is wrong.
        source: TlsError,
    },
    /// The broker has stopped.
    #[error("the broker has stopped")]
    Stopped,
}

/// What a successful reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// The broker's certificate chain differs from the one before.
    pub certificate_changed: bool,
    /// The broker's key differs.
    pub key_changed: bool,
    /// The federation CA differs.
    pub client_ca_changed: bool,
    /// The revocation lists differ.
    pub crl_changed: bool,
    /// How many revocation lists are in force now.
    pub crls: usize,
    /// The established connections closed because the new material refuses them.
    pub closed: Vec<ClosedConnection>,
    /// What a reload of the configuration file changed; `None` when only the TLS files were
    /// read (no configuration file, or the files changed by themselves).
    pub config: Option<ConfigReloaded>,
}

/// What a reload of the configuration file put in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigReloaded {
    /// The configuration file.
    pub source: String,
    /// SHA-256 of its text.
    pub sha256: [u8; 32],
    /// What changed and is in force now, one line each (the TLS material's changes too).
    pub changes: Vec<String>,
    /// What changed in the file but waits for a restart.
    pub needs_restart: Vec<String>,
}

type Reply = oneshot::Sender<Result<ReloadOutcome, ReloadError>>;

/// Asks a running broker to reload. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ReloadHandle {
    tx: mpsc::Sender<Option<Reply>>,
}

/// The receiving end of a [`ReloadHandle`], given to [`crate::serve_with_reload`].
#[derive(Debug)]
pub struct ReloadRequests {
    rx: mpsc::Receiver<Option<Reply>>,
}

/// A handle and the requests it sends.
pub fn channel() -> (ReloadHandle, ReloadRequests) {
    // One request waiting is enough: a reload reads everything afresh.
    let (tx, rx) = mpsc::channel(1);
    (ReloadHandle { tx }, ReloadRequests { rx })
}

impl ReloadHandle {
    /// Asks for a reload without waiting for it (a signal handler). If one is already waiting
    /// to run, this one is folded into it.
    pub fn request(&self) {
        let _ = self.tx.try_send(None);
    }

    /// Reloads and waits for the outcome.
    pub async fn reload(&self) -> Result<ReloadOutcome, ReloadError> {
        let (reply, outcome) = oneshot::channel();
        self.tx
            .send(Some(reply))
            .await
            .map_err(|_| ReloadError::Stopped)?;
        outcome.await.map_err(|_| ReloadError::Stopped)?
    }
}

/// Digests of the material in force, to say what a reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    chain: [u8; 32],
    key: [u8; 32],
    client_ca: [u8; 32],
    crls: [u8; 32],
}

impl Fingerprint {
    fn of(tls: &TlsMaterial) -> Self {
        fn digest<'a>(parts: impl Iterator<Item = &'a [u8]>) -> [u8; 32] {
            let mut h = Sha256::new();
            for p in parts {
                h.update((p.len() as u64).to_be_bytes());
                h.update(p);
            }
            h.finalize().into()
        }
        Fingerprint {
            chain: digest(tls.cert_chain.iter().map(|c| c.as_ref())),
            key: digest(std::iter::once(tls.key.secret_der())),
            client_ca: digest(tls.client_ca.iter().map(|c| c.as_ref())),
            crls: digest(tls.crls.iter().map(|c| c.as_ref())),
        }
    }
}

/// What the poll compares: each file's modification time, size and inode (`None` if it
/// cannot be read).
type Stamp = Vec<Option<(SystemTime, u64, u64)>>;

fn stamp(files: &TlsFiles) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    files
        .all()
        .into_iter()
        .map(|(_, path): (_, &Path)| {
            let meta = std::fs::metadata(path).ok()?;
            Some((meta.modified().ok()?, meta.len(), meta.ino()))
        })
        .collect()
}

/// Reloads the configuration and TLS material of a running broker.
pub struct Reloader {
    files: Option<TlsFiles>,
    current: CurrentTls,
    connections: Arc<Connections>,
    fingerprint: Fingerprint,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    config: Option<ConfigReloader>,
}

/// What reloading the configuration file needs.
struct ConfigReloader {
    /// The configuration the broker started with: what needs a restart is compared with it.
    started: Config,
    /// The rules in force, which a reload replaces.
    rules: Arc<Current<Rules>>,
    /// Where a reload is recorded.
    store: Store,
}

impl Reloader {
    /// A reloader for the material `initial` (read from `files`, if it came from files), in
    /// force in `current`, with the established connections in `connections`.
    pub fn new(
        files: Option<TlsFiles>,
        initial: &TlsMaterial,
        current: CurrentTls,
        connections: Arc<Connections>,
    ) -> Self {
        Reloader {
            files,
            current,
            connections,
            fingerprint: Fingerprint::of(initial),
            metrics: None,
            config: None,
        }
    }

    /// This reloader, also reloading the configuration file `started` was loaded from (if it
    /// was: see [`Config::file`]) into `rules`, recording each reload in `store`'s audit log.
    pub fn with_config(
        mut self,
        started: Config,
        rules: Arc<Current<Rules>>,
        store: Store,
    ) -> Self {
        self.config = Some(ConfigReloader {
            started,
            rules,
            store,
        });
        self
    }

    /// This reloader, counting its reloads in `metrics` (kind `tls`).
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Reloads the configuration file if the broker was started from one, else the TLS
    /// files. On error nothing changes.
    pub async fn reload(&mut self) -> Result<ReloadOutcome, ReloadError> {
        match self
            .config
            .as_ref()
            .and_then(|c| c.started.file.as_ref())
            .map(|f| f.path.clone())
        {
            Some(path) => self.reload_config(&path).await,
            None => self.reload_tls(),
        }
    }

    /// Reads the TLS files again and, if they make a usable configuration, puts it in force and
    /// closes the established connections it refuses. On error nothing changes.
    pub fn reload_tls(&mut self) -> Result<ReloadOutcome, ReloadError> {
        let files = self.files.as_ref().ok_or(ReloadError::NoFiles)?;
        let material = files.load()?;
        let tls = server_tls(&material).map_err(|source| tls_error(files, source))?;
        Ok(self.put_tls_in_force(tls, &material))
    }

    /// Puts `tls`, built from `material`, in force and says what it changed.
    fn put_tls_in_force(&mut self, tls: ServerTls, material: &TlsMaterial) -> ReloadOutcome {
        let verifier = tls.verifier.clone();
        self.current.set(tls);
        let closed = self.connections.close_refused(verifier.as_ref());
        let new = Fingerprint::of(material);
        let old = std::mem::replace(&mut self.fingerprint, new.clone());
        ReloadOutcome {
            certificate_changed: old.chain != new.chain,
            key_changed: old.key != new.key,
            client_ca_changed: old.client_ca != new.client_ca,
            crl_changed: old.crls != new.crls,
            crls: material.crls.len(),
            closed,
            config: None,
        }
    }

    /// Reads and validates the configuration file at `path`, records the reload in the audit
    /// log, then puts the new rules and TLS material in force. On error nothing changes.
    async fn reload_config(&mut self, path: &Path) -> Result<ReloadOutcome, ReloadError> {
        let Some(cx) = self.config.as_ref() else {
            return self.reload_tls();
        };
        // Everything that can fail is done before anything changes; reading the files and
        // compiling the registry block, so they run off the async workers.
        let path = path.to_path_buf();
        let (new, tls, matcher) = tokio::task::spawn_blocking(move || prepare(&path))
            .await
            .map_err(|_| ReloadError::Stopped)??;
        let running = cx.rules.load();
        let mut changes = crate::live::changes(&cx.started, &running, &new);
        let fingerprint = Fingerprint::of(&new.tls);
        let old = &self.fingerprint;
        for (what, changed) in [
            ("certificate", old.chain != fingerprint.chain),
            ("key", old.key != fingerprint.key),
            ("client CA", old.client_ca != fingerprint.client_ca),
            ("CRLs", old.crls != fingerprint.crls),
        ] {
            if changed {
                changes.live.push(format!("tls: {what} changed"));
            }
        }
        let changes = changes.capped(crate::live::MAX_CHANGE_BYTES);
        let entry = concordat_proto::pb::ConfigLoaded {
            config_sha256: new.digest.to_vec(),
            source: new.source.clone(),
            broker_version: env!("CARGO_PKG_VERSION").into(),
            changes: changes.lines(),
            occasion: "reload".into(),
        };
        // Recorded first: no configuration is ever in force without its entry in the log.
        cx.store
            .commit(Op::ConfigLoaded(entry))
            .await
            .map_err(|f| {
                ReloadError::Audit(match f {
                    crate::refusal::Failure::Internal(e) => e.to_string(),
                    crate::refusal::Failure::Refused(r) => r.to_string(),
                })
            })?;
        cx.rules.store(Rules::reloaded(&running, &new, matcher));
        let mut outcome = self.put_tls_in_force(tls, &new.tls);
        self.files = new.tls_files.clone();
        outcome.config = Some(ConfigReloaded {
            source: new.source.clone(),
            sha256: new.digest,
            changes: changes.live,
            needs_restart: changes.needs_restart,
        });
        Ok(outcome)
    }

    /// Reloads (the configuration, or only the TLS files when `tls_only`) and logs the
    /// outcome, saying what set it off.
    async fn reload_and_log(
        &mut self,
        trigger: &str,
        tls_only: bool,
    ) -> Result<ReloadOutcome, ReloadError> {
        let outcome = if tls_only {
            self.reload_tls()
        } else {
            self.reload().await
        };
        let config = self
            .config
            .as_ref()
            .is_some_and(|c| c.started.file.is_some())
            && !tls_only;
        if let Some(m) = &self.metrics {
            m.reloaded(if config { "config" } else { "tls" }, outcome.is_ok());
        }
        match &outcome {
            Ok(o) => {
                if let Some(c) = &o.config {
                    for setting in &c.needs_restart {
                        tracing::warn!(
                            file = %c.source,
                            change = %setting,
                            "configuration changed, but this setting needs a restart; it is not applied"
                        );
                    }
                    tracing::info!(
                        trigger,
                        file = %c.source,
                        sha256 = %hex::encode(c.sha256),
                        changes = %c.changes.join("; "),
                        needs_restart = c.needs_restart.len(),
                        "configuration reloaded"
                    );
                }
                for c in &o.closed {
                    tracing::warn!(
                        peer = %c.peer,
                        cn = c.common_name.as_deref(),
                        reason = %c.reason,
                        "connection closed: its certificate is no longer accepted"
                    );
                }
                tracing::info!(
                    trigger,
                    certificate_changed = o.certificate_changed,
                    key_changed = o.key_changed,
                    client_ca_changed = o.client_ca_changed,
                    crl_changed = o.crl_changed,
                    crls = o.crls,
                    connections_closed = o.closed.len(),
                    "TLS material reloaded"
                );
            }
            Err(e) if config => {
                tracing::error!(
                    trigger,
                    error = %e,
                    "configuration reload failed; keeping the configuration and TLS material in force"
                );
            }
            Err(e) => {
                tracing::error!(trigger, error = %e, "TLS reload failed; keeping the material in force");
            }
        }
        outcome
    }

    /// Serves reload requests, and every `poll` looks at the files and reloads when they have
    /// changed, until `stop` turns true.
    pub async fn run(
        mut self,
        mut requests: ReloadRequests,
        poll: Option<Duration>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut seen = self.files.as_ref().map(stamp);
        let mut tick = poll
            .filter(|_| self.files.is_some())
            .map(|p| tokio::time::interval_at(tokio::time::Instant::now() + p, p));
        let mut requests_open = true;
        /// What woke the loop; handled after the select, so that no future of it (and no
        /// guard of `stop`) is held across a reload.
        enum Wake {
            Request(Option<Option<Reply>>),
            Tick,
            Stop,
        }
        loop {
            let wake = tokio::select! {
                request = requests.rx.recv(), if requests_open => Wake::Request(request),
                _ = async {
                    match tick.as_mut() {
                        Some(t) => t.tick().await,
                        None => std::future::pending().await,
                    }
                } => Wake::Tick,
                _ = async { let _ = stop.wait_for(|s| *s).await; } => Wake::Stop,
            };
            match wake {
                Wake::Request(Some(reply)) => {
                    let outcome = self.reload_and_log("request", false).await;
                    seen = self.files.as_ref().map(stamp);
                    if let Some(reply) = reply {
                        let _ = reply.send(outcome);
                    }
                }
                Wake::Request(None) => requests_open = false,
                Wake::Tick => {
                    let now = self.files.as_ref().map(stamp);
                    if now != seen {
                        seen = now;
                        let _ = self.reload_and_log("files changed", true).await;
                    }
                }
                Wake::Stop => return,
            }
        }
    }
}

/// Reads and validates the configuration file at `path`, and builds its TLS configuration and
/// registry matcher: everything a reload needs before it changes anything.
fn prepare(path: &Path) -> Result<(Config, ServerTls, Arc<Matcher>), ReloadError> {
    let new = Config::load(path)?;
    let tls = match &new.tls_files {
        Some(files) => server_tls(&new.tls).map_err(|source| tls_error(files, source))?,
        None => server_tls(&new.tls).map_err(|source| ReloadError::Tls {
            files: new.source.clone(),
            source,
        })?,
    };
    let matcher = Matcher::new(&new.registry).map_err(|source| ReloadError::Registry {
        file: new.source.clone(),
        source,
    })?;
    Ok((new, tls, Arc::new(matcher)))
}

/// A TLS configuration error, naming the files it is in.
fn tls_error(files: &TlsFiles, source: TlsError) -> ReloadError {
    ReloadError::Tls {
        files: match &source {
            TlsError::ClientCa(_) => files.client_ca.display().to_string(),
            TlsError::Verifier(_) => match &files.crl {
                Some(crl) => format!("{} or {}", files.client_ca.display(), crl.display()),
                None => files.client_ca.display().to_string(),
            },
            _ => format!("{} and {}", files.cert.display(), files.key.display()),
        },
        source,
    }
}
