//! The agency side of Concordat: the agent daemon that moves files between the agency's spool
//! directory and the broker, and the operator tooling.
//!
//! A tour of the modules:
//! - [`audit_file`]: audit log exports: writing, offline verification, reading entries back.
//! - [`bench`](mod@bench): `concordat bench relay|audit|flood|gate`, benchmarks that print figures.
//! - [`client`]: connecting to the broker over mutual TLS.
//! - [`config`]: the agent's `agent.toml`.
//! - [`spool`]: the spool directory — outbox files in, receipts, refusals and deliveries out —
//!   with every write atomic and fsynced.
//! - [`daemon`]: the agent's two loops: sending the outbox and receiving deliveries, each
//!   reconnecting with a short capped backoff and saying why the broker is unreachable.
//! - [`demo`]: `concordat demo`, the whole federation in one process.
//! - [`logging`]: the binaries' log subscriber: text or JSON lines, colour only on a terminal.
//! - [`witness`]: checks the broker's audit log checkpoints in receipts, and their consistency.
//! - [`operator`]: the operator's commands (keys, consent tokens, revocation, sending).
//! - [`status`]: `concordat status` and `concordat consent list`, as text and as JSON.
//! - [`pki`]: development certificates (`concordat certs dev`, the demo, the test harness).
//! - `fuzzing` (hidden): the bodies of the fuzz targets in `agent/fuzz/`, replayed by `cargo test`.

pub mod audit_file;
pub mod bench;
pub mod client;
pub mod config;
pub mod daemon;
pub mod demo;
#[doc(hidden)]
pub mod fuzzing;
pub mod logging;
pub mod operator;
pub mod pki;
pub mod spool;
pub mod status;
pub mod witness;
