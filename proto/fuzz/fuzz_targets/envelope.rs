//! Fuzz target `envelope`: the body is `concordat_proto::fuzzing::envelope`, which `cargo test` also
//! replays over the committed corpus in `proto/fuzz/corpus/envelope/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = concordat_proto::fuzzing::envelope(data);
});
