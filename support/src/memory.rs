//! How the binaries ask the kernel for memory, and how much they hold.

/// Turns transparent huge pages off for this process (Linux; elsewhere nothing).
///
/// mimalloc asks for huge pages for its arenas and gives memory it no longer uses back to the
/// kernel. sled allocates a fresh 8 MiB I/O buffer at every flush, and the broker flushes every
/// group commit: with huge pages, each new buffer faulted in whole 2 MiB pages that the kernel
/// zeroed first. Under `concordat bench relay` that zeroing was 3.6–6.8 % of the full broker's
/// CPU (7–14 µs per transfer); with huge pages off it is under 0.5 %. Call it first thing in `main`;
/// memory already faulted in keeps its pages. A kernel that refuses is not an error: the process
/// only runs slower.
pub fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    {
        let _ = nix::sys::prctl::set_thp_disable(true);
    }
}

/// This process's resident memory in MiB, read from `/proc/self/status` (0 where it cannot be
/// read).
pub fn resident_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|kb| kb.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

#[cfg(test)]
mod tests {
    #[cfg(target_os = "linux")]
    #[test]
    fn huge_pages_are_turned_off() {
        super::no_transparent_huge_pages();
        assert_eq!(nix::sys::prctl::get_thp_disable(), Ok(true));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn resident_memory_is_read() {
        let mib = super::resident_mib();
        assert!(mib > 0.0 && mib < 1e6, "{mib}");
    }
}
