//! The parsers of option values: each accepts what a user would write (`500ms`, `512MiB`,
//! `10/1m`, `[::]:8000`) and says in one line what it expected otherwise.

use std::net::SocketAddr;
use std::time::Duration;

/// A `--balance-factor`: a number above 1 (1.25 lets a slot take 25 % more than its share).
pub(super) fn parse_factor(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(f) if f.is_finite() && f > 1.0 && f <= 100.0 => Ok(f),
        _ => Err(format!(
            "invalid balance factor `{v}` (expected a number above 1 and at most 100, e.g. 1.25)"
        )),
    }
}

/// `off`, or a value `parse` accepts.
pub(super) fn off_or<T>(
    v: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<T>, String> {
    if v == "off" {
        Ok(None)
    } else {
        parse(v).map(Some)
    }
}

/// Parses a socket address (`127.0.0.1:8000`, `[::]:8000`, `localhost:8000`).
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    if let Some(port) = s.strip_prefix("localhost:") {
        let port: u16 = port.parse().map_err(|_| format!("bad port `{port}`"))?;
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    Err("expected IP:PORT, e.g. 127.0.0.1:8000 or [::]:8000".into())
}

/// One of a fixed set of names (`expected a or b` otherwise).
pub(super) fn choice<T: Copy>(v: &str, options: &[(&str, T)]) -> Result<T, String> {
    options
        .iter()
        .find(|(name, _)| *name == v)
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
            format!("expected {}", names.join(" or "))
        })
}

/// A worker count (`--workers`, `lb scale`): 1 to 1024.
pub fn parse_workers(s: &str) -> Result<usize, String> {
    parse_count(s, 1, 1024)
}

/// A whole number from `min` to `max`.
pub fn parse_count(s: &str, min: usize, max: usize) -> Result<usize, String> {
    let n: usize = s
        .trim()
        .parse()
        .map_err(|_| "expected a whole number".to_string())?;
    if n < min || n > max {
        return Err(format!("must be between {min} and {max}"));
    }
    Ok(n)
}

pub(super) fn parse_seed(s: &str) -> Result<u64, String> {
    s.trim()
        .parse()
        .map_err(|_| "expected a decimal number from 0 to 18446744073709551615".into())
}

pub(super) fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

/// Exits within [`CRASH_WINDOW`] that mark a slot failed (`--crash-loop`'s default).
pub const CRASH_LOOP_EXITS: usize = 10;
/// Window for counting exits (`--crash-loop`'s default).
pub const CRASH_WINDOW: Duration = Duration::from_secs(60);

/// The crash-loop guard: `exits` exits within `window` mark a slot failed for `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrashLoop {
    /// Exits that make a crash loop.
    pub exits: usize,
    /// The window they must fall in (also the failed slot's cool-down).
    pub window: Duration,
}

impl Default for CrashLoop {
    fn default() -> Self {
        Self {
            exits: CRASH_LOOP_EXITS,
            window: CRASH_WINDOW,
        }
    }
}

/// Parses the crash-loop guard `EXITS/WINDOW`, e.g. `10/1m`.
pub fn parse_crash_loop(s: &str) -> Result<CrashLoop, String> {
    const HELP: &str = "expected EXITS/WINDOW, e.g. 10/1m";
    let (n, d) = s.split_once('/').ok_or_else(|| HELP.to_string())?;
    let exits = parse_count(n, 1, 10_000).map_err(|e| format!("{e} ({HELP})"))?;
    let window = parse_duration(d)?;
    if window.is_zero() {
        return Err(format!("the window must be longer than 0 ({HELP})"));
    }
    Ok(CrashLoop { exits, window })
}

/// A period of something lb repeats (`--heartbeat-ping`): a duration above zero (zero would
/// repeat without pause; `off` is the way to turn it off).
pub(super) fn parse_interval(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err("0 would ping without pause: give a period like 5s, or off".into()),
        d => Ok(d),
    }
}

/// Parses a humane duration: `500ms`, `30s`, `2m`, `1h`, `1.5s`, or combinations like `1m30s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    const HELP: &str = "expected a duration like 500ms, 30s, 2m or 1h";
    let s = s.trim();
    if s.is_empty() {
        return Err(HELP.into());
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_end);
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let value: f64 = num.parse().map_err(|_| HELP.to_string())?;
        let scale = match unit.trim() {
            "ms" => 0.001,
            "s" | "sec" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            "" => return Err(format!("missing unit ({HELP})")),
            _ => return Err(HELP.into()),
        };
        total += value * scale;
        rest = tail;
    }
    if !total.is_finite() || total > 365.0 * 86400.0 {
        return Err("duration too long".into());
    }
    Ok(Duration::from_secs_f64(total))
}

/// Parses a byte size: `1048576`, `512MiB`, `1GiB`, `100MB`, `64k`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    const HELP: &str = "expected a size like 512MiB, 1GiB or 1048576";
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().map_err(|_| HELP.to_string())?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "ki" | "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mi" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(HELP.into()),
    };
    let bytes = value * scale;
    if bytes < 1.0 || !bytes.is_finite() {
        return Err("must be at least 1 byte".into());
    }
    Ok(bytes as u64)
}
