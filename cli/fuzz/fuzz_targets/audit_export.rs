//! Fuzz target `audit_export`: the body is `concordat_cli::fuzzing::audit_export`, which `cargo test` also
//! replays over the committed corpus in `cli/fuzz/corpus/audit_export/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = concordat_cli::fuzzing::audit_export(data);
});
