//! What every Concordat binary shares, in a crate of its own so that the agent daemon does not
//! link the broker to get it:
//! - [`logging`]: the log subscriber: text or JSON lines, colour only on a terminal.
//! - [`cli_docs`]: shell completions and man pages, generated from the binaries' clap definitions.
//! - [`report()`]: an error and its causes on one line, each said once.
//! - [`memory`]: how the binaries ask the kernel for memory (no transparent huge pages), and
//!   how much they hold.
//! - [`pg_cluster`]: a throwaway PostgreSQL primary with a synchronous standby, for the tests
//!   and for `concordat bench relay --storage postgres`; [`poll`]: waiting for it, and for
//!   anything else, without guessed sleeps.
//! - [`runtime`]: a Tokio runtime that may be dropped inside another.
//! - [`escape`]: text written by others (file names, token claims, a peer's strings), escaped
//!   for printing on one line.

pub mod cli_docs;
pub mod escape;
pub mod logging;
pub mod memory;
#[cfg(target_os = "linux")]
pub mod pg_cluster;
pub mod poll;
mod report;
pub mod runtime;

pub use report::report;
