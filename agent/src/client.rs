//! Connecting to the broker over mutual TLS with an agency's certificate, and never waiting
//! for it forever.
//!
//! Connecting (TCP, TLS and HTTP/2 together) is bounded by [`Timeouts::connect`], and every call
//! made through [`Broker::deadline`] by [`Timeouts::rpc`]: a wedged broker costs a client one
//! deadline and one clear error, not a hang. A streaming call (`Subscribe`, `Export`) is bounded
//! only until it starts; the stream itself may rightly run for hours, so the connection under
//! it is watched instead, by HTTP/2 pings that must be answered within
//! [`Timeouts::keepalive_timeout`].
//!
//! A federation may run several broker nodes, or a standby that takes over a failed node's
//! store: [`BrokerUrls`] lists them, and [`ClientTls::connect`] tries them in turn, starting from the
//! one that last connected, so a client moves to another node when its node goes away.

use std::{
    future::Future,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use concordat_proto::pb::{
    audit_client::AuditClient, consent_client::ConsentClient, exchange_client::ExchangeClient,
    operations_client::OperationsClient, workflows_client::WorkflowsClient,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The largest message this client sends or accepts: the broker's ceiling for payloads plus room
/// for the envelope around them. A broker is trusted with data, not with our memory.
pub const MAX_RESPONSE_BYTES: usize = 80 * 1024 * 1024;

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// A TLS file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The broker URL is not usable.
    #[error("broker URL {url:?}: {source}")]
    Url {
        /// The URL as given.
        url: String,
        /// Why it was refused.
        source: tonic::transport::Error,
    },
    /// The connection could not be made.
    #[error("connecting to {url}: {source}")]
    Connect {
        /// The broker's URL.
        url: String,
        /// The transport error.
        source: tonic::transport::Error,
    },
    /// None of several broker nodes could be reached.
    #[error("no broker node could be reached: {}", .attempts.join("; "))]
    NoBroker {
        /// Each node's URL and why connecting to it failed, in the order tried.
        attempts: Vec<String>,
    },
    /// The broker did not complete the connection within the connect timeout.
    #[error(
        "the broker at {url} did not answer within {} (connecting)",
        humantime::format_duration(*after)
    )]
    ConnectTimeout {
        /// The broker's URL.
        url: String,
        /// How long the client waited.
        after: Duration,
    },
}

/// How long a client waits for the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Connecting: the TCP, TLS and HTTP/2 handshakes together.
    pub connect: Duration,
    /// Each call's answer; for a streaming call, its start.
    pub rpc: Duration,
    /// How often the connection is checked with an HTTP/2 ping, busy or idle.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is taken for dead (and every
    /// call and stream on it fails, to be retried on a new one).
    pub keepalive_timeout: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            rpc: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// The URLs of the broker nodes a client may use, in order of preference, and which of them
/// the next connection tries first. Clones share that choice, so an agent's sending and
/// receiving loops move together.
#[derive(Debug, Clone)]
pub struct BrokerUrls {
    urls: Arc<[String]>,
    next: Arc<AtomicUsize>,
}

impl BrokerUrls {
    /// Several nodes, tried in this order at first; `None` when `urls` is empty.
    pub fn new(urls: Vec<String>) -> Option<BrokerUrls> {
        (!urls.is_empty()).then(|| BrokerUrls {
            urls: urls.into(),
            next: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Every URL, in the configured order.
    pub fn all(&self) -> &[String] {
        &self.urls
    }

    /// The URL the next connection tries first: the one that last connected, unless it has
    /// since been passed over.
    pub fn current(&self) -> &str {
        let i = self.next.load(Ordering::Relaxed) % self.urls.len();
        &self.urls[i]
    }

    /// Moves the next connection on to the following node: the current one is up but failing
    /// (an established connection broke, or it answered `UNAVAILABLE`). With one URL this
    /// changes nothing.
    pub fn pass_over(&self, url: &str) {
        let n = self.urls.len();
        let i = self.next.load(Ordering::Relaxed) % n;
        if self.urls[i] == url {
            // Only if no one moved it meanwhile.
            let _ =
                self.next
                    .compare_exchange(i, (i + 1) % n, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// The URLs in the order the next connection tries them, each with its position.
    fn in_turn(&self) -> impl Iterator<Item = (usize, &str)> {
        let n = self.urls.len();
        let start = self.next.load(Ordering::Relaxed) % n;
        (0..n).map(move |k| {
            let i = (start + k) % n;
            (i, self.urls[i].as_str())
        })
    }
}

impl From<String> for BrokerUrls {
    fn from(url: String) -> Self {
        BrokerUrls {
            urls: vec![url].into(),
            next: Arc::new(AtomicUsize::new(0)),
        }
    }
}

/// Where the broker is and which certificates to use, PEM-encoded.
#[derive(Clone)]
pub struct ClientTls {
    /// The broker nodes' URLs, e.g. `https://localhost:7443`.
    pub brokers: BrokerUrls,
    /// The federation CA, which must have issued the broker's certificate.
    pub ca_pem: Vec<u8>,
    /// This agency's client certificate.
    pub cert_pem: Vec<u8>,
    /// This agency's private key.
    pub key_pem: Vec<u8>,
    /// How long to wait for the broker.
    pub timeouts: Timeouts,
}

impl ClientTls {
    /// The agency of the client certificate (its common name), which the broker takes for the
    /// caller.
    pub fn agency(&self) -> anyhow::Result<concordat_proto::ids::AgencyId> {
        use anyhow::Context as _;
        use rustls_pki_types::{CertificateDer, pem::PemObject as _};
        let der = CertificateDer::from_pem_slice(&self.cert_pem)
            .map_err(|e| anyhow::anyhow!("the client certificate is not PEM: {e}"))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| anyhow::anyhow!("the client certificate does not parse: {e}"))?;
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .context("the client certificate has no common name")?;
        cn.parse().map_err(|e| {
            anyhow::anyhow!("the client certificate's common name {cn:?} is not an agency id: {e}")
        })
    }

    /// Reads the CA, certificate and key from files.
    pub fn from_files(
        broker_url: &str,
        ca: &Path,
        cert: &Path,
        key: &Path,
    ) -> Result<Self, ClientError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| ClientError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        Ok(ClientTls::from_pem(
            broker_url,
            read(ca)?,
            read(cert)?,
            read(key)?,
        ))
    }

    /// The CA, certificate and key as PEM text, with the default timeouts.
    pub fn from_pem(
        broker_url: &str,
        ca_pem: Vec<u8>,
        cert_pem: Vec<u8>,
        key_pem: Vec<u8>,
    ) -> Self {
        ClientTls {
            brokers: broker_url.to_owned().into(),
            ca_pem,
            cert_pem,
            key_pem,
            timeouts: Timeouts::default(),
        }
    }

    /// The endpoint of the broker at `url`, configured but not connected.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, ClientError> {
        let url_err = |source| ClientError::Url {
            url: url.to_owned(),
            source,
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
        Endpoint::from_shared(url.to_owned())
            .map_err(url_err)?
            .tls_config(tls)
            .map_err(url_err)
            .map(|e| {
                let t = &self.timeouts;
                e.connect_timeout(t.connect)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(t.keepalive_interval)
                    .keep_alive_timeout(t.keepalive_timeout)
                    .keep_alive_while_idle(true)
            })
    }

    /// Connects to a broker node: each in turn, starting from the one that last connected,
    /// each within [`Timeouts::connect`]; the first that connects is used and tried first next
    /// time. With one URL, its own error is returned; with several that all fail,
    /// [`ClientError::NoBroker`] lists them.
    pub async fn connect(&self) -> Result<Broker, ClientError> {
        let several = self.brokers.all().len() > 1;
        let mut attempts = Vec::new();
        for (i, url) in self.brokers.in_turn() {
            match self.connect_to(url).await {
                Ok(broker) => {
                    if several {
                        self.brokers.next.store(i, Ordering::Relaxed);
                        tracing::info!(broker = %url, "connected to broker node");
                    }
                    return Ok(broker);
                }
                Err(e) if !several => return Err(e),
                Err(e) => {
                    tracing::debug!(broker = %url, error = %e, "broker node unreachable");
                    attempts.push(format!("{url}: {}", concordat_support::report(&e)));
                }
            }
        }
        Err(ClientError::NoBroker { attempts })
    }

    /// Connects to the broker at `url`, within [`Timeouts::connect`]. (The endpoint's own
    /// connect timeout covers only the TCP handshake; a peer that accepts and then says nothing
    /// would hold the TLS handshake forever.)
    async fn connect_to(&self, url: &str) -> Result<Broker, ClientError> {
        let endpoint = self.endpoint(url)?;
        let channel = tokio::time::timeout(self.timeouts.connect, endpoint.connect())
            .await
            .map_err(|_| ClientError::ConnectTimeout {
                url: url.to_owned(),
                after: self.timeouts.connect,
            })?
            .map_err(|source| ClientError::Connect {
                url: url.to_owned(),
                source,
            })?;
        Ok(Broker {
            channel,
            url: Arc::from(url),
            rpc_timeout: self.timeouts.rpc,
        })
    }
}

/// A connection to the broker, from which the service clients are made.
#[derive(Clone)]
pub struct Broker {
    channel: Channel,
    url: Arc<str>,
    rpc_timeout: Duration,
}

impl Broker {
    /// The URL of the broker node this connection is to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// How long a call may wait for the broker's answer ([`Broker::deadline`]).
    pub fn rpc_timeout(&self) -> Duration {
        self.rpc_timeout
    }

    /// Waits for `call` (a call on one of this broker's clients) for at most the RPC timeout;
    /// past it, the call is dropped (which cancels it) and the result is `DEADLINE_EXCEEDED`
    /// with a message that names the broker and the timeout. For a streaming call, pass the
    /// call itself: the stream it returns is not bounded.
    pub async fn deadline<T>(
        &self,
        call: impl Future<Output = Result<T, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        match tokio::time::timeout(self.rpc_timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(self.deadline_exceeded()),
        }
    }

    /// What a call that waited past the RPC timeout ends with.
    pub fn deadline_exceeded(&self) -> tonic::Status {
        tonic::Status::deadline_exceeded(format!(
            "the broker at {} did not answer within {} (deadline exceeded)",
            self.url,
            humantime::format_duration(self.rpc_timeout)
        ))
    }

    /// The underlying channel (for health checks and reflection).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The `Exchange` client.
    pub fn exchange(&self) -> ExchangeClient<Channel> {
        ExchangeClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
            .max_encoding_message_size(MAX_RESPONSE_BYTES)
    }

    /// The `Consent` client.
    pub fn consent(&self) -> ConsentClient<Channel> {
        ConsentClient::new(self.channel.clone())
    }

    /// The `Audit` client.
    pub fn audit(&self) -> AuditClient<Channel> {
        AuditClient::new(self.channel.clone())
    }

    /// The `Operations` client (`concordat status`, `concordat consent list`).
    pub fn operations(&self) -> OperationsClient<Channel> {
        OperationsClient::new(self.channel.clone())
    }

    /// The `Workflows` service (docs/workflows.md).
    pub fn workflows(&self) -> WorkflowsClient<Channel> {
        WorkflowsClient::new(self.channel.clone()).max_decoding_message_size(MAX_RESPONSE_BYTES)
    }
}

/// The reason code and message of a status that is a Concordat refusal.
pub fn refusal_of(status: &tonic::Status) -> Option<(String, String)> {
    use tonic_types::StatusExt;
    let details = status.get_error_details();
    let info = details.error_info()?;
    (info.domain == "concordat").then(|| (info.reason.clone(), status.message().to_owned()))
}

/// An error for a status that is not a refusal (or is one, from an RPC where refusals are errors).
/// A missed deadline ([`Broker::deadline`]) is its own message, which names the
/// broker and the timeout.
pub fn describe_status(status: tonic::Status) -> anyhow::Error {
    match refusal_of(&status) {
        Some((reason, message)) => anyhow::anyhow!("refused [{reason}]: {message}"),
        None if status.code() == tonic::Code::DeadlineExceeded => {
            anyhow::anyhow!("{}", status.message())
        }
        None => anyhow::anyhow!("{:?}: {}", status.code(), status.message()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_tried_from_the_one_that_last_worked_and_passed_over_in_turn() {
        let urls = BrokerUrls::new(vec![
            "https://a".into(),
            "https://b".into(),
            "https://c".into(),
        ])
        .unwrap_or_else(|| unreachable!());
        let order = |u: &BrokerUrls| {
            u.in_turn()
                .map(|(_, url)| url.to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(order(&urls), ["https://a", "https://b", "https://c"]);
        let shared = urls.clone();
        shared.pass_over("https://a");
        assert_eq!(urls.current(), "https://b", "clones share the choice");
        assert_eq!(order(&urls), ["https://b", "https://c", "https://a"]);
        // Passing over a node that is no longer the current one changes nothing: another
        // loop moved on already.
        urls.pass_over("https://a");
        assert_eq!(urls.current(), "https://b");
        urls.pass_over("https://b");
        urls.pass_over("https://c");
        assert_eq!(urls.current(), "https://a", "it wraps around");
        assert!(BrokerUrls::new(Vec::new()).is_none());
        let one = BrokerUrls::from("https://only".to_owned());
        one.pass_over("https://only");
        assert_eq!(one.current(), "https://only");
    }
}
