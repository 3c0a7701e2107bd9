//! Fuzz target `merkle`: the body is `concordat_proto::fuzzing::merkle`, which `cargo test` also
//! replays over the committed corpus in `proto/fuzz/corpus/merkle/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = concordat_proto::fuzzing::merkle(data);
});
