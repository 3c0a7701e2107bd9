//! Reloading the TLS material (CRL, certificate, key) without a restart: on SIGHUP to a real
//! broker process, and when the files change. A revoked agency is refused from then on and its
//! open connections are closed; a reload that fails keeps the old material.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use concordat_agent::client::{Broker, ClientTls};
use concordat_broker::config::{Limits, TlsFiles};
use concordat_proto::pb::HelloRequest;
use concordat_tests::{
    TestPki, federation_config,
    process::{BrokerProcess, PkiFiles, write_broker_config_with_crl},
    spawn_broker,
};
use nix::{sys::signal::Signal, unistd::Pid};
use tempfile::TempDir;

/// How long a reload may take to show (a debug build on a busy machine).
const RELOAD_TIMEOUT: Duration = Duration::from_secs(15);
/// How often the tests look again for an outcome.
const POLL: Duration = Duration::from_millis(100);

/// A broker process whose configuration names a CRL file, with the files of its PKI.
struct Fixture {
    _dir: TempDir,
    pki: TestPki,
    files: PkiFiles,
    broker: BrokerProcess,
}

impl Fixture {
    /// Writes the PKI (agencies `ico`, `ncsc`, `nca`), a CRL revoking nothing and a
    /// configuration that names it with file polling off (only SIGHUP reloads), and starts the
    /// broker.
    fn start() -> Fixture {
        let mut pki = TestPki::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let files =
            PkiFiles::write(&mut pki, &dir.path().join("pki"), &["ico", "ncsc", "nca"]).unwrap();
        files.write_crl(&pki, &[]).unwrap();
        let config = dir.path().join("broker.toml");
        let data = dir.path().join("data");
        write_broker_config_with_crl(
            &config,
            &files,
            &data,
            &Limits::default(),
            Some(&files.crl()),
        )
        .unwrap();
        // Polling off: what these tests see is the signal's doing.
        let text = std::fs::read_to_string(&config).unwrap();
        std::fs::write(
            &config,
            text.replacen("\n[limits]", "reload_poll_seconds = 0\n\n[limits]", 1),
        )
        .unwrap();
        let broker = BrokerProcess::start(&config, &data).unwrap();
        Fixture {
            _dir: dir,
            pki,
            files,
            broker,
        }
    }

    fn tls(&self, agency: &str) -> ClientTls {
        self.files.client(self.broker.addr(), agency).unwrap()
    }

    fn sighup(&self) {
        let pid = self.broker.pid().expect("the broker is running");
        nix::sys::signal::kill(Pid::from_raw(i32::try_from(pid).unwrap()), Signal::SIGHUP).unwrap();
    }

    /// Panics with the broker's log unless it is still running.
    fn assert_running(&mut self) {
        let running = self.broker.is_running();
        assert!(
            running,
            "the broker is not running:\n{}",
            self.broker.log_tail(30)
        );
    }
}

/// Whether a fresh connection with `tls` gets a `Hello` answered.
async fn hello_fresh(tls: &ClientTls) -> bool {
    match tls.connect().await {
        Ok(broker) => hello(&broker).await,
        Err(_) => false,
    }
}

/// Whether `Hello` on an existing connection is answered.
async fn hello(broker: &Broker) -> bool {
    tokio::time::timeout(
        Duration::from_secs(5),
        broker.exchange().hello(HelloRequest {}),
    )
    .await
    .is_ok_and(|r| r.is_ok())
}

/// Polls `check` until it holds, for at most `timeout`; false if it never did.
async fn eventually<F: Future<Output = bool>>(
    timeout: Duration,
    mut check: impl FnMut() -> F,
) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// SIGHUP reloads the CRL: the process keeps running, a new connection with the revoked
/// certificate is refused, the revoked agency's open connection is closed, and the other
/// agencies carry on, on their open connections and on new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_crl_and_closes_revoked_connections() {
    let mut fx = Fixture::start();
    let ncsc = fx.tls("ncsc").connect().await.unwrap();
    let ico = fx.tls("ico").connect().await.unwrap();
    assert!(hello(&ncsc).await && hello(&ico).await);

    fx.files.write_crl(&fx.pki, &["ncsc"]).unwrap();
    fx.sighup();
    let ncsc_tls = fx.tls("ncsc");
    let refused = eventually(RELOAD_TIMEOUT, || async { !hello_fresh(&ncsc_tls).await }).await;
    fx.assert_running();
    assert!(
        refused,
        "a new connection with the revoked certificate is still served:\n{}",
        fx.broker.log_tail(30)
    );
    let closed = eventually(Duration::from_secs(5), || async { !hello(&ncsc).await }).await;
    assert!(closed, "the revoked agency's open connection still works");

    assert!(
        hello(&ico).await,
        "another agency's open connection was closed"
    );
    assert!(hello_fresh(&fx.tls("ico")).await);
    assert!(hello_fresh(&fx.tls("nca")).await);
    fx.assert_running();
    let log = fx.broker.log_tail(200);
    assert!(log.contains("TLS material reloaded"), "{log}");
}

/// A reload that fails (the CRL file is not a CRL) keeps the old material and says why, naming
/// the file; a later good reload still takes effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reload_keeps_the_old_material() {
    let mut fx = Fixture::start();
    let ico = fx.tls("ico").connect().await.unwrap();
    assert!(hello(&ico).await);

    fx.files.replace_crl(b"this is not a CRL\n").unwrap();
    fx.sighup();
    let crl = fx.files.crl();
    let crl_name = crl.display().to_string();
    let broker = &fx.broker;
    let logged = eventually(RELOAD_TIMEOUT, || async {
        let log = broker.log_tail(200);
        // The broker was started from a file: SIGHUP reloads the whole configuration.
        log.contains("configuration reload failed") && log.contains(&crl_name)
    })
    .await;
    assert!(
        logged,
        "no reload failure naming {crl_name} in:\n{}",
        fx.broker.log_tail(30)
    );
    fx.assert_running();
    assert!(hello(&ico).await, "the open connection was lost");
    assert!(
        hello_fresh(&fx.tls("ncsc")).await,
        "new connections refused"
    );

    fx.files.write_crl(&fx.pki, &["ncsc"]).unwrap();
    fx.sighup();
    let ncsc_tls = fx.tls("ncsc");
    let refused = eventually(RELOAD_TIMEOUT, || async { !hello_fresh(&ncsc_tls).await }).await;
    assert!(refused, "the good CRL after the bad one was not applied");
    assert!(hello(&ico).await);
    fx.assert_running();
}

/// Without any signal, a changed CRL file is picked up by the broker's poll of the TLS files:
/// the revoked agency is refused on new connections and its open one is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_files_are_reloaded_without_a_signal() {
    let mut pki = TestPki::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    let files = PkiFiles::write(&mut pki, &pki_dir, &["ico", "ncsc"]).unwrap();
    files.write_crl(&pki, &[]).unwrap();
    let crl = std::fs::read_to_string(files.crl()).unwrap();
    let mut config = federation_config(&pki, &dir.path().join("data"), Some(&crl)).unwrap();
    config.tls_files = Some(TlsFiles {
        cert: pki_dir.join("broker.pem"),
        key: pki_dir.join("broker.key"),
        client_ca: files.ca(),
        crl: Some(files.crl()),
    });
    config.tls_reload_poll = Some(Duration::from_millis(100));
    let broker = spawn_broker(config).await.unwrap();
    let tls = |agency: &str| files.client(broker.addr, agency).unwrap();
    let ncsc = tls("ncsc").connect().await.unwrap();
    let ico = tls("ico").connect().await.unwrap();
    assert!(hello(&ncsc).await && hello(&ico).await);

    files.write_crl(&pki, &["ncsc"]).unwrap();
    let ncsc_tls = tls("ncsc");
    let refused = eventually(RELOAD_TIMEOUT, || async { !hello_fresh(&ncsc_tls).await }).await;
    assert!(refused, "the changed CRL was not picked up");
    let closed = eventually(Duration::from_secs(5), || async { !hello(&ncsc).await }).await;
    assert!(closed, "the revoked agency's open connection still works");
    assert!(hello(&ico).await);
    assert!(hello_fresh(&tls("ico")).await);
}

/// Each row breaks one TLS file; the reload asked for through the library's handle fails
/// naming that file, and the broker keeps serving with the old material. A good reload then
/// reports what changed and which connections it closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_names_the_broken_file_and_changes_nothing() {
    let mut pki = TestPki::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    let files = PkiFiles::write(&mut pki, &pki_dir, &["ico", "ncsc"]).unwrap();
    files.write_crl(&pki, &[]).unwrap();
    let crl = std::fs::read_to_string(files.crl()).unwrap();
    let mut config = federation_config(&pki, &dir.path().join("data"), Some(&crl)).unwrap();
    let tls_files = TlsFiles {
        cert: pki_dir.join("broker.pem"),
        key: pki_dir.join("broker.key"),
        client_ca: files.ca(),
        crl: Some(files.crl()),
    };
    config.tls_files = Some(tls_files.clone());
    config.tls_reload_poll = None;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (reload, reloads) = concordat_broker::reload::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(concordat_broker::serve_with_reload(
        config,
        listener,
        async {
            let _ = stopped.await;
        },
        reloads,
    ));
    let tls = |agency: &str| files.client(addr, agency).unwrap();
    let ncsc = tls("ncsc").connect().await.unwrap();
    assert!(hello(&ncsc).await);

    let other_key = pki.client_cert("someone").unwrap().key_pem;
    let cases: &[(&str, &Path, &[u8], &str)] = &[
        (
            "a key that is not the certificate's",
            &tls_files.key,
            other_key.as_bytes(),
            "broker.key",
        ),
        (
            "a CRL that is not PEM",
            &files.crl(),
            b"garbage\n",
            "crl.pem",
        ),
        (
            "a CRL whose DER does not parse",
            &files.crl(),
            b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
            "crl.pem",
        ),
        ("an empty CA file", &files.ca(), b"", "ca.pem"),
        (
            "a certificate file with a key in it",
            &tls_files.cert,
            other_key.as_bytes(),
            "broker.pem",
        ),
    ];
    // Read before the rows break the files (the CA file is the client's too).
    let ico_tls = tls("ico");
    for (what, path, bytes, named) in cases {
        let good = std::fs::read(path).unwrap();
        std::fs::write(path, bytes).unwrap();
        let error = reload
            .reload()
            .await
            .expect_err(&format!("{what}: the reload must fail"))
            .to_string();
        assert!(
            error.contains(named),
            "{what}: {error} does not name {named}"
        );
        assert!(hello(&ncsc).await, "{what}: the open connection was lost");
        assert!(
            hello_fresh(&ico_tls).await,
            "{what}: new connections refused"
        );
        std::fs::write(path, good).unwrap();
    }

    files.write_crl(&pki, &["ncsc"]).unwrap();
    let outcome = reload.reload().await.unwrap();
    assert!(outcome.crl_changed);
    assert!(!outcome.certificate_changed && !outcome.key_changed && !outcome.client_ca_changed);
    assert_eq!(outcome.crls, 1);
    let closed: Vec<_> = outcome
        .closed
        .iter()
        .map(|c| c.common_name.as_deref())
        .collect();
    assert_eq!(closed, [Some("ncsc")]);
    assert!(!hello(&ncsc).await);
    assert!(!hello_fresh(&tls("ncsc")).await);
    assert!(hello_fresh(&tls("ico")).await);
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
