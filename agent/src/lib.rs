//! The agency side of Concordat: the agent daemon that moves files between the agency's spool
//! directory and the broker. It depends on the wire contract (`concordat-proto`) and the
//! binaries' shared conventions (`concordat-support`) only, never on the broker; the operator CLI
//! (`concordat`, with the demo and the benchmarks) is the crate `concordat-cli`.
//!
//! A tour of the modules:
//! - [`client`]: connecting to the broker over mutual TLS, and reading its refusals.
//! - [`config`]: the agent's `agent.toml`.
//! - [`spool`]: the spool directory — outbox files in, receipts, refusals and deliveries out —
//!   with every write atomic and fsynced.
//! - [`daemon`]: the agent's two loops: sending the outbox and receiving deliveries, each
//!   reconnecting with a short capped backoff and saying why the broker is unreachable.
//! - [`pipeline`]: one `SendStream` shared by the files of a pass over the outbox, each
//!   waiting for its own answer.
//! - [`logging`]: the binaries' log subscriber (`concordat_support::logging`).
//! - [`witness`]: checks the broker's audit log checkpoints in receipts, and their consistency.
//! - `fuzzing` (hidden): the body of the fuzz target in `agent/fuzz/`, replayed by `cargo test`.

pub mod client;
pub mod config;
pub mod daemon;
#[doc(hidden)]
pub mod fuzzing;
pub use concordat_support::logging;
pub mod pipeline;
pub mod spool;
pub mod witness;
