//! Generates the gRPC code from `concordat/v1/*.proto` with protox (no system `protoc`), and writes
//! the encoded file descriptor set that the broker serves over gRPC reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "concordat/v1/concordat.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["."])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // tonic-prost-build ignores `file_descriptor_set_path` on the compile_fds path, so write it here.
    fs::write(out.join("concordat_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
