//! Fuzz target `paserk`: the body is `concordat_proto::fuzzing::paserk`, which `cargo test` also
//! replays over the committed corpus in `proto/fuzz/corpus/paserk/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = concordat_proto::fuzzing::paserk(data);
});
