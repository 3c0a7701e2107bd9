//! How sled's memory grows with what it holds, apart from the broker: writes keys shaped like
//! the broker's receipts (sender and message id, 45 bytes of value) into a fresh sled
//! database opened with the broker's own configuration ([`sled_config`]), and prints the
//! process's resident memory as the database grows.
//!
//! ```text
//! cargo run --release -p concordat-broker --example sled_memory -- 2400000
//! ```
//!
//! The broker's memory over a long `concordat bench relay` run grows on sled and stays level
//! on PostgreSQL; this shows the part that is sled's: sled 0.34 keeps an entry in memory for
//! every page of the tree, paged out or not, whatever its cache capacity.

use std::time::Instant;

use concordat_broker::store::kv::sled_config;
use concordat_support::memory::resident_mib;

// The broker's allocator, so that the figures are the broker's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    // As the broker starts (its allocator above, and no transparent huge pages).
    concordat_support::memory::no_transparent_huge_pages();
    let keys: u64 = match std::env::args().nth(1) {
        Some(n) => n.parse()?,
        None => 2_400_000,
    };
    let dir = tempfile::tempdir()?;
    let db = sled_config(dir.path()).open()?;
    let receipts = db.open_tree("receipts")?;
    let started = Instant::now();
    // A xorshift sequence stands in for random message ids.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..=keys {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut key = b"ncsc\0".to_vec();
        key.extend_from_slice(&x.to_be_bytes());
        key.extend_from_slice(&i.to_be_bytes());
        let mut value = i.to_be_bytes().to_vec();
        value.extend_from_slice(&[0x5a; 37]);
        receipts.insert(key, value)?;
        if i % (keys / 10).max(1) == 0 {
            db.flush()?;
            println!(
                "{i:>9} keys  RSS {:>5.0} MiB  database {:>5.0} MiB  {:>5.1} s",
                resident_mib(),
                db.size_on_disk()? as f64 / (1024.0 * 1024.0),
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}
