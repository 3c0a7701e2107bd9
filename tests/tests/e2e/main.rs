//! End-to-end tests: one test binary, one module per area.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod audit;
mod audit_crash;
mod config;
mod consent;
mod flood;
mod mtls;
mod relay;
mod services;
mod tls_reload;
