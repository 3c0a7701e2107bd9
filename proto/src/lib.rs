//! Concordat's protocol: the gRPC contract and the typed values that cross trust boundaries.
//!
//! A tour of the modules:
//! - [`pb`]: the code generated from `concordat/v1/concordat.proto` (messages, clients, servers).
//!   It stays behind this crate's edges: the rest of the code works with the domain types below,
//!   converted from the wire types with `TryFrom`, so a value that exists has been validated.
//! - [`ids`]: identifiers (`AgencyId`, `OrgId`, `MessageId`) as validated newtypes.
//! - [`envelope`]: message kinds, TLP markings and the validated [`envelope::Envelope`].
//! - [`paseto`]: PASETO v4.public (Ed25519) signing and strict verification.
//! - [`significance`]: national-significance designations (two officers' signed halves).
//! - [`paserk`]: PASERK keys (`k4.secret`, `k4.public`) and key ids (`k4.pid`).
//! - [`consent`]: consent tokens and revocation statements (`docs/consent-token.md`).
//! - [`merkle`]: the RFC 6962 Merkle tree of the audit log, its stored-hash layout and proofs.
//! - [`checkpoint`]: signed tree heads (C2SP tlog-checkpoint as a C2SP signed note).
//! - [`workflow`]: workflow steps (consultations, statements) and federation-unique references.
//! - [`audit`]: audit log entries: decoding, export filters, JSON view, explanation in words.
//! - `fuzzing` (hidden): the bodies of the fuzz targets in `proto/fuzz/`, replayed by `cargo test`.
//!
//! Architecture invariant: this crate does no I/O. No tokio, no sled, no files, no clocks read
//! except where a caller passes the time in.

pub mod audit;
pub mod checkpoint;
pub mod consent;
pub mod envelope;
#[doc(hidden)]
pub mod fuzzing;
pub mod ids;
pub mod merkle;
pub mod paserk;
pub mod paseto;
pub mod significance;
pub mod workflow;

/// Generated protobuf messages and gRPC stubs for `concordat.v1`.
#[allow(
    clippy::all,
    clippy::pedantic,
    unreachable_pub,
    missing_docs,
    rust_2018_idioms
)]
pub mod pb {
    tonic::include_proto!("concordat.v1");
}

/// The encoded `FileDescriptorSet` of `concordat.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/concordat_descriptor.bin"));
