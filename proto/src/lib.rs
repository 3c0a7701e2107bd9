//! Concordat's protocol: the gRPC contract and the typed values that cross trust boundaries.
//!
//! A tour of the modules:
//! - [`pb`]: the code generated from `concordat/v1/concordat.proto` (messages, clients, servers).
//!   It stays behind this crate's edges: the rest of the code works with the domain types below,
//!   converted from the wire types with `TryFrom`, so a value that exists has been validated.
//! - [`ids`]: identifiers (`AgencyId`, `OrgId`, `MessageId`) as validated newtypes.
//! - [`envelope`]: message kinds, TLP markings and the validated [`envelope::Envelope`].
//!
//! Architecture invariant: this crate does no I/O. No tokio, no sled, no files, no clocks read
//! except where a caller passes the time in.

pub mod envelope;
pub mod ids;

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
