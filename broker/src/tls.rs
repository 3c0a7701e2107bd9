//! Mutual TLS: the rustls server configuration and the accept loop that turns TCP connections
//! into authenticated streams for tonic.
//!
//! tonic's own TLS configuration has no hook for CRLs or a custom client verifier, so the broker
//! builds a `rustls::ServerConfig` with a `WebPkiClientVerifier` and runs the handshakes itself,
//! feeding finished streams to `serve_with_incoming`. The peer's identity is parsed from its
//! certificate once per connection and travels with every request as [`PeerIdentity`].

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use rustls::{RootCertStore, ServerConfig, server::WebPkiClientVerifier};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tonic::transport::server::Connected;

use crate::config::TlsMaterial;

/// How long a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How many handshakes may be in progress at once.
const MAX_PENDING_HANDSHAKES: usize = 256;

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
        .with_client_cert_verifier(verifier)
        .with_single_cert(tls.cert_chain.clone(), tls.key.clone_key())
        .map_err(TlsError::Identity)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
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

/// A TLS stream whose client certificate has been verified, with the identity read from it.
pub struct AuthenticatedStream {
    inner: TlsStream<TcpStream>,
    peer: PeerIdentity,
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
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for AuthenticatedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
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

/// Accepts TCP connections on `listener`, runs the TLS handshakes concurrently (bounded in
/// number and time) and yields the authenticated streams. Failed handshakes — no certificate,
/// another CA, expired, revoked — are logged and dropped.
pub fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
) -> mpsc::Receiver<io::Result<AuthenticatedStream>> {
    let (tx, rx) = mpsc::channel(64);
    let permits = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let (tcp, remote_addr) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        // Back off briefly so a persistent error (e.g. no file descriptors)
                        // does not spin.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "set_nodelay failed");
            }
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                let stream = match handshake {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::warn!(peer = %remote_addr, error = %e, "refused: TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(peer = %remote_addr, "refused: TLS handshake timed out");
                        return;
                    }
                };
                let leaf = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first());
                let common_name = leaf.and_then(|leaf| common_name(leaf));
                let certificate =
                    leaf.map(|leaf| Arc::new(crate::identity::Certificate::from_der(leaf)));
                let peer = PeerIdentity {
                    remote_addr,
                    common_name,
                    certificate,
                };
                tracing::debug!(peer = %remote_addr, cn = ?peer.common_name, "TLS established");
                let _ = tx
                    .send(Ok(AuthenticatedStream {
                        inner: stream,
                        peer,
                    }))
                    .await;
            });
        }
    });
    rx
}
