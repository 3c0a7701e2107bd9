//! The agency side of Concordat: the client that talks to the broker, and the operator tooling.
//!
//! A tour of the modules:
//! - [`client`]: connecting to the broker over mutual TLS.
//! - [`pki`]: development certificates (`concordat certs dev`, the demo, the test harness).

pub mod client;
pub mod pki;
