//! Fuzz target `checkpoint`: the body is `concordat_proto::fuzzing::checkpoint`, which `cargo test` also
//! replays over the committed corpus in `proto/fuzz/corpus/checkpoint/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = concordat_proto::fuzzing::checkpoint(data);
});
