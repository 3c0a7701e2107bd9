//! Fuzz target `outbox`: the body is `concordat_agent::fuzzing::outbox`, which `cargo test` also
//! replays over the committed corpus in `agent/fuzz/corpus/outbox/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = concordat_agent::fuzzing::outbox(data);
});
