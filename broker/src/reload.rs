//! Reloading a running broker: today, its TLS material (certificate, key, client CA, CRLs).
//!
//! A reload is asked for through a [`ReloadHandle`] (the binary sends one on SIGHUP) or happens
//! by itself when the TLS files change: [`Reloader`] looks at their modification time, size and
//! inode every [`crate::config::Config::tls_reload_poll`]. A reload reads every file again and
//! builds a new server configuration; only if all of that succeeds does it replace the one in
//! force ([`CurrentTls`]), so a reload that fails (a bad PEM, a key that does not match its
//! certificate, an unreadable file) keeps the old material and logs which file is wrong and why.
//! After a successful reload, every established connection's certificate is checked with the
//! new verifier, and those it refuses (revoked, or expired since) are closed.
//!
//! The entry point is general on purpose: reloading more of the configuration later means more
//! work in [`Reloader::reload`], not another signal path.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    config::{TlsFileError, TlsFiles, TlsMaterial},
    connections::{ClosedConnection, Connections},
    tls::{CurrentTls, TlsError, server_tls},
};

/// Why a reload did not take effect. The material in force stays as it was.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    /// The configuration names no TLS files (the embedded default, or material built in code).
    #[error("the TLS material did not come from files; there is nothing to reload")]
    NoFiles,
    /// A file could not be read or parsed.
    #[error("{0}")]
    File(#[from] TlsFileError),
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

/// Reloads the TLS material of a running broker.
pub struct Reloader {
    files: Option<TlsFiles>,
    current: CurrentTls,
    connections: Arc<Connections>,
    fingerprint: Fingerprint,
    metrics: Option<Arc<crate::metrics::Metrics>>,
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
        }
    }

    /// This reloader, counting its reloads in `metrics` (kind `tls`).
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Reads the files again and, if they make a usable configuration, puts it in force and
    /// closes the established connections it refuses. On error nothing changes.
    pub fn reload(&mut self) -> Result<ReloadOutcome, ReloadError> {
        let files = self.files.as_ref().ok_or(ReloadError::NoFiles)?;
        let material = files.load()?;
        let tls = server_tls(&material).map_err(|source| ReloadError::Tls {
            files: match &source {
                TlsError::ClientCa(_) => files.client_ca.display().to_string(),
                TlsError::Verifier(_) => match &files.crl {
                    Some(crl) => format!("{} or {}", files.client_ca.display(), crl.display()),
                    None => files.client_ca.display().to_string(),
                },
                _ => format!("{} and {}", files.cert.display(), files.key.display()),
            },
            source,
        })?;
        let verifier = tls.verifier.clone();
        self.current.set(tls);
        let closed = self.connections.close_refused(verifier.as_ref());
        let new = Fingerprint::of(&material);
        let old = std::mem::replace(&mut self.fingerprint, new.clone());
        Ok(ReloadOutcome {
            certificate_changed: old.chain != new.chain,
            key_changed: old.key != new.key,
            client_ca_changed: old.client_ca != new.client_ca,
            crl_changed: old.crls != new.crls,
            crls: material.crls.len(),
            closed,
        })
    }

    /// Reloads and logs the outcome, saying what set it off.
    fn reload_and_log(&mut self, trigger: &str) -> Result<ReloadOutcome, ReloadError> {
        let outcome = self.reload();
        if let Some(m) = &self.metrics {
            m.reloaded("tls", outcome.is_ok());
        }
        match &outcome {
            Ok(o) => {
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
        loop {
            tokio::select! {
                request = requests.rx.recv(), if requests_open => match request {
                    Some(reply) => {
                        let outcome = self.reload_and_log("request");
                        seen = self.files.as_ref().map(stamp);
                        if let Some(reply) = reply {
                            let _ = reply.send(outcome);
                        }
                    }
                    None => requests_open = false,
                },
                _ = async {
                    match tick.as_mut() {
                        Some(t) => t.tick().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let now = self.files.as_ref().map(stamp);
                    if now != seen {
                        seen = now;
                        let _ = self.reload_and_log("files changed");
                    }
                }
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}
