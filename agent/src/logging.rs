//! How the agent's binaries write their logs: the broker library's `logging` module, re-exported
//! so that the agent's configuration and binaries name it as their own. (The agent library
//! already depends on the broker library for `concordat demo` and `concordat bench`; when the
//! operator CLI gets its own crate, this is the one module to move.)

pub use concordat_broker::logging::{LogFormat, init};
