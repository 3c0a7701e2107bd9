//! `concordat-broker`: runs the broker, checks a configuration file or a stopped store, and backs
//! up and restores a store.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context;
use clap::{Parser, Subcommand};
use concordat_broker::{config::Config, control, logging::LogFormat};

/// gRPC, TLS and sled allocate heavily from several threads; mimalloc is cheaper and fragments
/// less than the system allocator there (measured with `concordat bench relay`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    version,
    about = "The Concordat broker: consent-gated relay between agencies"
)]
struct Cli {
    /// How to write the log on standard error: `text`, or `json` (one object per line, for a
    /// SIEM). Overrides the configuration's `log_format`; default text.
    #[arg(long, global = true, value_name = "text|json")]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prints a shell completion script for this command (bash, zsh, fish, elvish,
    /// powershell).
    Completions {
        /// The shell.
        shell: concordat_support::cli_docs::Shell,
    },
    /// Writes man pages, one per command and subcommand, into a directory.
    Man {
        /// The directory (created if missing).
        #[arg(long)]
        out_dir: std::path::PathBuf,
    },
    /// Runs the broker until SIGINT or SIGTERM; SIGHUP reloads the configuration file (and
    /// the TLS certificate, key, client CA and CRLs it names).
    Serve {
        /// The configuration file; without it, the embedded development default.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Overrides the configured listen address (use port 0 for any free port).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Overrides the configured data directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Asks the running broker to reload its configuration (SIGHUP to the pid in its data
    /// directory) and prints the outcome: what changed, what needs a restart, or why the
    /// reload failed and the configuration in force stayed. Exits non-zero if it failed or no
    /// broker runs.
    Reload {
        /// The broker's configuration file (for its data directory).
        #[arg(long, conflicts_with = "data_dir")]
        config: Option<PathBuf>,
        /// The broker's data directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// How long to wait for the outcome, in seconds.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
        /// Prints the outcome as JSON (the broker's `last-reload.json`).
        #[arg(long)]
        json: bool,
    },
    /// Validates a configuration file and prints what it found.
    CheckConfig {
        /// The configuration file.
        file: PathBuf,
    },
    /// Checks a stopped broker's store offline: recomputes the whole audit log tree from the
    /// stored entries, checks every stored hash, both checkpoints, every queue item and every
    /// receipt. Exits 0 if the store is whole, 1 if not.
    Verify {
        /// The configuration file (for the log's origin); without it, the embedded default.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The data directory (default: the configuration's).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// If the store is whole, publish its latest checkpoint beside it (for a data
        /// directory last served by a broker that did not keep that file).
        #[arg(long)]
        publish_checkpoint: bool,
    },
    /// Writes a consistent snapshot of the broker's store (database and log key) to a file. A
    /// broker running on the data directory takes it between two write batches, through its
    /// admin socket (`<data_dir>/admin.sock`), while it goes on serving; with none running, the
    /// store is read directly. The file holds the audit log's signing key: keep it as secret as
    /// the data directory.
    Backup {
        /// The configuration file (for the data directory and log origin); without it, the
        /// embedded default.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The data directory (default: the configuration's).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The backup file to write (replaced atomically, mode 0600).
        #[arg(long)]
        out: PathBuf,
    },
    /// Restores a backup into a new or empty data directory, checks it as the broker does at
    /// start and as `verify` does, and prints its log size and checkpoint. Serving a snapshot
    /// older than checkpoints already handed out forks the log: read the warning it prints.
    Restore {
        /// The backup file.
        #[arg(long)]
        from: PathBuf,
        /// The data directory to create (it must not exist, or be empty).
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Prints the audit log's verifier key (name+keyid+base64), creating the log key in the
    /// data directory if the broker has never run. Give it to agents (`log_key`) and auditors.
    LogKey {
        /// The configuration file; without it, the embedded development default.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Overrides the configured data directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

fn load(config: Option<&PathBuf>) -> anyhow::Result<Config> {
    Ok(match config {
        Some(path) => Config::load(path)?,
        None => Config::embedded_default()?,
    })
}

fn main() -> ExitCode {
    concordat_support::memory::no_transparent_huge_pages();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(cli));
    // A broker that gave up on its storage may have a thread stuck in a flush for good: do not
    // wait for it.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", concordat_support::report(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// Installs the log subscriber: `--log-format`, else the configuration's `log_format`, else
/// text (see `concordat_support::logging`).
fn init_logging(flag: Option<LogFormat>, config: Option<&Config>) -> anyhow::Result<()> {
    let format = flag.or(config.map(|c| c.log_format)).unwrap_or_default();
    concordat_support::logging::init(format, "info")
        .map_err(|e| anyhow::anyhow!("installing the log subscriber: {e}"))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // `serve` reads its configuration first, for its `log_format`; the other commands log
    // little and take only the flag.
    if !matches!(cli.command, Command::Serve { .. }) {
        init_logging(cli.log_format, None)?;
    }
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a TLS crypto provider was already installed"))?;

    match cli.command {
        Command::Completions { shell } => {
            concordat_support::cli_docs::completions(
                <Cli as clap::CommandFactory>::command(),
                shell,
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man { out_dir } => {
            let files = concordat_support::cli_docs::man_pages(
                <Cli as clap::CommandFactory>::command(),
                &out_dir,
            )
            .with_context(|| format!("writing man pages into {}", out_dir.display()))?;
            for f in files {
                println!("{}", f.display());
            }
            Ok(())
        }
        Command::CheckConfig { file } => {
            let config = Config::load(&file)?;
            print!("{}", config.summary());
            for warning in config.warnings(time::OffsetDateTime::now_utc().date()) {
                println!("warning: {warning}");
            }
            if let concordat_broker::config::StorageEngine::Postgres(pg) = &config.storage {
                // The server's settings, read without touching the database (a running
                // broker may hold it).
                match concordat_broker::store::postgres::server_warnings(&pg.options()) {
                    Ok(warnings) => {
                        for warning in warnings {
                            println!("warning: PostgreSQL: {warning}");
                        }
                    }
                    Err(e) => println!(
                        "warning: PostgreSQL at {} could not be asked for its settings: {e}",
                        concordat_broker::config::postgres_hosts(&pg.url)
                    ),
                }
            }
            println!("ok");
            Ok(())
        }
        Command::Verify {
            config,
            data_dir,
            publish_checkpoint,
        } => verify(config, data_dir, publish_checkpoint),
        Command::Reload {
            config,
            data_dir,
            timeout,
            json,
        } => reload(config, data_dir, timeout, json),
        Command::Backup {
            config,
            data_dir,
            out,
        } => backup(config, data_dir, &out),
        Command::Restore { from, data_dir } => restore(&from, &data_dir),
        Command::LogKey { config, data_dir } => {
            let mut config = load(config.as_ref())?;
            if let Some(dir) = data_dir {
                config.data_dir = dir;
            }
            std::fs::create_dir_all(&config.data_dir)
                .with_context(|| format!("creating {}", config.data_dir.display()))?;
            let key = concordat_broker::audit_log::load_or_create_key(
                &config.data_dir,
                &config.log_origin,
            )?;
            println!("{}", key.verifier_key());
            Ok(())
        }
        Command::Serve {
            config,
            listen,
            data_dir,
        } => {
            let mut config = load(config.as_ref())?;
            init_logging(cli.log_format, Some(&config))?;
            if let Some(listen) = listen {
                config.listen = listen;
            }
            if let Some(dir) = data_dir {
                config.data_dir = dir;
            }
            let listener =
                bind(config.listen).with_context(|| format!("binding {}", config.listen))?;
            // SIGHUP is caught from the start: it reloads, and never kills the process. Each
            // outcome is written for `concordat-broker reload`.
            let (reload, reloads) = concordat_broker::reload::channel();
            let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .context("installing the SIGHUP handler")?;
            let data_dir = config.data_dir.clone();
            tokio::spawn(async move {
                let mut generation = 0;
                while hangup.recv().await.is_some() {
                    tracing::info!("SIGHUP: reloading the configuration");
                    let outcome = reload.reload().await;
                    generation += 1;
                    let record = control::LastReload::of(std::process::id(), generation, &outcome);
                    if let Err(e) = control::record_reload(&data_dir, &record) {
                        tracing::error!(error = %e, "writing the reload's outcome");
                    }
                }
            });
            // Written once the broker serves (it then holds the database's lock), removed
            // when it stops.
            let mut pid_file = None;
            let data_dir = config.data_dir.clone();
            concordat_broker::serve_with(config, listener, shutdown_signal(), reloads, |addr| {
                match control::PidFile::create(&data_dir) {
                    Ok(f) => pid_file = Some(f),
                    Err(e) => tracing::warn!(
                        error = %e,
                        "cannot write the pid file; `concordat-broker reload` will not find this broker"
                    ),
                }
                // One line on stdout that scripts and tests wait for: the broker is ready (the
                // store is open and checked, the log key exists, every listener is bound).
                println!("concordat-broker listening on {addr}");
            })
            .await?;
            drop(pid_file);
            Ok(())
        }
    }
}

/// `concordat-broker reload`.
fn reload(
    config: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    timeout: u64,
    json: bool,
) -> anyhow::Result<()> {
    let data_dir = match (data_dir, config) {
        (Some(dir), _) => dir,
        (None, config) => load(config.as_ref())?.data_dir,
    };
    let outcome =
        control::request_reload(&data_dir, std::time::Duration::from_secs(timeout.max(1)))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
    } else if outcome.ok() {
        print!("{}", outcome.describe());
    }
    if !outcome.ok() {
        // Said once, on standard error.
        anyhow::bail!("{}", outcome.describe().trim_end());
    }
    Ok(())
}

/// `concordat-broker verify`.
fn verify(
    config: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    publish_checkpoint: bool,
) -> anyhow::Result<()> {
    use concordat_broker::audit_log;
    let mut config = load(config.as_ref())?;
    if let Some(dir) = data_dir {
        config.data_dir = dir;
    }
    let dir = &config.data_dir;
    let is_sled = config.storage == concordat_broker::config::StorageEngine::Sled;
    if is_sled && !dir.join(audit_log::DB_DIR).is_dir() {
        anyhow::bail!("{} holds no broker database", dir.display());
    }
    println!("verifying the store in {}", dir.display());
    let storage = concordat_broker::open_store(&config)
        .with_context(|| format!("opening the store of {}", dir.display()))?;
    let report = storage.verify()?;
    let secs = report.elapsed.as_secs_f64().max(1e-9);
    let hex = |c: Option<(u64, concordat_proto::merkle::Hash)>| match c {
        Some((size, root)) => format!("{size} entries, root {}", root.to_hex()),
        None => "none".into(),
    };
    println!(
        "audit log: {} entries rehashed, {} stored hashes compared, in {:.2} s ({:.0} entries/s)",
        report.entries,
        report.hashes,
        secs,
        report.entries as f64 / secs
    );
    println!("checkpoint in the database: {}", hex(report.checkpoint));
    println!("published checkpoint:       {}", hex(report.published));
    println!(
        "queue items: {}; receipts: {}; TLP records: {}",
        report.queue_items, report.receipts, report.tlp_records
    );
    if report.unpublished && !publish_checkpoint {
        println!(
            "problem: no published checkpoint ({}) beside a log of {} entries; if this \
             directory was last served by a broker that did not keep one, run again with \
             --publish-checkpoint",
            dir.join(audit_log::PUBLISHED_CHECKPOINT_FILE).display(),
            report.entries
        );
        anyhow::bail!("the store in {} has no published checkpoint", dir.display());
    }
    if !report.ok() {
        for p in &report.problems {
            println!("problem: {p}");
        }
        anyhow::bail!(
            "the store in {} is not whole: {} problem(s); do not serve it (README: \"When the \
             broker refuses to start\")",
            dir.display(),
            report.problem_count
        );
    }
    if publish_checkpoint && let Some(cp) = storage.publish_latest()? {
        println!(
            "published the database's checkpoint of {} entries beside it",
            cp.size
        );
    }
    println!("ok: the store is whole");
    Ok(())
}

/// `concordat-broker backup`: through the running broker's admin socket, or directly from a
/// stopped broker's store; written to a temporary file beside `out`, checked whole, synced and
/// renamed.
fn backup(config: Option<PathBuf>, data_dir: Option<PathBuf>, out: &Path) -> anyhow::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut config = load(config.as_ref())?;
    if let Some(dir) = data_dir {
        config.data_dir = dir;
    }
    let dir = config.data_dir.clone();
    let name = out
        .file_name()
        .with_context(|| format!("--out {} names no file", out.display()))?
        .to_string_lossy()
        .into_owned();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    let written = (|| -> anyhow::Result<String> {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, &file);
        let how =
            match concordat_broker::admin::request_backup(&dir, &mut w).with_context(|| {
                format!(
                    "asking the broker running on {} for a backup",
                    dir.display()
                )
            })? {
                Some(fetched) => format!(
                    "taken by the broker running on {} between two write batches; its writer \
                 paused for {:.1} ms",
                    dir.display(),
                    fetched.paused.as_secs_f64() * 1000.0
                ),
                None => {
                    snapshot_stopped(&config, &file)?;
                    format!("read directly: no broker is running on {}", dir.display())
                }
            };
        w.flush()
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        Ok(how)
    })();
    let checked = written.and_then(|how| {
        let (header, counts) =
            concordat_broker::backup::check(&tmp).context("checking the backup just written")?;
        std::fs::rename(&tmp, out)
            .with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
        std::fs::File::open(&parent)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", parent.display()))?;
        Ok((how, header, counts))
    });
    let (how, header, counts) = match checked {
        Ok(x) => x,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "backup written to {}: {bytes} bytes, {} records in {} trees",
        out.display(),
        counts.pairs,
        counts.trees
    )?;
    writeln!(stdout, "snapshot {how}")?;
    writeln!(
        stdout,
        "audit log: {} entries, sealed by the checkpoint:",
        header.log_size
    )?;
    for line in header.checkpoint.lines() {
        writeln!(stdout, "  {line}")?;
    }
    writeln!(
        stdout,
        "the file holds the audit log's signing key: keep it as secret as the data directory"
    )?;
    Ok(())
}

/// Snapshots the store of a stopped broker: opened directly (which fails while a broker holds
/// it) and checked as at start first, so that a backup is never taken of a damaged store.
fn snapshot_stopped(config: &Config, out: &std::fs::File) -> anyhow::Result<()> {
    use concordat_broker::{audit_log, backup, config::StorageEngine, store};
    let dir = &config.data_dir;
    if config.storage == StorageEngine::Sled && !dir.join(audit_log::DB_DIR).is_dir() {
        anyhow::bail!("{} holds no broker database", dir.display());
    }
    let storage = concordat_broker::open_store(config).with_context(|| {
        format!(
            "opening the store in {} (a broker running on it without its admin socket holds \
             it: stop it, or see its log for why the socket is missing)",
            dir.display()
        )
    })?;
    store::check_recovered(&storage, dir)?;
    backup::write_snapshot(&storage, out)?;
    Ok(())
}

/// `concordat-broker restore`.
fn restore(from: &Path, data_dir: &Path) -> anyhow::Result<()> {
    use concordat_broker::backup;
    let restored = backup::restore(from, data_dir)?;
    let (h, r) = (&restored.header, &restored.report);
    println!(
        "restored {} into {}: {} records in {} trees; the store verifies ({} audit entries \
         rehashed, {} queue items, {} receipts)",
        from.display(),
        data_dir.display(),
        restored.counts.pairs,
        restored.counts.trees,
        r.entries,
        r.queue_items,
        r.receipts
    );
    println!(
        "snapshot taken at {} by concordat-broker {}",
        h.created_at, h.broker_version
    );
    if let Some((size, root)) = r.checkpoint {
        println!(
            "audit log: {size} entries, checkpoint root {}",
            root.to_hex()
        );
    }
    println!("checkpoint:");
    for line in h.checkpoint.lines() {
        println!("  {line}");
    }
    println!("{}", backup::fork_warning(h));
    Ok(())
}

/// The listen backlog: connections the kernel completes before the broker accepts them. The
/// accept loop never waits, so this only has to absorb bursts (the standard library's 128 is
/// too few for hundreds of agents reconnecting at once); the kernel caps it at `somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr` with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`, as `TcpListener::bind` sets it).
fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
    }
}
