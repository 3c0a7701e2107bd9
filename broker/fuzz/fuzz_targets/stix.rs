//! Fuzz target `stix`: the body is `concordat_broker::content::fuzz_stix`, which reads arbitrary
//! bytes as a STIX 2.1 bundle, an incident record and plain JSON and walks every string of what
//! it accepts. `cargo test` replays the STIX corpus in `broker/testdata/stix/` through it; the
//! same files seed this target (`cargo +nightly fuzz run stix broker/testdata/stix`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    concordat_broker::content::fuzz_stix(data);
});
