//! Connecting to the broker over mutual TLS with an agency's certificate.

use std::{path::Path, time::Duration};

use concordat_proto::pb::{
    audit_client::AuditClient, consent_client::ConsentClient, exchange_client::ExchangeClient,
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
}

/// Where the broker is and which certificates to use, PEM-encoded.
#[derive(Clone)]
pub struct ClientTls {
    /// The broker's URL, e.g. `https://localhost:7443`.
    pub broker_url: String,
    /// The federation CA, which must have issued the broker's certificate.
    pub ca_pem: Vec<u8>,
    /// This agency's client certificate.
    pub cert_pem: Vec<u8>,
    /// This agency's private key.
    pub key_pem: Vec<u8>,
}

impl ClientTls {
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
        Ok(ClientTls {
            broker_url: broker_url.to_owned(),
            ca_pem: read(ca)?,
            cert_pem: read(cert)?,
            key_pem: read(key)?,
        })
    }

    /// The endpoint, configured but not connected.
    pub fn endpoint(&self) -> Result<Endpoint, ClientError> {
        let url_err = |source| ClientError::Url {
            url: self.broker_url.clone(),
            source,
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
        Endpoint::from_shared(self.broker_url.clone())
            .map_err(url_err)?
            .tls_config(tls)
            .map_err(url_err)
            .map(|e| {
                e.connect_timeout(Duration::from_secs(10))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(30))
                    .keep_alive_timeout(Duration::from_secs(20))
            })
    }

    /// Connects to the broker.
    pub async fn connect(&self) -> Result<Broker, ClientError> {
        let channel = self
            .endpoint()?
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                url: self.broker_url.clone(),
                source,
            })?;
        Ok(Broker { channel })
    }
}

/// A connection to the broker, from which the service clients are made.
#[derive(Clone)]
pub struct Broker {
    channel: Channel,
}

impl Broker {
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
}
