//! What lb reads about its workers from `/proc` (never on the data path: once a second).

/// A process's resident set size, from `/proc/PID/statm`; `None` if it is gone.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

/// CPU time a process has used (user + system), in clock ticks; `None` if it is gone.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut f = stat
        .get(stat.rfind(')')? + 2..)?
        .split_whitespace()
        .skip(11);
    Some(f.next()?.parse::<u64>().ok()? + f.next()?.parse::<u64>().ok()?)
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
    fn cpu_of_self() {
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(cpu_ticks(std::process::id()).is_some());
        assert_eq!(cpu_ticks(u32::MAX), None);
    }

    #[test]
    fn rss_of_self() {
        assert!(rss_bytes(std::process::id()).unwrap() > 1 << 20);
        assert_eq!(rss_bytes(u32::MAX), None);
    }
}
