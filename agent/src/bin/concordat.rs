//! `concordat`: the operator CLI.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "Concordat operator tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Certificates for development federations.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Generates a development PKI: a CA, the broker's certificate (SANs localhost and
    /// 127.0.0.1) and one client certificate per agency and auditor (CN = id).
    Dev {
        /// Where to write the files.
        #[arg(long)]
        out: PathBuf,
        /// Comma-separated agency ids.
        #[arg(long, value_delimiter = ',', required = true)]
        agencies: Vec<String>,
        /// Comma-separated auditor ids.
        #[arg(long, value_delimiter = ',')]
        auditors: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a TLS crypto provider was already installed"))?;
    match cli.command {
        Command::Certs {
            command:
                CertsCommand::Dev {
                    out,
                    agencies,
                    auditors,
                },
        } => {
            for id in agencies.iter().chain(&auditors) {
                id.parse::<concordat_proto::ids::AgencyId>()
                    .with_context(|| format!("{id:?} is not a valid agency or auditor id"))?;
            }
            let files = concordat_agent::pki::write_dev_pki(&out, &agencies, &auditors)
                .with_context(|| format!("writing the development PKI to {}", out.display()))?;
            for f in files {
                println!("wrote {}", f.display());
            }
            Ok(())
        }
    }
}
