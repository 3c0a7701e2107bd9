//! End-to-end tests: one test binary, one module per area.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod audit;
mod audit_crash;
mod backup;
mod cli_docs;
mod clock;
mod config;
mod config_reload;
mod consent;
mod content;
mod deadline;
mod failover;
mod flood;
mod full_disk;
mod inbox;
mod incident_refs;
mod leak;
mod logs;
mod metrics;
mod mtls;
mod refusals;
mod relay;
mod reviews;
mod services;
mod significance;
mod startup;
mod status;
mod stix_crosscheck;
mod store_damage;
mod tlp;
mod tls_reload;
mod units;
mod wire;
mod workflows;
mod workflows_cli;
