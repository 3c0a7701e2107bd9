//! Mutual TLS: the rustls server configuration and the accept loop that turns TCP connections
//! into authenticated streams for tonic.
//!
//! tonic's own TLS configuration has no hook for CRLs or a custom client verifier, so the broker
//! builds a `rustls::ServerConfig` with a `WebPkiClientVerifier` and runs the handshakes itself,
//! feeding finished streams to `serve_with_incoming`. The peer's identity is parsed from its
//! certificate once per connection and travels with every request as [`PeerIdentity`].
//!
//! The accept loop never blocks `accept()`: it accepts, asks [`crate::connections`] at once
//! whether the connection may start its handshake (a cap per source address, a cap in all that
//! sheds pending connections first), and runs each admitted handshake in its own task under two
//! deadlines: the TLS handshake, then the HTTP/2 client preface. Only then is the stream handed
//! to tonic, which keeps it alive with HTTP/2 pings. The server configuration comes from
//! [`CurrentTls`], which [`crate::reload`] replaces; each established stream closes itself when
//! a reload cancels it (its certificate is no longer accepted).

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use rustls::{
    RootCertStore, ServerConfig,
    server::{WebPkiClientVerifier, danger::ClientCertVerifier},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;

use crate::{
    config::TlsMaterial,
    connections::{Connections, Established, Pending},
    metrics::Metrics,
};

/// The HTTP/2 client connection preface (RFC 9113, section 3.4), which must be the first bytes
/// a client sends after the TLS handshake.
const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The shortest time between two warnings about refused connections; the ones in between are
/// counted and logged at debug level, so a flood does not flood the log.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A client CA certificate could not be used as a trust anchor.
    #[error("client CA certificate rejected: {0}")]
    ClientCa(rustls::Error),
    /// The client verifier could not be built (e.g. a CRL does not parse).
    #[error("client certificate verifier: {0}")]
    Verifier(rustls::server::VerifierBuilderError),
    /// The broker's certificate and key do not form a usable identity.
    #[error("broker certificate or key: {0}")]
    Identity(rustls::Error),
}

/// Builds the server side of mutual TLS: client certificates are required and must chain to the
/// federation CA and not be revoked by any configured CRL.
pub fn server_config(tls: &TlsMaterial) -> Result<ServerConfig, TlsError> {
    Ok(Arc::unwrap_or_clone(server_tls(tls)?.config))
}

/// A server configuration with the client verifier inside it, which a reload uses to check the
/// connections already established.
#[derive(Clone)]
pub struct ServerTls {
    /// The rustls configuration for new connections.
    pub config: Arc<ServerConfig>,
    /// The client certificate verifier that `config` uses.
    pub verifier: Arc<dyn ClientCertVerifier>,
}

/// [`server_config`], keeping its verifier.
pub fn server_tls(tls: &TlsMaterial) -> Result<ServerTls, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in &tls.client_ca {
        roots.add(ca.clone()).map_err(TlsError::ClientCa)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .with_crls(tls.crls.iter().cloned())
        .build()
        .map_err(TlsError::Verifier)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Identity)?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(tls.cert_chain.clone(), tls.key.clone_key())
        .map_err(TlsError::Identity)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(ServerTls {
        config: Arc::new(config),
        verifier,
    })
}

/// The TLS configuration that new connections get. A reload replaces it; connections already
/// established keep the one they were made with (and are checked against the new one).
#[derive(Clone)]
pub struct CurrentTls(Arc<RwLock<ServerTls>>);

impl CurrentTls {
    /// Starts with `tls`.
    pub fn new(tls: ServerTls) -> Self {
        CurrentTls(Arc::new(RwLock::new(tls)))
    }

    /// The configuration in force.
    pub fn get(&self) -> ServerTls {
        // Replacing is one assignment: a poisoned lock still holds a whole configuration.
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts `tls` in force for every connection accepted from now on.
    pub fn set(&self, tls: ServerTls) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = tls;
    }
}

/// Who is at the other end of a connection, as far as its certificate says.
///
/// tonic puts this in every request's extensions. The Common Name is only a claim until
/// [`crate::identity`] has matched it against the federation.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    /// The peer's address.
    pub remote_addr: SocketAddr,
    /// The Subject Common Name of the peer's certificate, if it has exactly one.
    pub common_name: Option<String>,
    /// The peer's certificate (its subject and fingerprint), for the audit log. Shared: tonic
    /// clones the identity into every request.
    pub certificate: Option<Arc<crate::identity::Certificate>>,
}

/// A TLS stream whose client certificate has been verified and whose client has sent the
/// HTTP/2 preface, with the identity read from its certificate.
///
/// It gives tonic the preface it has already read, then the rest of the stream. Once a reload
/// cancels it (its certificate is no longer accepted), reads and writes fail and tonic drops the
/// connection; dropping the stream removes it from the registry of connections.
pub struct AuthenticatedStream {
    inner: TlsStream<TcpStream>,
    peer: PeerIdentity,
    /// Bytes already read from `inner` (the preface), given back before anything else.
    replay: Vec<u8>,
    replayed: usize,
    cancel: CancellationToken,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    _registration: Established,
}

impl AuthenticatedStream {
    fn new(
        inner: TlsStream<TcpStream>,
        peer: PeerIdentity,
        replay: Vec<u8>,
        registration: Established,
    ) -> Self {
        let cancel = registration.cancel_token();
        AuthenticatedStream {
            inner,
            peer,
            replay,
            replayed: 0,
            cancelled: Box::pin(cancel.clone().cancelled_owned()),
            cancel,
            _registration: registration,
        }
    }

    fn closed_error() -> io::Error {
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "closed by the broker: the client certificate is no longer accepted",
        )
    }
}

impl Connected for AuthenticatedStream {
    type ConnectInfo = PeerIdentity;
    fn connect_info(&self) -> PeerIdentity {
        self.peer.clone()
    }
}

impl AsyncRead for AuthenticatedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Polling the cancellation registers this task: a reload that cancels the stream wakes
        // the read that the HTTP/2 server always has pending.
        if self.cancelled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(Self::closed_error()));
        }
        let this = &mut *self;
        if this.replayed < this.replay.len() {
            let rest = &this.replay[this.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for AuthenticatedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.cancel.is_cancelled() {
            return Poll::Ready(Err(Self::closed_error()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.cancel.is_cancelled() {
            return Poll::Ready(Err(Self::closed_error()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.cancel.is_cancelled() {
            return Poll::Ready(Err(Self::closed_error()));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The Subject Common Name of a DER certificate, if it has exactly one that is valid UTF-8.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut names = cert.subject().iter_common_name();
    let cn = names.next()?.as_str().ok()?.to_owned();
    if names.next().is_some() {
        return None;
    }
    Some(cn)
}

/// Accepts TCP connections on `listener` and yields the authenticated streams.
///
/// `accept()` is never held back: each connection is admitted or closed at once by
/// `connections` (see [`crate::connections`]), and each admitted one completes its TLS handshake
/// with the configuration in force in `tls`, then sends the HTTP/2 preface, each within its
/// deadline, in a task of its own. Failed handshakes — no certificate, another CA, expired,
/// revoked, too slow — are logged (a warning at most every ten seconds) and dropped.
pub fn accept_loop(
    listener: TcpListener,
    tls: CurrentTls,
    connections: Arc<Connections>,
    metrics: Arc<Metrics>,
) -> mpsc::Receiver<io::Result<AuthenticatedStream>> {
    let (tx, rx) = mpsc::channel(64);
    let log = Arc::new(RefusalLog {
        metrics,
        last_warning: Mutex::new(None),
        suppressed: AtomicU64::new(0),
    });
    tokio::spawn(async move {
        loop {
            let (tcp, remote_addr) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        log.refused(None, "accept", &e);
                        // Back off briefly so a persistent error (e.g. no file descriptors)
                        // does not spin.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            let pending = match connections.admit(remote_addr.ip()) {
                Ok((pending, shed)) => {
                    if shed {
                        log.refused(
                            None,
                            "shed",
                            &"the oldest connection in its handshake was closed to make room",
                        );
                    }
                    pending
                }
                Err(refused) => {
                    // Dropping the socket closes it at once.
                    log.refused(Some(remote_addr), refused.as_str(), &"connection closed");
                    continue;
                }
            };
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "set_nodelay failed");
            }
            let acceptor = TlsAcceptor::from(tls.get().config);
            let limits = connections.limits().clone();
            let (tx, log) = (tx.clone(), log.clone());
            tokio::spawn(async move {
                tokio::select! {
                    stream = handshake(tcp, remote_addr, acceptor, &limits, &log) => {
                        if let Some((stream, preface)) = stream {
                            hand_over(stream, remote_addr, preface, pending, &tx).await;
                        }
                    }
                    () = pending.cancelled() => {} // shed: the socket drops here
                }
            });
        }
    });
    rx
}

/// The TLS handshake and the HTTP/2 preface, each under its deadline. Returns the stream and
/// the preface read from it, or `None` (logged) if the client failed either.
async fn handshake(
    tcp: TcpStream,
    remote_addr: SocketAddr,
    acceptor: TlsAcceptor,
    limits: &crate::config::ConnectionLimits,
    log: &RefusalLog,
) -> Option<(TlsStream<TcpStream>, Vec<u8>)> {
    let mut stream =
        match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                log.metrics.handshake_failed(handshake_failure(&e));
                log.refused(Some(remote_addr), "tls", &e);
                return None;
            }
            Err(_) => {
                log.metrics.handshake_failed("timeout");
                log.refused(Some(remote_addr), "timeout", &"TLS handshake timed out");
                return None;
            }
        };
    let mut preface = vec![0u8; HTTP2_PREFACE.len()];
    match tokio::time::timeout(limits.preface_timeout, stream.read_exact(&mut preface)).await {
        Ok(Ok(_)) if preface == HTTP2_PREFACE => Some((stream, preface)),
        Ok(Ok(_)) => {
            log.metrics.handshake_failed("no_http2_preface");
            log.refused(
                Some(remote_addr),
                "protocol",
                &"not an HTTP/2 client preface",
            );
            None
        }
        Ok(Err(e)) => {
            log.metrics.handshake_failed(handshake_failure(&e));
            log.refused(Some(remote_addr), "tls", &e);
            None
        }
        Err(_) => {
            log.metrics.handshake_failed("timeout");
            log.refused(Some(remote_addr), "timeout", &"no HTTP/2 preface in time");
            None
        }
    }
}

/// The cause of a failed TLS handshake, as counted in `concordat_handshake_failures_total`
/// (one of [`crate::metrics::HANDSHAKE_CAUSES`]): what rustls said of the client's
/// certificate, or `tls_other`.
fn handshake_failure(e: &io::Error) -> &'static str {
    use rustls::{CertificateError as C, Error as E};
    let Some(rustls) = e.get_ref().and_then(|inner| inner.downcast_ref::<E>()) else {
        return "tls_other";
    };
    match rustls {
        E::NoCertificatesPresented => "no_certificate",
        E::InvalidCertificate(c) => match c {
            C::UnknownIssuer => "unknown_ca",
            C::Expired | C::ExpiredContext { .. } => "expired",
            C::NotValidYet | C::NotValidYetContext { .. } => "not_yet_valid",
            C::Revoked => "revoked",
            _ => "bad_certificate",
        },
        _ => "tls_other",
    }
}

/// Registers a connection that has completed its handshake as established and gives it to
/// tonic.
async fn hand_over(
    stream: TlsStream<TcpStream>,
    remote_addr: SocketAddr,
    preface: Vec<u8>,
    pending: Pending,
    tx: &mpsc::Sender<io::Result<AuthenticatedStream>>,
) {
    let chain = stream
        .get_ref()
        .1
        .peer_certificates()
        .map(<[_]>::to_vec)
        .unwrap_or_default();
    let common_name = chain.first().and_then(|leaf| common_name(leaf));
    let certificate = chain
        .first()
        .map(|leaf| Arc::new(crate::identity::Certificate::from_der(leaf)));
    let Some(registration) = pending.establish(remote_addr, common_name.clone(), chain) else {
        return; // shed at the last moment
    };
    let peer = PeerIdentity {
        remote_addr,
        common_name,
        certificate,
    };
    tracing::debug!(peer = %remote_addr, cn = peer.common_name.as_deref(), "TLS established");
    let _ = tx
        .send(Ok(AuthenticatedStream::new(
            stream,
            peer,
            preface,
            registration,
        )))
        .await;
}

/// Logs and counts refused connections: each at debug level, and at most one warning per
/// [`WARN_INTERVAL`] that says how many more there were.
struct RefusalLog {
    metrics: Arc<Metrics>,
    last_warning: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl RefusalLog {
    fn refused(&self, peer: Option<SocketAddr>, cause: &str, error: &dyn std::fmt::Display) {
        self.metrics.connection_refused(cause);
        // An absent peer address is left out of the line rather than logged as `None`.
        let peer = peer.map(tracing::field::display);
        tracing::debug!(peer, cause, error = %error, "connection refused");
        let now = Instant::now();
        let mut last = self.last_warning.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| now.duration_since(t) < WARN_INTERVAL) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(now);
        drop(last);
        let more = self.suppressed.swap(0, Ordering::Relaxed);
        tracing::warn!(
            peer,
            cause,
            error = %error,
            refused_since_last_warning = more,
            "connection refused"
        );
    }
}

#[cfg(test)]
mod tests {
    use rustls::{CertificateError as C, Error as E};

    use super::*;

    #[test]
    fn failed_handshakes_are_counted_by_what_rustls_said() {
        let wrapped = |e: E| io::Error::new(io::ErrorKind::InvalidData, e);
        let cases = [
            (wrapped(E::NoCertificatesPresented), "no_certificate"),
            (
                wrapped(E::InvalidCertificate(C::UnknownIssuer)),
                "unknown_ca",
            ),
            (wrapped(E::InvalidCertificate(C::Expired)), "expired"),
            (
                wrapped(E::InvalidCertificate(C::NotValidYet)),
                "not_yet_valid",
            ),
            (wrapped(E::InvalidCertificate(C::Revoked)), "revoked"),
            (
                wrapped(E::InvalidCertificate(C::BadSignature)),
                "bad_certificate",
            ),
            (wrapped(E::DecryptError), "tls_other"),
            (io::Error::from(io::ErrorKind::UnexpectedEof), "tls_other"),
        ];
        for (error, want) in cases {
            let got = handshake_failure(&error);
            assert_eq!(got, want, "{error}");
            assert!(crate::metrics::HANDSHAKE_CAUSES.contains(&got));
        }
    }
}
