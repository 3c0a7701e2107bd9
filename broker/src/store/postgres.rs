//! The PostgreSQL engine of the store's key-value layer: every tree is a range of one table,
//! `concordat_kv (tree, key, value)`, ordered by `(tree, key)` as sled orders a tree's keys
//! (bytea compares byte by byte).
//!
//! - **Connections.** One for the writer's transactions, `pool` for everything else (reads
//!   through the `Storage` trait, writes outside a transaction), and one that listens for
//!   other nodes' commits. Each is made from the configured URL (several hosts and
//!   `target_session_attrs=read-write` pick the primary) and made again when it breaks, so the
//!   store follows a promoted standby without a restart. Every session runs with
//!   `synchronous_commit = on` and a statement timeout.
//! - **Calls.** The store is synchronous (its writer is a thread of its own); a call here
//!   blocks the calling thread on the query's future while the connections' I/O runs on a
//!   small runtime of this engine's own, so it works from any thread, a Tokio worker included.
//! - **Transactions.** `BEGIN`; the closure's reads go to the server (after the transaction's
//!   own writes, which are kept in memory); its writes are sent at the end as one upsert
//!   (`unnest` of arrays) and a delete per key, then `COMMIT`. An acknowledged commit is on
//!   the primary's disk and, with `synchronous_standby_names` set, on a standby's.
//! - **Plans.** Every statement finds its rows through the primary key whatever the table's
//!   statistics said when it was planned: a prepared statement's generic plan is made once,
//!   often while the table is small (before autovacuum's first `ANALYZE`, or after one of a
//!   table of a few rows), and kept as the table grows. So the sessions run with
//!   `enable_seqscan = off` (a scan of the table is planned only where nothing else can
//!   answer) and `jit = off` (the penalty that makes such a plan's cost would have it
//!   compiled), reads of several keys probe the key one by one ([`GET_MANY`]), and deletes go
//!   one key per statement ([`DELETE`]).
//! - **Several nodes, one order.** The head row `concordat_head` holds the store's
//!   generation, which every committing transaction advances. A node remembers the generation
//!   its in-memory state reflects; its transaction's first write is `concordat_advance`, which
//!   locks the head row (so the nodes' commits queue one behind another) and fails with
//!   [`PgError::Stale`] when another node has committed since: nothing is written, the node
//!   reads its state again and runs the transaction again. So two nodes never append at the
//!   same index of the log, and every node's commits extend what the others committed.
//!   Each advance also notifies `concordat_commit`: the other nodes hear it, read their state
//!   again and wake their subscribers ([`PgKv::on_moved`]).
//! - **Schema.** Versioned in `concordat_schema`; created at first start, migrated forwards,
//!   and a database of a newer version than this broker knows is refused.

use std::{
    cell::RefCell,
    collections::{HashMap, VecDeque},
    future::Future,
    ops::Bound,
    path::Path,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicI64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use concordat_support::runtime::Background;
use rustls_pki_types::{CertificateDer, pem::PemObject as _};
use tokio_postgres::{AsyncMessage, Client, Config, Statement, types::ToSql};
use tokio_postgres_rustls::MakeRustlsConnect;

/// The schema version this broker writes and reads.
pub const SCHEMA_VERSION: i32 = 2;

/// The channel every commit notifies, with the store's new generation.
const CHANNEL: &str = "concordat_commit";

/// The SQLSTATE `concordat_advance` raises when another node has committed since.
const STALE_STATE: &str = "CCST1";

/// The first key of the advisory locks that claim a recipient's deliveries (the bytes of
/// "conc"); the second is derived from the recipient.
const CLAIM_CLASS: i32 = 0x636f_6e63;

/// How long the listener waits before connecting again after its connection broke.
const LISTEN_RETRY: Duration = Duration::from_secs(1);

/// Rows fetched by an iterator's first round trip from either end: most iterations stop after
/// a row or two (the newest bundle of the log, the first due timer).
const FIRST_PAGE: i64 = 2;

/// The most rows fetched per round trip; each page doubles up to it.
const PAGE: i64 = 512;

/// The most time a statement may take before the server cancels it.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long connecting may take, per host tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong. Messages carry the server's message and SQLSTATE, never a row's key or value
/// (a server's DETAIL can quote them, so it is left out).
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The server or the connection failed.
    #[error("PostgreSQL: {0}")]
    Db(String),
    /// The database holds a schema this broker cannot use.
    #[error("{0}")]
    Schema(String),
    /// The configuration cannot be used.
    #[error("{0}")]
    Config(String),
    /// Another broker node committed since this node last read its state: the transaction
    /// wrote nothing, and runs again once the state is read again.
    #[error("another broker node changed the store (generation {known} -> {now}); read it again")]
    Stale {
        /// The generation this node's state reflects.
        known: i64,
        /// The store's generation.
        now: i64,
    },
}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> PgError {
        PgError::Db(describe(&e))
    }
}

/// The error's message and SQLSTATE, without its DETAIL (which may quote row contents).
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => {
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                s.push_str(": ");
                s.push_str(&cause.to_string());
                source = cause.source();
            }
            s
        }
    }
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// A libpq-style URL or key-value string; several hosts are tried in turn.
    pub url: String,
    /// Connections for reads and writes outside the writer's transactions.
    pub pool: usize,
    /// PEM file of the CA certificates that sign the servers' certificates, for TLS (`sslmode`
    /// in the URL decides whether TLS is used).
    pub ca_file: Option<std::path::PathBuf>,
}

/// The values of several keys of one tree: a probe of the primary key per key. Written so that
/// no plan can do otherwise (`OFFSET 0` keeps the lookup a subquery of its own, run per key,
/// and an equality on every column of a unique index is one row whatever the statistics say):
/// `tree = $1 AND key = ANY($2)`, planned while the table was small, read every row of the
/// tree and kept the key test as a filter, each batch slower as the tree grew.
const GET_MANY: &str = "SELECT k.key, v.value FROM unnest($2::bytea[]) AS k(key) \
     CROSS JOIN LATERAL \
     (SELECT value FROM concordat_kv WHERE tree = $1 AND key = k.key OFFSET 0) AS v";

/// Deletes one key; a transaction's deletes are sent together, one statement per key, for the
/// same reason as [`GET_MANY`] (a join of the table with an array of keys was planned as a
/// scan of the whole table).
const DELETE: &str = "DELETE FROM concordat_kv WHERE tree = $1 AND key = $2";

/// A connection and the statements prepared on it.
struct Conn {
    client: Client,
    advance: Statement,
    get: Statement,
    upsert: Statement,
    delete: Statement,
    remove: Statement,
    get_many: Statement,
    asc: Statement,
    asc_to: Statement,
    desc: Statement,
    desc_to: Statement,
}

impl Conn {
    async fn prepare(client: Client) -> Result<Conn, PgError> {
        let q = "SELECT key, value FROM concordat_kv WHERE tree = $1 AND key >= $2";
        Ok(Conn {
            advance: client.prepare("SELECT concordat_advance($1, $2)").await?,
            get: client
                .prepare("SELECT value FROM concordat_kv WHERE tree = $1 AND key = $2")
                .await?,
            upsert: client
                .prepare(
                    "INSERT INTO concordat_kv (tree, key, value) \
                     SELECT * FROM unnest($1::text[], $2::bytea[], $3::bytea[]) \
                     ON CONFLICT (tree, key) DO UPDATE SET value = EXCLUDED.value",
                )
                .await?,
            delete: client.prepare(DELETE).await?,
            remove: client
                .prepare("DELETE FROM concordat_kv WHERE tree = $1 AND key = $2 RETURNING value")
                .await?,
            get_many: client.prepare(GET_MANY).await?,
            asc: client
                .prepare(&format!("{q} ORDER BY key LIMIT $3"))
                .await?,
            asc_to: client
                .prepare(&format!("{q} AND key < $4 ORDER BY key LIMIT $3"))
                .await?,
            desc: client
                .prepare(&format!("{q} ORDER BY key DESC LIMIT $3"))
                .await?,
            desc_to: client
                .prepare(&format!("{q} AND key < $4 ORDER BY key DESC LIMIT $3"))
                .await?,
            client,
        })
    }
}

/// A connection that is made again when it breaks.
struct Slot {
    conn: RwLock<Option<Arc<Conn>>>,
}

/// The engine's shared state.
struct Shared {
    runtime: Background,
    config: Config,
    tls: MakeRustlsConnect,
    writer: Mutex<Option<Arc<Conn>>>,
    readers: Vec<Slot>,
    next: AtomicUsize,
    heads: Arc<Heads>,
    /// The writer connection while it holds the head row in a transaction begun by
    /// [`PgKv::hold_head`], which the next [`PgKv::transaction`] on it continues.
    held: Mutex<Option<Arc<Conn>>>,
    /// This node's delivery claims ([`PgKv::claim`]).
    claims: Mutex<Claims>,
}

/// The session that holds this node's delivery claims, as session advisory locks, and how
/// many subscriptions hold each. The server frees a session's locks when it ends, so the
/// claims of a node that dies are free as soon as its connection is gone.
#[derive(Default)]
struct Claims {
    session: Option<Arc<Client>>,
    held: HashMap<i32, usize>,
}

/// What this node knows of the store's generation (see the module's documentation).
struct Heads {
    /// The generation this node's in-memory state reflects: its own last commit, or what it
    /// last read its state at.
    known: AtomicI64,
    /// The newest generation heard of (from the listener).
    heard: AtomicI64,
    /// Called when a generation newer than `known` is heard.
    wake: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
}

impl Heads {
    fn hear(&self, generation: i64) {
        self.heard.fetch_max(generation, Ordering::SeqCst);
        if generation > self.known.load(Ordering::SeqCst) {
            let wake = self.wake.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(wake) = wake {
                wake();
            }
        }
    }
}

/// Listens for other nodes' commits for as long as the engine's runtime runs, connecting
/// again when the connection breaks (a failover: the URL then picks the new primary).
async fn listen(config: Config, tls: MakeRustlsConnect, heads: Arc<Heads>) {
    loop {
        if let Err(e) = listen_once(&config, &tls, &heads).await {
            tracing::warn!(error = %e, "listening for other broker nodes' commits; connecting again");
        }
        tokio::time::sleep(LISTEN_RETRY).await;
    }
}

async fn listen_once(
    config: &Config,
    tls: &MakeRustlsConnect,
    heads: &Heads,
) -> Result<(), PgError> {
    let (client, mut connection) = config.connect(tls.clone()).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    // Sent by `concordat_advance` alone; anything else is ignored.
                    if let Ok(generation) = n.payload().parse::<i64>() {
                        let _ = tx.send(generation);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(PgError::from(e)),
                None => return Ok(()),
            }
        }
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    // What was committed while nobody listened (before this start, or while reconnecting).
    let row = client
        .query_one("SELECT generation FROM concordat_head", &[])
        .await?;
    heads.hear(row.try_get(0)?);
    while let Some(generation) = rx.recv().await {
        heads.hear(generation);
    }
    drop(client);
    driver
        .await
        .map_err(|e| PgError::Db(format!("the listener stopped: {e}")))?
}

/// A PostgreSQL database opened as the store's key-value engine.
#[derive(Clone)]
pub struct PgKv {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for PgKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgKv")
            .field("hosts", &self.shared.config.get_hosts().len())
            .field("pool", &self.shared.readers.len())
            .finish()
    }
}

/// Runs `fut` to completion on the calling thread. The futures of a `Client` need no runtime:
/// they talk to the connection's task (on the engine's runtime) through channels.
fn wait<T>(fut: impl Future<Output = T>) -> T {
    futures::executor::block_on(fut)
}

/// Runs `fut` on the engine's runtime (what needs its I/O driver: connecting) and waits.
fn on_runtime<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    fut: impl Future<Output = Result<T, PgError>> + Send + 'static,
) -> Result<T, PgError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv()
        .map_err(|_| PgError::Db("the engine's runtime stopped".into()))?
}

fn tls_config(ca_file: Option<&Path>) -> Result<MakeRustlsConnect, PgError> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| {
            PgError::Config(format!(
                "reading the PostgreSQL CA file {}: {e}",
                path.display()
            ))
        })?;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| {
                PgError::Config(format!("the PostgreSQL CA file {}: {e}", path.display()))
            })?;
            roots.add(cert).map_err(|e| {
                PgError::Config(format!("the PostgreSQL CA file {}: {e}", path.display()))
            })?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| PgError::Config(format!("TLS to PostgreSQL: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

async fn connect(config: Config, tls: MakeRustlsConnect) -> Result<Client, PgError> {
    let (client, connection) = config.connect(tls).await.map_err(|e| {
        PgError::Db(format!(
            "connecting to {}: {}",
            servers(&config),
            describe(&e)
        ))
    })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %describe(&e), "PostgreSQL connection closed");
        }
    });
    Ok(client)
}

/// The servers `config` names, in the order they are tried, for messages (connection errors,
/// `check-config`): `host:port` each (a socket directory in place of a host), joined by
/// commas; never the user, the password or the database.
pub fn servers(config: &Config) -> String {
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let host = match h {
                tokio_postgres::config::Host::Tcp(h) => h.clone(),
                tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
            };
            match ports.get(i).or(ports.first()) {
                Some(p) => format!("{host}:{p}"),
                None => host,
            }
        })
        .collect();
    if hosts.is_empty() {
        "no host".to_owned()
    } else {
        hosts.join(",")
    }
}

impl PgKv {
    /// Connects, creates or migrates the schema, and starts listening for other nodes'
    /// commits.
    pub fn open(options: &PgOptions) -> Result<PgKv, PgError> {
        let mut config: Config = options
            .url
            .parse()
            .map_err(|e| PgError::Config(format!("the PostgreSQL URL: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        // Every statement reaches rows through the primary key: a sequential scan is taken
        // only where nothing else can answer (see the module's "Plans"). Such a plan's cost
        // then counts the penalty, far above `jit_above_cost`: without `jit = off`, each
        // read of the one-row head was compiled (40 ms).
        let session = format!(
            "-c synchronous_commit=on -c statement_timeout={} -c enable_seqscan=off -c jit=off",
            STATEMENT_TIMEOUT.as_millis()
        );
        let options_now = config.get_options().unwrap_or_default().to_owned();
        config.options(format!("{options_now} {session}").trim());
        config.keepalives(true);
        config.application_name("concordat-broker");
        let tls = tls_config(options.ca_file.as_deref())?;
        // In its guard from the start: a failure below drops it, maybe on a Tokio worker.
        let runtime = Background::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("concordat-postgres")
                .enable_all()
                .build()
                .map_err(|e| PgError::Db(format!("starting the engine's runtime: {e}")))?,
        );
        let generation = {
            let (config, tls) = (config.clone(), tls.clone());
            on_runtime(&runtime, async move {
                let client = connect(config, tls).await?;
                migrate(&client).await?;
                let row = client
                    .query_one("SELECT generation FROM concordat_head", &[])
                    .await?;
                Ok(row.try_get::<_, i64>(0)?)
            })?
        };
        // Read before the store reads its state: a commit of another node in between makes
        // this node's first transaction stale, never one that goes unnoticed.
        let heads = Arc::new(Heads {
            known: AtomicI64::new(generation),
            heard: AtomicI64::new(generation),
            wake: Mutex::new(None),
        });
        runtime.spawn(listen(config.clone(), tls.clone(), heads.clone()));
        let shared = Arc::new(Shared {
            runtime,
            config,
            tls,
            writer: Mutex::new(None),
            readers: (0..options.pool.max(1))
                .map(|_| Slot {
                    conn: RwLock::new(None),
                })
                .collect(),
            next: AtomicUsize::new(0),
            heads,
            held: Mutex::new(None),
            claims: Mutex::new(Claims::default()),
        });
        let kv = PgKv { shared };
        // Connect now, so that a broker that cannot reach its database says so at start.
        drop(kv.writer()?);
        kv.reader()?;
        Ok(kv)
    }

    fn fresh(&self) -> Result<Arc<Conn>, PgError> {
        let (config, tls) = (self.shared.config.clone(), self.shared.tls.clone());
        on_runtime(&self.shared.runtime, async move {
            Conn::prepare(connect(config, tls).await?)
                .await
                .map(Arc::new)
        })
    }

    fn writer(&self) -> Result<std::sync::MutexGuard<'_, Option<Arc<Conn>>>, PgError> {
        let mut guard = self
            .shared
            .writer
            .lock()
            .map_err(|_| PgError::Db("the writer connection's lock is poisoned".into()))?;
        if guard.as_ref().is_none_or(|c| c.client.is_closed()) {
            *guard = Some(self.fresh()?);
        }
        Ok(guard)
    }

    fn reader(&self) -> Result<Arc<Conn>, PgError> {
        let n = self.shared.next.fetch_add(1, Ordering::Relaxed) % self.shared.readers.len();
        let slot = &self.shared.readers[n];
        if let Ok(current) = slot.conn.read()
            && let Some(conn) = current.as_ref()
            && !conn.client.is_closed()
        {
            return Ok(conn.clone());
        }
        let mut current = slot
            .conn
            .write()
            .map_err(|_| PgError::Db("a reader connection's lock is poisoned".into()))?;
        match current.as_ref() {
            Some(conn) if !conn.client.is_closed() => Ok(conn.clone()),
            _ => {
                let conn = self.fresh()?;
                *current = Some(conn.clone());
                Ok(conn)
            }
        }
    }

    /// The tree `name` (registered, so that [`PgKv::tree_names`] lists it while empty).
    pub fn open_tree(&self, name: &str) -> Result<PgTree, PgError> {
        let conn = self.reader()?;
        // Read first: a broker that only opens what exists writes nothing (a write to a
        // stale primary would wait for ever for a synchronous standby).
        let known = wait(
            conn.client
                .query_opt("SELECT 1 FROM concordat_trees WHERE name = $1", &[&name]),
        )?;
        if known.is_none() {
            wait(conn.client.execute(
                "INSERT INTO concordat_trees (name) VALUES ($1) ON CONFLICT DO NOTHING",
                &[&name],
            ))?;
        }
        Ok(PgTree {
            kv: self.clone(),
            name: name.into(),
        })
    }

    /// The names of the trees ever opened, in order.
    pub fn tree_names(&self) -> Result<Vec<String>, PgError> {
        let conn = self.reader()?;
        let rows = wait(
            conn.client
                .query("SELECT name FROM concordat_trees ORDER BY name", &[]),
        )?;
        rows.iter()
            .map(|r| r.try_get::<_, String>(0).map_err(PgError::from))
            .collect()
    }

    /// What the connected server's settings leave of the store's durability: one warning per
    /// setting that weakens it (empty when none does).
    pub fn durability_warnings(&self) -> Result<Vec<String>, PgError> {
        let conn = self.reader()?;
        durability_warnings(&conn.client)
    }

    /// Runs `f` in one transaction over `trees`: commits if it returns `Ok`, rolls back if it
    /// returns `Err`. The outer error is the database's; the inner result is `f`'s.
    pub fn transaction<T, E>(
        &self,
        trees: &[&PgTree],
        f: impl Fn(&PgTx<'_>) -> Result<T, E>,
    ) -> Result<Result<T, E>, PgError> {
        let guard = self.writer()?;
        let Some(conn) = guard.as_ref() else {
            return Err(PgError::Db("no writer connection".into()));
        };
        let heads = &self.shared.heads;
        // Continues the transaction `hold_head` began, if it began on this connection (one
        // made again since is not in it).
        let held = self
            .lock_held()
            .take()
            .is_some_and(|held| Arc::ptr_eq(&held, conn));
        // `BEGIN` goes out with the transaction's first statement (`PgTx::call`), and its
        // writes with `COMMIT`: one round trip each, not three.
        let tx = PgTx {
            conn,
            trees: trees.iter().map(|t| t.name.clone()).collect(),
            known: heads.known.load(Ordering::SeqCst),
            begun: std::cell::Cell::new(held),
            writes: RefCell::new(HashMap::new()),
            reads: RefCell::new(HashMap::new()),
            failed: RefCell::new(None),
        };
        let outcome = f(&tx);
        let failed = tx.failed.borrow_mut().take();
        let result = match (outcome, failed) {
            (Ok(value), None) => tx.commit().map(|generation| {
                if let Some(g) = generation {
                    heads.known.store(g, Ordering::SeqCst);
                }
                Ok(value)
            }),
            (_, Some(e)) => Err(e),
            (Err(e), None) => Ok(Err(e)),
        };
        if matches!(result, Ok(Ok(_))) {
            return result;
        }
        if tx.begun.get() {
            // Whatever failed, the session leaves the transaction (a statement that failed
            // leaves it aborted, and every later one would fail). A rollback that fails
            // leaves nothing behind either: the server ends the transaction with the session.
            let _ = wait(conn.client.batch_execute("ROLLBACK"));
        }
        if matches!(result, Err(PgError::Stale { .. })) {
            return result;
        }
        // A transaction that read what another node had committed since may have failed on
        // what its reads contradicted (the log's size against its frontier): the cause is the
        // stale state, and the transaction runs again once it is read again.
        if let Ok(row) = wait(
            conn.client
                .query_one("SELECT generation FROM concordat_head", &[]),
        ) && let Ok(now) = row.try_get::<_, i64>(0)
            && now != tx.known
        {
            return Err(moved(tx.known, now));
        }
        result
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, Option<Arc<Conn>>> {
        // Replaced whole, never torn.
        self.shared.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Begins a transaction on the writer connection that holds the head row: until it ends,
    /// no other node commits, so the state this node reads meanwhile stays current, and the
    /// next [`PgKv::transaction`] (which continues it) cannot be stale. For a transaction that
    /// was: taking turns this way, a node is never starved by faster ones.
    /// [`PgKv::release_head`] ends it if no transaction did.
    pub fn hold_head(&self) -> Result<(), PgError> {
        let guard = self.writer()?;
        let Some(conn) = guard.as_ref() else {
            return Err(PgError::Db("no writer connection".into()));
        };
        self.release_head_on(conn);
        let locked = wait(
            conn.client
                .batch_execute("BEGIN; SELECT generation FROM concordat_head FOR UPDATE"),
        );
        if let Err(e) = locked {
            let _ = wait(conn.client.batch_execute("ROLLBACK"));
            return Err(e.into());
        }
        *self.lock_held() = Some(conn.clone());
        Ok(())
    }

    /// Ends the transaction [`PgKv::hold_head`] began, if no transaction has continued it.
    pub fn release_head(&self) {
        if let Ok(guard) = self.writer()
            && let Some(conn) = guard.as_ref()
        {
            self.release_head_on(conn);
        }
    }

    fn release_head_on(&self, conn: &Arc<Conn>) {
        let held = self.lock_held().take();
        if held.is_some_and(|held| Arc::ptr_eq(&held, conn)) {
            let _ = wait(conn.client.batch_execute("ROLLBACK"));
        }
    }

    /// Claims the deliveries of the recipient `key` for one more subscription on this node:
    /// false when another node holds them (its subscriptions deliver them; one node at a time
    /// does, so an item is in flight on one node only). Every claim is ended by
    /// [`PgKv::unclaim`].
    pub fn claim(&self, key: i32) -> Result<bool, PgError> {
        let mut claims = self.lock_claims();
        let session = self.claims_session(&mut claims)?;
        if let Some(n) = claims.held.get_mut(&key) {
            *n += 1;
            return Ok(true);
        }
        let row =
            wait(session.query_one("SELECT pg_try_advisory_lock($1, $2)", &[&CLAIM_CLASS, &key]))?;
        let taken: bool = row.try_get(0)?;
        if taken {
            claims.held.insert(key, 1);
        }
        Ok(taken)
    }

    /// Ends one subscription's claim of the recipient `key`; the last one lets go of it.
    pub fn unclaim(&self, key: i32) {
        let mut claims = self.lock_claims();
        let Some(n) = claims.held.get_mut(&key) else {
            return;
        };
        *n -= 1;
        if *n > 0 {
            return;
        }
        claims.held.remove(&key);
        if let Some(session) = claims.session.as_ref().filter(|s| !s.is_closed()) {
            let _ =
                wait(session.execute("SELECT pg_advisory_unlock($1, $2)", &[&CLAIM_CLASS, &key]));
        }
    }

    fn lock_claims(&self) -> std::sync::MutexGuard<'_, Claims> {
        // Updated in whole steps.
        self.shared.claims.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The claims' session, made again if it broke (a failover), taking again the claims it
    /// held; one another node took meanwhile is lost (logged: until this node's
    /// subscriptions of it end, both nodes may deliver the same items, which agents take
    /// once by their ids).
    fn claims_session(&self, claims: &mut Claims) -> Result<Arc<Client>, PgError> {
        if let Some(session) = claims.session.as_ref().filter(|s| !s.is_closed()) {
            return Ok(session.clone());
        }
        let (config, tls) = (self.shared.config.clone(), self.shared.tls.clone());
        let session = Arc::new(on_runtime(&self.shared.runtime, connect(config, tls))?);
        for key in claims.held.keys() {
            let row = wait(
                session.query_one("SELECT pg_try_advisory_lock($1, $2)", &[&CLAIM_CLASS, key]),
            )?;
            if !row.try_get::<_, bool>(0)? {
                tracing::warn!(
                    claim = key,
                    "a delivery claim was lost with its session and another node holds it now"
                );
            }
        }
        claims.session = Some(session.clone());
        Ok(session)
    }

    /// The store's generation now: read it before reading the node's in-memory state, and
    /// record it with [`PgKv::reloaded_at`] after (a commit of another node in between makes
    /// the next transaction stale, and the state is read once more).
    pub fn generation(&self) -> Result<i64, PgError> {
        let conn = self.reader()?;
        let row = wait(
            conn.client
                .query_one("SELECT generation FROM concordat_head", &[]),
        )?;
        Ok(row.try_get(0)?)
    }

    /// Records that the store was found at `generation` (read by the node itself, not heard
    /// from the listener): if that is newer than the node's state, it is woken to catch up
    /// as when the listener hears a commit.
    pub fn hear(&self, generation: i64) {
        self.shared.heads.hear(generation);
    }

    /// Records that the node's in-memory state reflects the store at `generation`.
    pub fn reloaded_at(&self, generation: i64) {
        self.shared.heads.known.store(generation, Ordering::SeqCst);
    }

    /// Whether another node has committed since this node's state was read, as far as the
    /// listener has heard.
    pub fn moved(&self) -> bool {
        let heads = &self.shared.heads;
        heads.heard.load(Ordering::SeqCst) > heads.known.load(Ordering::SeqCst)
    }

    /// Calls `wake` (on the engine's own thread: keep it short) whenever another node's
    /// commit is heard.
    pub fn on_moved(&self, wake: Arc<dyn Fn() + Send + Sync>) {
        *self
            .shared
            .heads
            .wake
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(wake);
    }
}

/// Creates the database `name` (dropping any of that name first), connected as `admin` says:
/// for tests and tools that set up a server.
pub fn create_database(admin: &PgOptions, name: &str) -> Result<(), PgError> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(PgError::Config(format!(
            "{name:?} is not a plain database name"
        )));
    }
    let config: Config = admin
        .url
        .parse()
        .map_err(|e| PgError::Config(format!("the PostgreSQL URL: {e}")))?;
    let tls = tls_config(admin.ca_file.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| PgError::Db(format!("starting a runtime: {e}")))?;
    let name = name.to_owned();
    let background = Background::new(runtime);
    on_runtime(&background, async move {
        let client = connect(config, tls).await?;
        // One statement each: neither may run inside a transaction block.
        client
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
            .await?;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        Ok(())
    })
}

/// One warning per setting of the server behind `client` that weakens the store's durability.
fn durability_warnings(client: &Client) -> Result<Vec<String>, PgError> {
    let mut warnings = Vec::new();
    let show = |name: &'static str| wait(conn_show(client, name));
    let fsync = show("fsync")?;
    if fsync != "on" {
        warnings.push(format!(
            "fsync is {fsync}: a crash of the database server can lose or corrupt committed transfers (set fsync = on)"
        ));
    }
    let fpw = show("full_page_writes")?;
    if fpw != "on" {
        warnings.push(format!(
            "full_page_writes is {fpw}: a crash during a page write can corrupt the store (set full_page_writes = on)"
        ));
    }
    let sync = show("synchronous_commit")?;
    if !matches!(sync.as_str(), "on" | "remote_apply") {
        warnings.push(format!(
            "synchronous_commit is {sync} for this session: commits may be acknowledged before they are on a standby's disk"
        ));
    }
    let standbys = show("synchronous_standby_names")?;
    if standbys.trim().is_empty() {
        warnings.push(
            "synchronous_standby_names is empty: a commit is on the primary's disk only, so losing the primary loses acknowledged transfers (set it to 'ANY 1 (<standbys>)')".into(),
        );
    }
    Ok(warnings)
}

/// The durability warnings of the server `options` names (see [`PgKv::durability_warnings`]),
/// read over one connection that touches no table and takes no lock: what `check-config`
/// prints, while a broker may be running on the database.
pub fn server_warnings(options: &PgOptions) -> Result<Vec<String>, PgError> {
    let mut config: Config = options
        .url
        .parse()
        .map_err(|e| PgError::Config(format!("the PostgreSQL URL: {e}")))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    config.options("-c synchronous_commit=on");
    let tls = tls_config(options.ca_file.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| PgError::Db(format!("starting a runtime: {e}")))?;
    let runtime = Background::new(runtime);
    let client = on_runtime(&runtime, async move { connect(config, tls).await })?;
    durability_warnings(&client)
}

async fn conn_show(client: &Client, name: &str) -> Result<String, PgError> {
    let row = client
        .query_one("SELECT current_setting($1)", &[&name])
        .await?;
    Ok(row.try_get::<_, String>(0)?)
}

/// Creates the schema at its current version, or migrates an older one; refuses a newer one.
async fn migrate(client: &Client) -> Result<(), PgError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS concordat_schema (\
                 one boolean PRIMARY KEY DEFAULT true CHECK (one), \
                 version integer NOT NULL)",
        )
        .await?;
    client.batch_execute("BEGIN").await?;
    let result = async {
        client
            .batch_execute("LOCK TABLE concordat_schema IN EXCLUSIVE MODE")
            .await?;
        let row = client
            .query_opt("SELECT version FROM concordat_schema", &[])
            .await?;
        let version: i32 = match row {
            Some(row) => row.try_get(0)?,
            None => 0,
        };
        if version > SCHEMA_VERSION {
            return Err(PgError::Schema(format!(
                "the database's schema is version {version}; this broker knows versions up to {SCHEMA_VERSION}: run a broker at least as new as the one that wrote it"
            )));
        }
        if version < 1 {
            client
                .batch_execute(
                    "CREATE TABLE concordat_trees (name text PRIMARY KEY); \
                     CREATE TABLE concordat_kv (\
                         tree text NOT NULL, key bytea NOT NULL, value bytea NOT NULL, \
                         PRIMARY KEY (tree, key)); \
                     INSERT INTO concordat_schema (version) VALUES (1)",
                )
                .await?;
        }
        if version < 2 {
            // The head: the store's generation, advanced by every commit of every node.
            client
                .batch_execute(&format!(
                    "CREATE TABLE concordat_head (\
                         one boolean PRIMARY KEY DEFAULT true CHECK (one), \
                         generation bigint NOT NULL); \
                     INSERT INTO concordat_head (generation) VALUES (0); \
                     CREATE FUNCTION concordat_advance(known bigint, advance boolean) \
                     RETURNS bigint LANGUAGE plpgsql AS $f$ \
                     DECLARE g bigint; \
                     BEGIN \
                         SELECT generation INTO g FROM concordat_head FOR UPDATE; \
                         IF g <> known THEN \
                             RAISE EXCEPTION USING ERRCODE = '{STALE_STATE}', MESSAGE = g::text; \
                         END IF; \
                         IF NOT advance THEN RETURN g; END IF; \
                         UPDATE concordat_head SET generation = g + 1; \
                         PERFORM pg_notify('{CHANNEL}', (g + 1)::text); \
                         RETURN g + 1; \
                     END $f$; \
                     UPDATE concordat_schema SET version = 2"
                ))
                .await?;
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => client.batch_execute("COMMIT").await.map_err(PgError::from),
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

/// A tree of a [`PgKv`].
#[derive(Clone)]
pub struct PgTree {
    kv: PgKv,
    name: Arc<str>,
}

impl std::fmt::Debug for PgTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PgTree").field(&self.name).finish()
    }
}

impl PgTree {
    /// Runs `f` in one transaction over `trees` (see [`PgKv::transaction`]).
    pub fn transaction<T, E>(
        &self,
        trees: &[&PgTree],
        f: impl Fn(&PgTx<'_>) -> Result<T, E>,
    ) -> Result<Result<T, E>, PgError> {
        self.kv.transaction(trees, f)
    }

    /// The tree's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The value of `key`.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, PgError> {
        let conn = self.kv.reader()?;
        let row = wait(conn.client.query_opt(&conn.get, &[&&*self.name, &key]))?;
        row.map(|r| r.try_get::<_, Vec<u8>>(0).map_err(PgError::from))
            .transpose()
    }

    /// The values of `keys`, in their order, read in one round trip.
    pub fn get_many(&self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, PgError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let conn = self.kv.reader()?;
        let rows = wait(conn.client.query(&conn.get_many, &[&&*self.name, &keys]))?;
        let mut found = HashMap::with_capacity(rows.len());
        for row in rows {
            found.insert(row.try_get::<_, Vec<u8>>(0)?, row.try_get::<_, Vec<u8>>(1)?);
        }
        // A key asked twice is answered twice.
        Ok(keys.iter().map(|k| found.get(*k).cloned()).collect())
    }

    /// Sets `key` to `value`, committed when it returns.
    pub fn insert(&self, key: &[u8], value: &[u8]) -> Result<(), PgError> {
        let conn = self.kv.reader()?;
        let (trees, keys, values) = (vec![&*self.name], vec![key], vec![value]);
        wait(conn.client.execute(&conn.upsert, &[&trees, &keys, &values]))?;
        Ok(())
    }

    /// Sets `key` to `value` in an asynchronous commit (`synchronous_commit = off` for it
    /// alone): visible when it returns, on disk with the next synchronous commit, which the
    /// server flushes with everything before it in its WAL.
    pub fn insert_unsynced(&self, key: &[u8], value: &[u8]) -> Result<(), PgError> {
        let conn = self.kv.reader()?;
        let (trees, keys, values) = (vec![&*self.name], vec![key], vec![value]);
        let params: [&(dyn ToSql + Sync); 3] = [&trees, &keys, &values];
        let client = &conn.client;
        // One round trip; a failed upsert ends the transaction rolled back, and is returned.
        let sent = wait(async {
            futures::try_join!(
                client.batch_execute("BEGIN; SET LOCAL synchronous_commit TO off"),
                client.execute(&conn.upsert, &params),
                client.batch_execute("COMMIT"),
            )
        });
        if let Err(e) = sent {
            let _ = wait(client.batch_execute("ROLLBACK"));
            return Err(e.into());
        }
        Ok(())
    }

    /// Removes `key`, committed when it returns; its value before.
    pub fn remove(&self, key: &[u8]) -> Result<Option<Vec<u8>>, PgError> {
        let conn = self.kv.reader()?;
        let row = wait(conn.client.query_opt(&conn.remove, &[&&*self.name, &key]))?;
        row.map(|r| r.try_get::<_, Vec<u8>>(0).map_err(PgError::from))
            .transpose()
    }

    /// The keys and values in `range`, in key order (and from either end).
    pub fn range(&self, start: Bound<&[u8]>, end: Bound<&[u8]>) -> PgIter {
        // Bounds in one form: an inclusive lower bound, an exclusive upper one. Between byte
        // strings, `> k` is `>= k || 0` and `<= k` is `< k || 0`.
        let after = |k: &[u8]| {
            let mut v = k.to_vec();
            v.push(0);
            v
        };
        let lo = match start {
            Bound::Included(k) => k.to_vec(),
            Bound::Excluded(k) => after(k),
            Bound::Unbounded => Vec::new(),
        };
        let hi = match end {
            Bound::Included(k) => Some(after(k)),
            Bound::Excluded(k) => Some(k.to_vec()),
            Bound::Unbounded => None,
        };
        PgIter {
            tree: self.clone(),
            lo,
            hi,
            front: VecDeque::new(),
            back: VecDeque::new(),
            front_page: FIRST_PAGE,
            back_page: FIRST_PAGE,
            done: false,
        }
    }

    /// How many keys the tree holds (for tests and tools: it counts them all).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> Result<usize, PgError> {
        let conn = self.kv.reader()?;
        let row = wait(conn.client.query_one(
            "SELECT count(*) FROM concordat_kv WHERE tree = $1",
            &[&&*self.name],
        ))?;
        let n: i64 = row.try_get(0)?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }
}

/// A key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// A key of a transaction's tree, by the tree's position.
type TreeKey = (usize, Vec<u8>);

/// Key-value pairs of a range, fetched a page at a time from whichever end is read.
pub struct PgIter {
    tree: PgTree,
    /// What is left to fetch: keys from `lo` (inclusive) to `hi` (exclusive, or the end).
    lo: Vec<u8>,
    hi: Option<Vec<u8>>,
    /// Fetched from the front, ascending; fetched from the back, descending. Every key in
    /// `front` is below every key left to fetch, which is below every key in `back`.
    front: VecDeque<(Vec<u8>, Vec<u8>)>,
    back: VecDeque<(Vec<u8>, Vec<u8>)>,
    /// Rows the next fetch from each end asks for.
    front_page: i64,
    back_page: i64,
    done: bool,
}

impl PgIter {
    fn fetch(&mut self, ascending: bool) -> Result<Vec<Entry>, PgError> {
        let conn = self.tree.kv.reader()?;
        let name: &str = &self.tree.name;
        let page = if ascending {
            &mut self.front_page
        } else {
            &mut self.back_page
        };
        let limit = *page;
        *page = (*page * 2).min(PAGE);
        let rows = match (&self.hi, ascending) {
            (None, true) => wait(conn.client.query(&conn.asc, &[&name, &self.lo, &limit])),
            (None, false) => wait(conn.client.query(&conn.desc, &[&name, &self.lo, &limit])),
            (Some(hi), true) => wait(
                conn.client
                    .query(&conn.asc_to, &[&name, &self.lo, &limit, hi]),
            ),
            (Some(hi), false) => wait(
                conn.client
                    .query(&conn.desc_to, &[&name, &self.lo, &limit, hi]),
            ),
        }?;
        let page = rows
            .iter()
            .map(|r| Ok((r.try_get::<_, Vec<u8>>(0)?, r.try_get::<_, Vec<u8>>(1)?)))
            .collect::<Result<Vec<_>, PgError>>()?;
        // Narrow what is left to fetch past what this page holds.
        match (ascending, page.last()) {
            (true, Some((k, _))) => {
                self.lo = k.clone();
                self.lo.push(0);
            }
            (false, Some((k, _))) => self.hi = Some(k.clone()),
            _ => {}
        }
        Ok(page)
    }

    fn step(&mut self, ascending: bool) -> Option<Result<Entry, PgError>> {
        if self.done {
            return None;
        }
        let mine = if ascending {
            &mut self.front
        } else {
            &mut self.back
        };
        if let Some(item) = mine.pop_front() {
            return Some(Ok(item));
        }
        let exhausted = self.hi.as_ref().is_some_and(|hi| self.lo >= *hi);
        if !exhausted {
            match self.fetch(ascending) {
                Ok(page) if !page.is_empty() => {
                    let mine = if ascending {
                        &mut self.front
                    } else {
                        &mut self.back
                    };
                    mine.extend(page);
                    return mine.pop_front().map(Ok);
                }
                // Nothing left between the two ends.
                Ok(_) => self.hi = Some(self.lo.clone()),
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
        // What the other end fetched and has not yet returned comes next, nearest first.
        let theirs = if ascending {
            &mut self.back
        } else {
            &mut self.front
        };
        theirs.pop_back().map(Ok)
    }
}

impl Iterator for PgIter {
    type Item = Result<Entry, PgError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.step(true)
    }
}

impl DoubleEndedIterator for PgIter {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.step(false)
    }
}

/// The trees of a transaction in progress, by position.
pub struct PgTx<'a> {
    conn: &'a Conn,
    trees: Vec<Arc<str>>,
    /// The generation the node's state reflects, which the commit advances.
    known: i64,
    /// Whether `BEGIN` has been sent.
    begun: std::cell::Cell<bool>,
    /// The transaction's writes, sent at commit: (tree, key) → value, or `None` for removed.
    writes: RefCell<HashMap<TreeKey, Option<Vec<u8>>>>,
    /// What the transaction has read (`None`: absent). What another node commits after a
    /// read makes the commit fail as stale, so a read need not be repeated.
    reads: RefCell<HashMap<TreeKey, Option<Vec<u8>>>>,
    /// The first database error a call met: the transaction then rolls back and returns it.
    failed: RefCell<Option<PgError>>,
}

impl PgTx<'_> {
    /// The number of trees.
    pub fn len(&self) -> usize {
        self.trees.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.trees.is_empty()
    }

    /// The `i`th tree.
    pub fn tree(&self, i: usize) -> Option<PgTxTree<'_>> {
        (i < self.trees.len()).then_some(PgTxTree { tx: self, tree: i })
    }

    fn note<T>(&self, r: Result<T, PgError>) -> Result<T, PgError> {
        if let Err(e) = &r
            && let Ok(mut failed) = self.failed.try_borrow_mut()
            && failed.is_none()
        {
            *failed = Some(PgError::Db(e.to_string()));
        }
        r
    }

    fn read(&self, tree: usize, key: &[u8]) -> Result<Option<Vec<u8>>, PgError> {
        let at = (tree, key.to_vec());
        if let Some(written) = self.writes.borrow().get(&at) {
            return Ok(written.clone());
        }
        if let Some(read) = self.reads.borrow().get(&at) {
            return Ok(read.clone());
        }
        let name: &str = &self.trees[tree];
        let row = self.call(self.conn.client.query_opt(&self.conn.get, &[&name, &key]))?;
        let value = row
            .map(|r| r.try_get::<_, Vec<u8>>(0).map_err(PgError::from))
            .transpose()?;
        self.reads.borrow_mut().insert(at, value.clone());
        Ok(value)
    }

    /// Reads the keys of each tree (by position) in one round trip, for the reads that
    /// follow: one query per tree, all sent before any answer is awaited. Keys the
    /// transaction has written or read already are left out.
    fn prefetch(&self, wanted: Vec<(usize, Vec<Vec<u8>>)>) -> Result<(), PgError> {
        let wanted: Vec<(usize, Vec<Vec<u8>>)> = {
            let (writes, reads) = (self.writes.borrow(), self.reads.borrow());
            wanted
                .into_iter()
                .map(|(tree, keys)| {
                    let keys: Vec<Vec<u8>> = keys
                        .into_iter()
                        .filter(|k| {
                            let at = (tree, k.clone());
                            !writes.contains_key(&at) && !reads.contains_key(&at)
                        })
                        .collect();
                    (tree, keys)
                })
                .filter(|(tree, keys)| *tree < self.trees.len() && !keys.is_empty())
                .collect()
        };
        if wanted.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = wanted.iter().map(|(tree, _)| &*self.trees[*tree]).collect();
        let params: Vec<[&(dyn tokio_postgres::types::ToSql + Sync); 2]> = names
            .iter()
            .zip(&wanted)
            .map(|(name, (_, keys))| {
                [
                    name as &(dyn tokio_postgres::types::ToSql + Sync),
                    keys as &(dyn tokio_postgres::types::ToSql + Sync),
                ]
            })
            .collect();
        let answers = self.call(futures::future::try_join_all(
            params
                .iter()
                .map(|p| self.conn.client.query(&self.conn.get_many, p)),
        ))?;
        let mut reads = self.reads.borrow_mut();
        for ((tree, keys), rows) in wanted.into_iter().zip(answers) {
            for key in keys {
                reads.insert((tree, key), None);
            }
            for row in rows {
                let (k, v) = (row.try_get::<_, Vec<u8>>(0)?, row.try_get::<_, Vec<u8>>(1)?);
                reads.insert((tree, k), Some(v));
            }
        }
        Ok(())
    }

    /// Runs `statement` in the transaction, sending `BEGIN` ahead of it in the same round trip
    /// if it is the first.
    fn call<T>(
        &self,
        statement: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, PgError> {
        if self.begun.replace(true) {
            return Ok(wait(statement)?);
        }
        let (_, out) =
            wait(async { futures::try_join!(self.conn.client.batch_execute("BEGIN"), statement) })?;
        Ok(out)
    }

    /// Sends the head's compare-and-set, the transaction's writes and `COMMIT` in one round
    /// trip (after `BEGIN` if nothing was read). Requests on a connection run in the order
    /// they are sent, so `COMMIT` comes after the writes; if one of them failed, the
    /// transaction ends rolled back and the error is returned ([`PgError::Stale`] when another
    /// node had committed). Returns the generation the commit made, if it wrote anything.
    fn commit(&self) -> Result<Option<i64>, PgError> {
        let writes = self.writes.borrow();
        if writes.is_empty() && !self.begun.get() {
            return Ok(None);
        }
        let (mut up_t, mut up_k, mut up_v) = (Vec::new(), Vec::new(), Vec::new());
        let mut deletes = Vec::new();
        for ((tree, key), value) in writes.iter() {
            let name: &str = &self.trees[*tree];
            match value {
                Some(v) => {
                    up_t.push(name);
                    up_k.push(key.as_slice());
                    up_v.push(v.as_slice());
                }
                None => deletes.push((name, key.as_slice())),
            }
        }
        let client = &self.conn.client;
        let up: [&(dyn ToSql + Sync); 3] = [&up_t, &up_k, &up_v];
        let deletes: Vec<[&(dyn ToSql + Sync); 2]> =
            deletes.iter().map(|(t, k)| [t as _, k as _]).collect();
        // A transaction that only read checks the head without advancing it: what it
        // decided from this node's state stands only if nobody has changed the store.
        let advance = !writes.is_empty();
        let head: [&(dyn ToSql + Sync); 2] = [&self.known, &advance];
        let begin = !self.begun.replace(true);
        let sent = wait(async {
            let begin = async {
                if begin {
                    client.batch_execute("BEGIN").await
                } else {
                    Ok(())
                }
            };
            let upsert = async {
                if up_t.is_empty() {
                    Ok(0)
                } else {
                    client.execute(&self.conn.upsert, &up).await
                }
            };
            let delete = futures::future::try_join_all(
                deletes.iter().map(|p| client.execute(&self.conn.delete, p)),
            );
            futures::try_join!(
                begin,
                client.query_one(&self.conn.advance, &head),
                upsert,
                delete,
                client.batch_execute("COMMIT")
            )
        });
        match sent {
            Ok((_, row, ..)) => Ok(advance.then_some(row.try_get::<_, i64>(0)?)),
            Err(e) => Err(stale(&e, self.known).unwrap_or_else(|| e.into())),
        }
    }
}

/// The error `concordat_advance` raises when the head has moved past `known`, as
/// [`PgError::Stale`].
fn stale(e: &tokio_postgres::Error, known: i64) -> Option<PgError> {
    let db = e.as_db_error()?;
    (db.code().code() == STALE_STATE).then(|| moved(known, db.message().parse().unwrap_or(-1)))
}

/// The store's head at `now` where this node knew `known`: another node committed
/// ([`PgError::Stale`]), or the database is behind what this node committed (a stale primary
/// that missed the commits since: an error, and nothing is read from it as current).
fn moved(known: i64, now: i64) -> PgError {
    if now > known {
        PgError::Stale { known, now }
    } else {
        PgError::Db(format!(
            "the database's head is at generation {now}, behind the {known} this broker committed: acknowledged history was lost (a stale primary?); nothing is written to it"
        ))
    }
}

/// Reads the keys of several trees of one transaction in one round trip, so that the
/// transaction's reads of them cost none (trees of different transactions: a round trip each).
pub fn prefetch_trees(wanted: Vec<(PgTxTree<'_>, Vec<Vec<u8>>)>) -> Result<(), PgError> {
    let Some(tx) = wanted.first().map(|(t, _)| t.tx) else {
        return Ok(());
    };
    if wanted.iter().any(|(t, _)| !std::ptr::eq(t.tx, tx)) {
        for (t, keys) in wanted {
            t.prefetch(keys)?;
        }
        return Ok(());
    }
    tx.note(tx.prefetch(wanted.into_iter().map(|(t, keys)| (t.tree, keys)).collect()))
}

/// One tree of a transaction in progress.
#[derive(Clone, Copy)]
pub struct PgTxTree<'a> {
    tx: &'a PgTx<'a>,
    tree: usize,
}

impl PgTxTree<'_> {
    /// The value of `key`, as this transaction sees it.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, PgError> {
        self.tx.note(self.tx.read(self.tree, key))
    }

    /// Reads `keys` in one round trip, so that the transaction's reads of them cost none.
    pub fn prefetch(&self, keys: Vec<Vec<u8>>) -> Result<(), PgError> {
        self.tx.note(self.tx.prefetch(vec![(self.tree, keys)]))
    }

    /// Sets `key` to `value` when the transaction commits.
    pub fn insert(&self, key: &[u8], value: &[u8]) -> Result<(), PgError> {
        self.tx
            .writes
            .borrow_mut()
            .insert((self.tree, key.to_vec()), Some(value.to_vec()));
        Ok(())
    }

    /// Removes `key` when the transaction commits; its value as this transaction saw it.
    pub fn remove(&self, key: &[u8]) -> Result<Option<Vec<u8>>, PgError> {
        let before = self.get(key)?;
        self.delete(key);
        Ok(before)
    }

    /// Removes `key` when the transaction commits, without reading it first.
    pub fn delete(&self, key: &[u8]) {
        self.tx
            .writes
            .borrow_mut()
            .insert((self.tree, key.to_vec()), None);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use concordat_tests::postgres::PgCluster;

    fn options(cluster: &PgCluster, database: &str) -> PgOptions {
        let server = format!("postgres://postgres@127.0.0.1:{}", cluster.primary_port());
        let admin = PgOptions {
            url: format!("{server}/postgres"),
            pool: 1,
            ca_file: None,
        };
        create_database(&admin, database).unwrap();
        PgOptions {
            url: format!("{server}/{database}"),
            pool: 2,
            ca_file: None,
        }
    }

    fn keys(it: impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), PgError>>) -> Vec<Vec<u8>> {
        it.map(|r| r.unwrap().0).collect()
    }

    /// What the `EXPLAIN` statement `explain` prints on `conn`, a line per row.
    fn explain_text(conn: &Conn, explain: &str) -> String {
        wait(conn.client.query(explain, &[]))
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0) + "\n")
            .collect()
    }

    /// The plans the server runs, on `conn`, for every statement the engine prepared on it
    /// that reads or deletes rows of `tree` (`EXPLAIN ANALYZE` of each, by the name the server
    /// lists it under, with arguments made from its parameter types: keys 100 and 200 of the
    /// tree, a limit of 2), with the statement's text.
    fn plans(conn: &Conn, tree: &str) -> Vec<(String, String)> {
        let key = |n: u32| format!("'\\x{}'::bytea", hex::encode(n.to_be_bytes()));
        let statements = wait(conn.client.query(
            "SELECT name, statement, parameter_types::text[] FROM pg_prepared_statements \
             WHERE statement LIKE '%FROM concordat_kv WHERE%' \
             AND statement NOT LIKE '%pg_prepared_statements%'",
            &[],
        ))
        .unwrap();
        assert!(statements.len() >= 8, "{} statements", statements.len());
        statements
            .iter()
            .map(|row| {
                let (name, sql, types): (String, String, Vec<String>) =
                    (row.get(0), row.get(1), row.get(2));
                let mut keys = [key(100), key(200)].into_iter();
                let args: Vec<String> = types
                    .iter()
                    .map(|t| match t.as_str() {
                        "text" => format!("'{tree}'"),
                        "bytea" => keys.next().expect("at most two keys"),
                        "bigint" => "2".into(),
                        "bytea[]" => format!("ARRAY[{}, {}, '\\x00']", key(7), key(9)),
                        other => panic!("a parameter of type {other} in {sql}"),
                    })
                    .collect();
                let explain = format!(
                    "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) EXECUTE {name}({})",
                    args.join(", ")
                );
                (sql, explain_text(conn, &explain))
            })
            .collect()
    }

    /// Whatever the statistics said when the server planned the engine's statements, once a
    /// tree has grown they reach its rows through the primary key, instead of reading every
    /// row of the tree: `tree = $1 AND key = ANY($2)`, planned while the table was nearly
    /// empty, read the whole tree for each batch (each slower than the last), and after an
    /// `ANALYZE` of a table of a few rows even a single key's lookup was a scan of the table. Both
    /// starts of a new database are tried: before autovacuum's first `ANALYZE` and after one
    /// while the table was small. Each statement's generic plan is made on the small table
    /// and kept (`force_generic_plan`), as a prepared statement's is.
    #[test]
    fn lookups_stay_index_probes_on_a_grown_table() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = PgCluster::start(dir.path()).unwrap_or_else(|e| panic!("{e:#}"));
        for analyzed in [false, true] {
            let kv = PgKv::open(&PgOptions {
                pool: 1,
                ..options(&cluster, if analyzed { "analyzed" } else { "fresh" })
            })
            .unwrap();
            let t = kv.open_tree("t").unwrap();
            let conn = kv.reader().unwrap();
            wait(conn.client.batch_execute(
                "ALTER TABLE concordat_kv SET (autovacuum_enabled = false); \
                 SET plan_cache_mode = force_generic_plan",
            ))
            .unwrap();
            // A few rows of another tree and one of this one.
            let m = kv.open_tree("m").unwrap();
            for i in 0u8..5 {
                m.insert(&[i], b"v").unwrap();
            }
            t.insert(b"\x00", b"v").unwrap();
            if analyzed {
                wait(conn.client.batch_execute("ANALYZE concordat_kv")).unwrap();
            }
            plans(&conn, "t");
            kv.transaction(&[&t], |tx| {
                let tree = tx.tree(0).unwrap();
                for i in 0u32..20_000 {
                    tree.insert(&i.to_be_bytes(), b"v")?;
                }
                Ok::<_, PgError>(())
            })
            .unwrap()
            .unwrap();
            for (sql, plan) in plans(&conn, "t") {
                let why = format!("analyzed while small: {analyzed}\n{sql}\n{plan}");
                assert!(plan.contains("Index Cond"), "{why}");
                for bad in ["Seq Scan", "Rows Removed by Filter", "Sort"] {
                    assert!(!plan.contains(bad), "{bad}: {why}");
                }
            }
            // The head row can only be read by a scan: run, not compiled.
            let head = explain_text(
                &conn,
                // (With costs: EXPLAIN leaves JIT out of plans without them.)
                "EXPLAIN (ANALYZE, SUMMARY OFF) SELECT generation FROM concordat_head FOR UPDATE",
            );
            assert!(!head.contains("JIT"), "{head}");
            // The deletes were run: key 100 is gone.
            assert_eq!(t.get(&100u32.to_be_bytes()).unwrap(), None);
            assert_eq!(t.len().unwrap(), 20_000);
        }
    }

    /// One PostgreSQL cluster for the engine's own tests: pages from both ends of a range
    /// meet without losing or repeating a key, transactions read their own writes and apply
    /// all or nothing, a second node's commit makes a transaction stale, a newer schema is
    /// refused, and the server's settings are read for `check-config`.
    /// Connection errors name the servers tried, in order, with their ports (the default
    /// 5432 where the URL gives none), and never the URL's user, password or database. (The
    /// same text as `check-config`'s, `config::postgres_hosts`.)
    #[test]
    fn connection_errors_name_the_servers_and_nothing_secret() {
        let named = |url: &str| servers(&url.parse::<Config>().unwrap());
        assert_eq!(
            named("postgres://broker:s3cret@db-a:5433,db-b:5434/concordat"),
            "db-a:5433,db-b:5434"
        );
        assert_eq!(
            named("postgres://broker@db-a,db-b/concordat"),
            "db-a:5432,db-b:5432"
        );
        assert_eq!(named("postgres://db-a:6000,db-b/x"), "db-a:6000,db-b:5432");
        assert_eq!(
            named("host=/run/postgresql port=5433 user=broker password=s3cret"),
            "/run/postgresql:5433"
        );
        assert_eq!(named("user=broker"), "no host");
    }

    #[test]
    fn the_engine_on_a_real_server() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = PgCluster::start(dir.path()).unwrap_or_else(|e| panic!("{e:#}"));
        let opts = options(&cluster, "engine");
        let kv = PgKv::open(&opts).unwrap();
        let (t, u) = (kv.open_tree("t").unwrap(), kv.open_tree("u").unwrap());
        let all: Vec<Vec<u8>> = (0u32..1500).map(|i| i.to_be_bytes().to_vec()).collect();
        kv.transaction(&[&t], |tx| {
            let tree = tx.tree(0).unwrap();
            for k in &all {
                tree.insert(k, b"v")?;
            }
            Ok::<_, PgError>(())
        })
        .unwrap()
        .unwrap();
        assert_eq!(t.len().unwrap(), 1500);
        assert_eq!(keys(t.range(Bound::Unbounded, Bound::Unbounded)), all);
        let mut back = keys(t.range(Bound::Unbounded, Bound::Unbounded).rev());
        back.reverse();
        assert_eq!(back, all);
        // Alternating ends over a bounded range: every key once.
        let (lo, hi) = (10u32.to_be_bytes(), 1200u32.to_be_bytes());
        let mut it = t.range(Bound::Excluded(&lo[..]), Bound::Included(&hi[..]));
        let mut seen = Vec::new();
        loop {
            let (a, b) = (it.next(), it.next_back());
            if a.is_none() && b.is_none() {
                break;
            }
            seen.extend(a.into_iter().chain(b).map(|r| r.unwrap().0));
        }
        seen.sort();
        assert_eq!(seen, all[11..=1200].to_vec());
        let newest = t
            .range(Bound::Unbounded, Bound::Excluded(&700u32.to_be_bytes()[..]))
            .next_back()
            .unwrap()
            .unwrap();
        assert_eq!(newest.0, 699u32.to_be_bytes());

        // A transaction sees its own writes and commits them together.
        let five = 5u32.to_be_bytes();
        let moved = kv
            .transaction(&[&t, &u], |tx| {
                let (a, b) = (tx.tree(0).unwrap(), tx.tree(1).unwrap());
                a.prefetch(vec![five.to_vec(), b"absent".to_vec()])?;
                assert_eq!(a.get(b"absent")?, None);
                let old = a.remove(&five)?.expect("present");
                assert_eq!(a.get(&five)?, None);
                b.insert(b"x", &old)?;
                assert_eq!(b.get(b"x")?, Some(old));
                Ok::<_, PgError>(())
            })
            .unwrap();
        assert!(moved.is_ok());
        assert_eq!(
            (t.get(&five).unwrap(), u.get(b"x").unwrap()),
            (None, Some(b"v".to_vec()))
        );
        // Several trees read at once: each key answered from its own tree, a key the
        // transaction wrote keeps its written value, and absent keys read as absent.
        let (six, seven) = (6u32.to_be_bytes(), 7u32.to_be_bytes());
        let read = kv
            .transaction(&[&t, &u], |tx| {
                let (a, b) = (tx.tree(0).unwrap(), tx.tree(1).unwrap());
                a.insert(&seven, b"written")?;
                prefetch_trees(vec![
                    (a, vec![six.to_vec(), seven.to_vec(), b"x".to_vec()]),
                    (b, vec![b"x".to_vec(), six.to_vec()]),
                ])?;
                Ok::<_, PgError>([
                    a.get(&six)?,
                    a.get(&seven)?,
                    a.get(b"x")?,
                    b.get(b"x")?,
                    b.get(&six)?,
                ])
            })
            .unwrap()
            .unwrap();
        assert_eq!(
            read,
            [
                Some(b"v".to_vec()),
                Some(b"written".to_vec()),
                None,
                Some(b"v".to_vec()),
                None
            ]
        );
        assert_eq!(t.get(&seven).unwrap(), Some(b"written".to_vec()));
        // A delete without a read: gone within the transaction and after it.
        let eight = 8u32.to_be_bytes();
        let gone = kv
            .transaction(&[&t], |tx| {
                let a = tx.tree(0).unwrap();
                a.delete(&eight);
                a.get(&eight)
            })
            .unwrap()
            .unwrap();
        assert_eq!((gone, t.get(&eight).unwrap()), (None, None));
        // One that fails writes nothing.
        let failed = kv
            .transaction(&[&u], |tx| {
                tx.tree(0).unwrap().insert(b"y", b"1")?;
                Err::<(), _>(PgError::Config("changed my mind".into()))
            })
            .unwrap();
        assert!(failed.is_err());
        assert_eq!(u.get(b"y").unwrap(), None);
        // A write the server refuses (a key too long for its index: random bytes, so that
        // they do not compress) fails that transaction alone: the session does not stay in
        // the aborted transaction, and the next one commits.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let huge: Vec<u8> = (0..16_384)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        let refused = kv.transaction(&[&u], |tx| {
            tx.tree(0).unwrap().insert(&huge, b"v")?;
            Ok::<_, PgError>(())
        });
        assert!(refused.is_err(), "{refused:?}");
        let next = kv.transaction(&[&u], |tx| {
            tx.tree(0).unwrap().insert(b"z", b"1")?;
            Ok::<_, PgError>(())
        });
        assert!(matches!(next, Ok(Ok(()))), "{next:?}");
        assert_eq!(u.get(b"z").unwrap(), Some(b"1".to_vec()));
        assert_eq!(kv.tree_names().unwrap(), ["t", "u"]);

        // A second node on the same database: its commit makes this node's next transaction
        // stale (it writes nothing) until this node has read its state again, under the held
        // head or not; the other node hears of each commit.
        let other = PgKv::open(&opts).unwrap();
        let heard = Arc::new(AtomicUsize::new(0));
        let counter = heard.clone();
        kv.on_moved(Arc::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }));
        let put = |kv: &PgKv, key: &[u8]| {
            let u = kv.open_tree("u").unwrap();
            kv.transaction(&[&u], |tx| {
                tx.tree(0).unwrap().insert(key, b"1")?;
                Ok::<_, PgError>(())
            })
        };
        assert!(matches!(put(&other, b"from-other"), Ok(Ok(()))));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !kv.moved() {
            assert!(
                std::time::Instant::now() < deadline,
                "the commit was not heard"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(heard.load(Ordering::SeqCst) >= 1);
        let stale = put(&kv, b"from-kv");
        assert!(matches!(stale, Err(PgError::Stale { .. })), "{stale:?}");
        assert_eq!(u.get(b"from-kv").unwrap(), None);
        // Read-only transactions are checked too.
        let read = kv.transaction(&[&u], |tx| tx.tree(0).unwrap().get(b"z"));
        assert!(matches!(read, Err(PgError::Stale { .. })), "{read:?}");
        kv.hold_head().unwrap();
        let generation = kv.generation().unwrap();
        kv.reloaded_at(generation);
        assert!(!kv.moved());
        assert!(matches!(put(&kv, b"from-kv"), Ok(Ok(()))));
        assert_eq!(u.get(b"from-kv").unwrap(), Some(b"1".to_vec()));
        assert_eq!(kv.generation().unwrap(), generation + 1);
        // A hold no transaction used is let go: the other node commits again.
        kv.hold_head().unwrap();
        kv.release_head();
        let again = put(&other, b"other-again");
        assert!(matches!(again, Err(PgError::Stale { .. })), "{again:?}");
        other.reloaded_at(other.generation().unwrap());
        assert!(matches!(put(&other, b"other-again"), Ok(Ok(()))));
        // Delivery claims: counted per subscription on one node, refused to the other until
        // the last is ended, and freed when the node holding them goes.
        assert!(kv.claim(7).unwrap() && kv.claim(7).unwrap());
        assert!(!other.claim(7).unwrap());
        assert!(other.claim(8).unwrap());
        kv.unclaim(7);
        assert!(!other.claim(7).unwrap());
        kv.unclaim(7);
        assert!(other.claim(7).unwrap());
        assert!(!kv.claim(7).unwrap());
        drop(other);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !kv.claim(7).unwrap() {
            assert!(
                std::time::Instant::now() < deadline,
                "the claim outlived its node"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        kv.unclaim(7);
        // This cluster is set up for durability: nothing to warn about.
        assert_eq!(kv.durability_warnings().unwrap(), Vec::<String>::new());
        drop((kv, t, u, it));

        // A schema newer than this broker knows is refused, with the versions.
        let kv = PgKv::open(&opts).unwrap();
        let conn = kv.reader().unwrap();
        wait(
            conn.client
                .batch_execute("UPDATE concordat_schema SET version = 99"),
        )
        .unwrap();
        drop(conn);
        drop(kv);
        let Err(e) = PgKv::open(&opts) else {
            panic!("a newer schema was opened")
        };
        assert!(e.to_string().contains("version 99"), "{e}");
    }
}
