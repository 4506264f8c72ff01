//! What lb reads about its workers from `/proc` (never on the data path: once a second).

/// A process's resident set size, from `/proc/PID/statm`; `None` if it is gone.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

/// lb's own uid, without `unsafe`: `/proc/self` belongs to it.
pub fn own_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |p| p as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_of_self() {
        assert!(rss_bytes(std::process::id()).unwrap() > 1 << 20);
        assert_eq!(rss_bytes(u32::MAX), None);
    }
}
