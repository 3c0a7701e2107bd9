//! The end-to-end harness: a per-test PKI built in memory, a broker started in-process on
//! `127.0.0.1:0`, and clients per agency.
//!
//! Tests never use `certs-dev/`: every test makes its own CA, broker certificate and client
//! certificates, including the bad ones (another CA, expired, revoked, unknown Common Name).
//!
//! Two modules run real child processes: [`process`] the broker and agent binaries, and
//! [`postgres`] a PostgreSQL primary with a synchronous standby ([`postgres::PgCluster`]).

/// The PostgreSQL cluster of the storage tests (in `concordat-support`, which the benchmark
/// shares).
pub use concordat_support::pg_cluster as postgres;
pub mod process;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Once,
};

use concordat_agent::client::{Broker, ClientTls, Timeouts};
use concordat_broker::config::{Agency, Config, TlsMaterial};
use concordat_cli::pki::{Ca, Issued};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

/// The federation used by most tests: the three agencies of the default federation.
pub const AGENCIES: [(&str, &str); 3] = [
    ("ico", "Information Commissioner's Office"),
    ("ncsc", "National Cyber Security Centre"),
    ("nca", "National Crime Agency"),
];

/// Installs the ring crypto provider once per test process.
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
    });
}

/// A PKI made for one test.
pub struct TestPki {
    ca: Ca,
    /// The broker's certificate (SANs `localhost`, `127.0.0.1`).
    pub broker: Issued,
}

impl TestPki {
    /// A fresh CA and broker certificate.
    pub fn new() -> anyhow::Result<Self> {
        init();
        let mut ca = Ca::generate("Test federation CA")?;
        let broker = ca.issue_server(&["localhost", "127.0.0.1"], 30)?;
        Ok(TestPki { ca, broker })
    }

    /// The CA certificate.
    pub fn ca_pem(&self) -> String {
        self.ca.cert_pem()
    }

    /// A valid client certificate with Common Name `cn`.
    pub fn client_cert(&mut self, cn: &str) -> anyhow::Result<Issued> {
        Ok(self.ca.issue_client(cn, 30)?)
    }

    /// A valid client certificate with exactly this subject (e.g. two Common Names).
    pub fn client_cert_subject(
        &mut self,
        subject: rcgen::DistinguishedName,
    ) -> anyhow::Result<Issued> {
        Ok(self.ca.issue_client_subject(subject, 30)?)
    }

    /// A client certificate with Common Name `cn` that expired yesterday.
    pub fn expired_cert(&mut self, cn: &str) -> anyhow::Result<Issued> {
        let now = time::OffsetDateTime::now_utc();
        Ok(self.ca.issue_client_valid(
            cn,
            now - time::Duration::days(30),
            now - time::Duration::days(1),
        )?)
    }

    /// A CRL revoking the given serial numbers.
    pub fn crl(&self, serials: &[u64]) -> anyhow::Result<String> {
        Ok(self.ca.crl_pem(serials)?)
    }

    /// The broker's TLS material, with an optional CRL.
    pub fn tls_material(&self, crl: Option<&str>) -> anyhow::Result<TlsMaterial> {
        TlsMaterial::from_pem(
            self.broker.cert_pem.as_bytes(),
            self.broker.key_pem.as_bytes(),
            self.ca_pem().as_bytes(),
            crl.map(str::as_bytes),
        )
        .map_err(|(which, problem)| anyhow::anyhow!("tls.{which}: {problem}"))
    }

    /// Client settings for `cert` against a broker at `addr`.
    pub fn client_tls(&self, addr: SocketAddr, cert: &Issued) -> ClientTls {
        ClientTls {
            brokers: format!("https://localhost:{}", addr.port()).into(),
            ca_pem: self.ca_pem().into_bytes(),
            cert_pem: cert.cert_pem.clone().into_bytes(),
            key_pem: cert.key_pem.clone().into_bytes(),
            timeouts: Timeouts::default(),
        }
    }

    /// Connects to the broker at `addr` as `cn`, with a fresh valid certificate.
    pub async fn connect(&mut self, addr: SocketAddr, cn: &str) -> anyhow::Result<Broker> {
        let cert = self.client_cert(cn)?;
        Ok(self.client_tls(addr, &cert).connect().await?)
    }
}

/// A broker configuration for the standard test federation with an auditor named `auditor`,
/// listening on `127.0.0.1:0`, data in `data_dir`.
pub fn federation_config(
    pki: &TestPki,
    data_dir: &Path,
    crl: Option<&str>,
) -> anyhow::Result<Config> {
    let agencies: BTreeMap<_, _> = AGENCIES
        .iter()
        .map(|(id, name)| {
            Ok((
                id.parse()?,
                Agency {
                    name: (*name).to_owned(),
                },
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut config = Config::new(
        "127.0.0.1:0".parse()?,
        data_dir.to_path_buf(),
        pki.tls_material(crl)?,
        agencies,
    );
    config.auditors.insert("auditor".parse()?);
    Ok(config)
}

/// A broker running in this process. Dropping it shuts the broker down.
pub struct BrokerHandle {
    /// The address it is listening on.
    pub addr: SocketAddr,
    /// Its data directory.
    pub data_dir: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), concordat_broker::ServeError>>>,
}

impl BrokerHandle {
    /// Stops the broker and waits until it has stopped.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await??;
        }
        Ok(())
    }
}

impl Drop for BrokerHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Starts a broker for `config` on a fresh `127.0.0.1:0` listener. It is ready when this
/// returns: the listener is bound before the server starts.
pub async fn spawn_broker(config: Config) -> anyhow::Result<BrokerHandle> {
    init();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let data_dir = config.data_dir.clone();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(concordat_broker::serve(config, listener, async {
        let _ = rx.await;
    }));
    Ok(BrokerHandle {
        addr,
        data_dir,
        shutdown: Some(tx),
        task: Some(task),
    })
}

/// The path of one of the workspace's binaries (`concordat-broker`, `concordat-agent`,
/// `concordat`), built on first use in the same profile and target directory as this test.
///
/// Cargo only provides `CARGO_BIN_EXE_*` for binaries of the test's own package, so the harness
/// asks cargo to build them (a no-op when they are up to date).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    static BUILD: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    let dir = BUILD.get_or_init(|| {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        // target/<profile>/deps/e2e-<hash>: the binaries live in target/<profile>.
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .ok_or("unexpected test executable location")?
            .to_path_buf();
        let target_dir = profile_dir.parent().ok_or("no target directory")?;
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "--workspace",
            "--bin",
            "concordat-broker",
            "--bin",
            "concordat-agent",
            "--bin",
            "concordat",
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
        // The variables cargo sets for this test (CARGO_MANIFEST_DIR, CARGO_PKG_NAME,
        // CARGO_PKG_VERSION_*, ...), inherited, would differ from the outer build's and make
        // cargo rebuild everything whose build script watches them (ring watches all of these,
        // hence most of the tree), and the next `cargo test` rebuild it back.
        for (key, _) in std::env::vars_os() {
            let name = key.to_string_lossy();
            if name.starts_with("CARGO_PKG_")
                || name.starts_with("CARGO_BIN_")
                || matches!(
                    &*name,
                    "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_MANIFEST_LINKS"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_TARGET_TMPDIR"
                        | "CARGO_RUSTC_CURRENT_DIR"
                        | "OUT_DIR"
                )
            {
                cmd.env_remove(&key);
            }
        }
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .map_err(|e| format!("running cargo build: {e}"))?;
        if !status.success() {
            return Err(format!("cargo build of the binaries failed: {status}"));
        }
        Ok(profile_dir)
    });
    match dir {
        Ok(dir) => Ok(dir.join(name)),
        Err(e) => Err(anyhow::anyhow!("{e}")),
    }
}

/// The log key of the broker configured by `config` over `data_dir`, as `concordat-broker
/// log-key` prints it (`name+keyid+base64`): for agents' `log_key` and offline checks. The
/// broker must have started there once (it makes the key).
pub fn log_key(config: &Path, data_dir: &Path) -> anyhow::Result<String> {
    let out = std::process::Command::new(binary("concordat-broker")?)
        .args(["log-key", "--config"])
        .arg(config)
        .arg("--data-dir")
        .arg(data_dir)
        .output()?;
    anyhow::ensure!(out.status.success(), "concordat-broker log-key: {out:?}");
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// A Python (in a virtual environment `target/<venv>` of the workspace, made and reused across
/// runs) in which `import <module>` works, installing `requirement` from PyPI with pip when it
/// does not yet; `Err` says why there is none (no `python3`, no `venv` module, no PyPI). Used by
/// the tests that check the broker against outside tools (the OASIS STIX validator, the
/// Prometheus parsers).
pub fn python_venv(venv: &str, module: &str, requirement: &str) -> Result<PathBuf, String> {
    use std::process::Command;
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target")
        .join(venv);
    let python = venv.join("bin/python");
    let ready = |python: &Path| {
        Command::new(python)
            .args(["-I", "-c", &format!("import {module}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if ready(&python) {
        return Ok(python);
    }
    let run = |cmd: &mut Command, what: &str| -> Result<(), String> {
        let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{what} failed: {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            ))
        }
    };
    run(
        Command::new("python3").args(["-m", "venv"]).arg(&venv),
        "python3 -m venv",
    )?;
    run(
        Command::new(venv.join("bin/pip")).args(["install", "--quiet", requirement]),
        &format!("pip install {requirement}"),
    )?;
    if ready(&python) {
        Ok(python)
    } else {
        Err(format!("{module} does not import after installation"))
    }
}

/// Every entry of the audit log, decoded, in log order, as `auditor` (a connection with an
/// auditor's certificate) exports it.
pub async fn exported_entries(
    auditor: &Broker,
) -> anyhow::Result<Vec<concordat_proto::pb::AuditEntry>> {
    use concordat_proto::pb;
    let mut stream = auditor
        .audit()
        .export(pb::ExportRequest::default())
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(item) = stream.message().await? {
        if let Some(pb::export_item::Item::Record(r)) = item.item {
            out.push(concordat_proto::audit::decode(&r.entry)?);
        }
    }
    Ok(out)
}

/// The `config_loaded` entries of the audit log of the broker at `addr`, as their JSON views'
/// details, read with the `auditor` certificate of `pki`.
pub async fn configs_loaded(
    pki: &process::PkiFiles,
    addr: SocketAddr,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let auditor = pki.client(addr, "auditor")?.connect().await?;
    Ok(exported_entries(&auditor)
        .await?
        .iter()
        .map(concordat_proto::audit::to_json)
        .filter(|view| view["event"] == "config_loaded")
        .map(|view| view["details"].clone())
        .collect())
}

/// The text of `GET /metrics` from the broker's metrics listener at `addr` (HTTP/1.1, the
/// default format), headers included.
pub fn scrape_metrics(addr: SocketAddr) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}
