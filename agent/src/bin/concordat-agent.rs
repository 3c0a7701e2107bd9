//! `concordat-agent`: the agency-side daemon.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use concordat_agent::{
    config::{self, AgentConfig},
    daemon::{self, AgentSettings},
    logging::LogFormat,
    spool::Spool,
};

/// gRPC, TLS and sled allocate heavily from several threads; mimalloc is cheaper and fragments
/// less than the system allocator there (measured with `concordat bench relay`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    version,
    about = "The Concordat agent: moves an agency's files to and from the broker"
)]
struct Cli {
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
    /// Runs the agent until SIGINT or SIGTERM.
    Run {
        /// The agent configuration.
        #[arg(long)]
        config: PathBuf,
        /// How to write the log on standard error: `text`, or `json` (one object per line,
        /// for a SIEM). Overrides the configuration's `log_format`.
        #[arg(long, value_name = "text|json")]
        log_format: Option<LogFormat>,
    },
    /// Writes a commented sample DIR/agent.toml (spool directory = DIR) and the spool folders.
    Init {
        /// The directory.
        #[arg(long)]
        dir: PathBuf,
        /// The agency id (its certificate's Common Name) for the sample's file names.
        #[arg(long, default_value = "agency")]
        agency: String,
    },
}

fn main() -> ExitCode {
    concordat_support::memory::no_transparent_huge_pages();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", concordat_support::report(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
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
        Command::Init { dir, agency } => {
            let path = dir.join("agent.toml");
            if path.exists() {
                anyhow::bail!("{} already exists", path.display());
            }
            Spool::open(&dir)
                .with_context(|| format!("creating the spool folders in {}", dir.display()))?;
            std::fs::write(&path, config::sample(&agency))
                .with_context(|| format!("writing {}", path.display()))?;
            println!(
                "wrote {} and the spool folders outbox/, sent/, refused/, failed/, inbox/",
                path.display()
            );
            println!(
                "put ca.pem, {agency}.pem and {agency}.key beside it, then: concordat-agent run --config {}",
                path.display()
            );
            Ok(())
        }
        Command::Run { config, log_format } => {
            let config = AgentConfig::load(&config)?;
            concordat_agent::logging::init(
                log_format.unwrap_or(config.log_format),
                &config.log_level,
            )
            .map_err(|e| anyhow::anyhow!("installing the log subscriber: {e}"))?;
            rustls::crypto::ring::default_provider()
                .install_default()
                .map_err(|_| anyhow::anyhow!("a TLS crypto provider was already installed"))?;
            let settings = AgentSettings::from_config(&config)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async move {
                let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
                tokio::spawn(async move {
                    shutdown_signal().await;
                    let _ = stop_tx.send(true);
                });
                daemon::run(settings, stop_rx, None).await
            })
        }
    }
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: finishing the work in hand"),
                _ = term.recv() => tracing::info!("SIGTERM: finishing the work in hand"),
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
