//! Connection floods: idle and slow connections from one address must not lock legitimate
//! agencies out, and a connection that completes TLS but never speaks HTTP/2 is closed.
//!
//! The flood comes from 127.0.0.2 and the agency from 127.0.0.1: all of 127.0.0.0/8 is
//! loopback, so the broker sees two source addresses on one machine.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::{Duration, Instant},
};

use concordat_cli::bench::{Flood, hello_latencies, raise_fd_limit};
use concordat_tests::{TestPki, federation_config, spawn_broker};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio::io::AsyncReadExt;

/// The flood's source address.
const FLOODER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// While 2,000 idle and slow connections are held from 127.0.0.2 (each reopened a second
/// after the broker closes it), a legitimate agency connecting afresh from 127.0.0.1 for each
/// call gets its `Hello` answered with p99 under a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_connections_do_not_lock_agencies_out() {
    raise_fd_limit();
    let mut pki = TestPki::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broker = spawn_broker(federation_config(&pki, dir.path(), None).unwrap())
        .await
        .unwrap();
    let cert = pki.client_cert("ico").unwrap();
    let tls = pki.client_tls(broker.addr, &cert);

    let flood = Flood::start(broker.addr, FLOODER, 2000);
    let opened = flood.wait_opened(2000, Duration::from_secs(10)).await;
    // Past the first round of the broker's handshake deadline, so that the measurement sees
    // the flood in its steady state (connections closed and reopened), not just its start.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let hellos = hello_latencies(&tls, 100, Duration::from_secs(60))
        .await
        .unwrap();
    let total = flood.opened();
    flood.stop().await;
    eprintln!("flood: {opened} opened before measuring, {total} in all; legitimate: {hellos:?}");
    assert_eq!(hellos.calls, 100, "ran out of time: {hellos:?}");
    assert_eq!(hellos.failures, 0, "{hellos:?}");
    assert!(
        hellos.p99 < Duration::from_secs(1),
        "legitimate Hello p99 {:?} under the flood",
        hellos.p99
    );
    assert!(opened >= 2000, "the flood opened only {opened} connections");
}

/// A client with a valid certificate that completes the TLS handshake and then never sends the
/// HTTP/2 preface is disconnected by the broker within its preface deadline.
#[tokio::test]
async fn a_connection_without_the_http2_preface_is_closed() {
    let mut pki = TestPki::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = federation_config(&pki, dir.path(), None).unwrap();
    config.limits.connections.preface_timeout = Duration::from_secs(1);
    let broker = spawn_broker(config).await.unwrap();
    let cert = pki.client_cert("ico").unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca_pem().as_bytes()).unwrap())
        .unwrap();
    let chain = CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
    let mut client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    client.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("the TLS handshake itself succeeds");
    let started = Instant::now();

    // Read without ever writing: the broker must end the connection (EOF or an error).
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // e.g. TLS 1.3 session tickets
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a connection without the HTTP/2 preface was still open after 10 s"
    );
    let after = started.elapsed();
    assert!(
        after < Duration::from_secs(4),
        "closed only after {after:?} (preface deadline 1 s)"
    );
    assert!(
        after >= Duration::from_millis(900),
        "closed after {after:?}, before the preface deadline"
    );
}
