//! The operator's side of Concordat: the `concordat` command and what it is made of. It talks to
//! the broker through the agent's client (`concordat_agent::client`); only `concordat demo` and
//! `concordat bench`, which run a broker in-process, link the broker itself.
//!
//! A tour of the modules:
//! - [`operator`]: the operator's commands (keys, consent tokens, revocation, sending,
//!   national-significance designations, receipts).
//! - [`status`]: `concordat status` and `concordat consent list`, as text and as JSON.
//! - [`audit_file`]: audit log exports: writing, offline verification, reading entries back.
//! - [`workflows`]: `concordat dsar|comms|incident`, the MoUs' workflows, and the story of one
//!   told from the audit log (`audit explain --workflow`).
//! - [`pki`]: development certificates (`concordat certs dev`, the demo, the test harness).
//! - [`demo`]: `concordat demo`, the whole federation in one process.
//! - [`bench`](mod@bench): `concordat bench relay|audit|flood|gate`, benchmarks that print figures.
//! - `fuzzing` (hidden): the body of the fuzz target in `cli/fuzz/`, replayed by `cargo test`.

pub mod agreement;
pub mod audit_file;
pub mod bench;
pub mod demo;
#[doc(hidden)]
pub mod fuzzing;
pub mod operator;
pub mod pki;
pub mod status;
pub mod workflows;
