//! Fuzz target `paseto`: the body is `concordat_proto::fuzzing::paseto`, which `cargo test` also
//! replays over the committed corpus in `proto/fuzz/corpus/paseto/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = concordat_proto::fuzzing::paseto(data);
});
