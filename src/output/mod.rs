//! Worker output (`--worker-output`, DESIGN §15).
//!
//! - `inherit` (the default): workers write to lb's own stdout and stderr; lb is not in the way
//!   and costs nothing (no pipe, no thread, no copy).
//! - `prefix`: each worker's stdout and stderr are pipes that lb reads; every line goes to lb's
//!   stdout (or stderr) as `[worker N] line`.
//! - `json`: every line as one JSON object: `time`, `slot`, `pid`, `stream`, `line` (and
//!   `partial` on the pieces of a line cut at [`MAX_LINE`]).
//!
//! Lines are whole: a line is written with one call under the stream's lock, never between two
//! halves of another; a line over [`MAX_LINE`] is cut into pieces, each ending with
//! [`CONTINUED`] (`prefix`) or marked `"partial":true` (`json`), so a worker that never ends a
//! line cannot grow lb's memory. Output reaches lb's stdout and stderr through one writer thread
//! with a bounded queue: when lb's stdout is slow (a paused terminal, a busy journal) the
//! workers' pipes fill and they wait, as they would writing to the terminal themselves, and the
//! master's loop never blocks.
//!
//! The last lines of each slot stay in a bounded ring ([`Logs`]) for `lb logs`, which also
//! follows new ones. The pipes and the rings travel with an in-place upgrade.

pub mod pipes;
pub mod tail;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

pub use pipes::{Carried, Output, worker_pipes};

/// What lb does with its workers' stdout and stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The workers write to lb's stdout and stderr themselves.
    #[default]
    Inherit,
    /// `[worker N] ` before each line.
    Prefix,
    /// One JSON object per line.
    Json,
}

impl Mode {
    /// The word the command line and the configuration file use.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Inherit => "inherit",
            Mode::Prefix => "prefix",
            Mode::Json => "json",
        }
    }

    /// The mode a word names.
    pub fn parse(v: &str) -> Option<Mode> {
        [Mode::Inherit, Mode::Prefix, Mode::Json]
            .into_iter()
            .find(|m| m.as_str() == v)
    }
}

/// The longest line lb passes on whole; a longer one is cut into pieces of this size.
pub const MAX_LINE: usize = 64 * 1024;

/// What ends each piece of a cut line but the last (`prefix`, `lb logs`).
pub const CONTINUED: &str = " [continued]";

/// The most lines each slot's ring keeps for `lb logs`.
pub const RING_LINES: usize = 1000;

/// The most bytes of line text each slot's ring keeps.
pub const RING_BYTES: usize = 1 << 20;

/// Which of a worker's streams a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Its stdout.
    Stdout,
    /// Its stderr.
    Stderr,
}

/// One line of a worker's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Line {
    /// Its place in lb's output (one sequence for every slot, from 1).
    pub seq: u64,
    /// When lb read it, in ms since the Unix epoch.
    pub time_ms: u64,
    /// The worker's slot.
    pub slot: usize,
    /// The worker's pid (its children's lines carry the worker's pid too).
    pub pid: u32,
    /// The stream.
    pub stream: Stream,
    /// The text, without its newline (invalid UTF-8 replaced).
    pub line: String,
    /// A piece of a line longer than [`MAX_LINE`], more of it follows.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
}

impl Line {
    /// The line as `prefix` prints it, with its newline.
    pub fn prefixed(&self) -> String {
        format!(
            "[worker {}] {}{}\n",
            self.slot,
            self.line,
            if self.partial { CONTINUED } else { "" }
        )
    }

    /// The line as `json` prints it, with its newline.
    pub fn json(&self) -> String {
        let mut out = Vec::new();
        self.write_json(&rfc3339(self.time_ms), &mut out);
        String::from_utf8(out).expect("JSON is UTF-8")
    }

    /// Appends the line as `json` prints it to `out`, with `time` (its `time_ms` formatted
    /// once for a batch of lines read together).
    pub fn write_json(&self, time: &str, out: &mut Vec<u8>) {
        #[derive(Serialize)]
        struct Json<'a> {
            time: &'a str,
            slot: usize,
            pid: u32,
            stream: Stream,
            line: &'a str,
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            partial: bool,
        }
        let json = Json {
            time,
            slot: self.slot,
            pid: self.pid,
            stream: self.stream,
            line: &self.line,
            partial: self.partial,
        };
        serde_json::to_writer(&mut *out, &json).expect("serializes");
        out.push(b'\n');
    }
}

/// `ms` since the epoch as RFC 3339 in UTC with milliseconds (`2026-12-03T20:00:00.123Z`).
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        ms % 1000
    )
}

/// The last lines of every slot (for `lb logs`) and the followers of new ones. Shared by the
/// master (which adds lines) and the control socket (which reads them).
#[derive(Debug)]
pub struct Logs {
    inner: Mutex<Rings>,
    followers: tokio::sync::broadcast::Sender<Arc<Line>>,
}

#[derive(Debug, Default)]
struct Rings {
    mode: Mode,
    next_seq: u64,
    slots: Vec<Ring>,
}

#[derive(Debug, Default)]
struct Ring {
    lines: VecDeque<Arc<Line>>,
    bytes: usize,
}

/// How many new lines a follower may fall behind before it is told it skipped some.
const FOLLOW_BACKLOG: usize = 4096;

impl Default for Logs {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            followers: tokio::sync::broadcast::channel(FOLLOW_BACKLOG).0,
        }
    }
}

impl Logs {
    /// Sets the mode lb runs with (`lb logs` refuses under `inherit`: lb sees no line).
    pub fn set_mode(&self, mode: Mode) {
        self.inner.lock().expect("logs lock").mode = mode;
    }

    /// The mode lb runs with.
    pub fn mode(&self) -> Mode {
        self.inner.lock().expect("logs lock").mode
    }

    /// Adds a line (its `seq` is set here) and passes it to the followers.
    pub fn push(&self, mut line: Line) -> Arc<Line> {
        let mut r = self.inner.lock().expect("logs lock");
        r.next_seq += 1;
        line.seq = r.next_seq;
        let line = Arc::new(line);
        r.keep(line.clone());
        drop(r);
        if self.followers.receiver_count() > 0 {
            let _ = self.followers.send(line.clone());
        }
        line
    }

    /// The last `n` lines of `slot` (of every slot if `None`, each slot's last `n`), oldest
    /// first, only those after `after`.
    pub fn tail(&self, slot: Option<usize>, n: usize, after: u64) -> Vec<Arc<Line>> {
        let r = self.inner.lock().expect("logs lock");
        let mut out: Vec<Arc<Line>> = r
            .slots
            .iter()
            .enumerate()
            .filter(|(s, _)| slot.is_none_or(|want| want == *s))
            .flat_map(|(_, ring)| {
                let skip = ring.lines.len().saturating_sub(n);
                ring.lines
                    .iter()
                    .skip(skip)
                    .filter(|l| l.seq > after)
                    .cloned()
            })
            .collect();
        out.sort_by_key(|l| l.seq);
        out
    }

    /// New lines from now on.
    pub fn follow(&self) -> tokio::sync::broadcast::Receiver<Arc<Line>> {
        self.followers.subscribe()
    }

    /// Every line the rings hold, for the next image.
    pub fn carry(&self) -> Vec<Line> {
        let mut all: Vec<Line> = self
            .tail(None, RING_LINES, 0)
            .into_iter()
            .map(|l| (*l).clone())
            .collect();
        all.sort_by_key(|l| l.seq);
        all
    }

    /// Takes the lines the previous image kept (their sequence goes on).
    pub fn restore(&self, lines: Vec<Line>) {
        let mut r = self.inner.lock().expect("logs lock");
        for l in lines {
            r.next_seq = r.next_seq.max(l.seq);
            r.keep(Arc::new(l));
        }
    }

    /// The line that most likely says why a worker failed: of the last stderr lines of every
    /// slot, the newest that reads as an error (`Error: …`, `TypeError: …`, `error: …`, as Node,
    /// Python and Rust programs print them), else the newest that is not blank, indented (a
    /// stack frame) or Node's closing `Node.js v20…`.
    pub fn last_error(&self) -> Option<Arc<Line>> {
        const LOOK_BACK: usize = 64;
        let mut lines = self.tail(None, LOOK_BACK, 0);
        lines.retain(|l| l.stream == Stream::Stderr && !l.line.trim().is_empty());
        lines.reverse();
        let reads_as_error = |t: &str| {
            let t = t.trim_start();
            t.split_once(':').is_some_and(|(head, _)| {
                let word = head.rsplit(['.', ' ']).next().unwrap_or(head);
                !head.contains(char::is_whitespace)
                    && (word.ends_with("Error")
                        || word.ends_with("Exception")
                        || word.eq_ignore_ascii_case("error")
                        || word.eq_ignore_ascii_case("fatal"))
            })
        };
        let plain = |t: &str| {
            !t.starts_with(char::is_whitespace) && !t.starts_with("Node.js v") && t.trim() != "}"
        };
        lines
            .iter()
            .find(|l| reads_as_error(&l.line))
            .or_else(|| lines.iter().find(|l| plain(&l.line)))
            .cloned()
    }

    /// Forgets the lines of slots `from` and above (`lb scale` removed them).
    pub fn remove_slots_from(&self, from: usize) {
        self.inner.lock().expect("logs lock").slots.truncate(from);
    }
}

impl Rings {
    fn keep(&mut self, line: Arc<Line>) {
        if self.slots.len() <= line.slot {
            self.slots.resize_with(line.slot + 1, Ring::default);
        }
        let ring = &mut self.slots[line.slot];
        ring.bytes += line.line.len();
        ring.lines.push_back(line);
        while ring.lines.len() > RING_LINES || (ring.bytes > RING_BYTES && ring.lines.len() > 1) {
            if let Some(old) = ring.lines.pop_front() {
                ring.bytes -= old.line.len();
            }
        }
    }
}

/// Cuts `pending` followed by `data` into lines: calls `emit(text, partial)` for each complete
/// line (without its newline) and for each [`MAX_LINE`] piece of a longer one (`partial`), and
/// keeps what is left (never more than [`MAX_LINE`] bytes) in `pending`.
pub fn split(pending: &mut Vec<u8>, mut data: &[u8], emit: &mut impl FnMut(&[u8], bool)) {
    while let Some(i) = data.iter().position(|&b| b == b'\n') {
        if pending.is_empty() {
            cut(&data[..i], emit);
        } else {
            pending.extend_from_slice(&data[..i]);
            cut(pending, emit);
            pending.clear();
        }
        data = &data[i + 1..];
    }
    pending.extend_from_slice(data);
    while pending.len() > MAX_LINE {
        let at = boundary(pending);
        emit(&pending[..at], true);
        pending.drain(..at);
    }
}

/// Emits a complete line, in [`MAX_LINE`] pieces if it is longer.
fn cut(mut line: &[u8], emit: &mut impl FnMut(&[u8], bool)) {
    while line.len() > MAX_LINE {
        let at = boundary(line);
        emit(&line[..at], true);
        line = &line[at..];
    }
    emit(line, false);
}

/// Where to cut `b` (longer than [`MAX_LINE`]): at [`MAX_LINE`], or up to 3 bytes before it so
/// that a UTF-8 character stays whole.
fn boundary(b: &[u8]) -> usize {
    let continuation = |i: usize| b[i] & 0xC0 == 0x80;
    (MAX_LINE - 3..=MAX_LINE)
        .rev()
        .find(|&i| !continuation(i))
        .unwrap_or(MAX_LINE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(chunks: &[&[u8]]) -> (Vec<(Vec<u8>, bool)>, Vec<u8>) {
        let mut pending = Vec::new();
        let mut out = Vec::new();
        for c in chunks {
            split(&mut pending, c, &mut |l, p| out.push((l.to_vec(), p)));
        }
        (out, pending)
    }

    #[test]
    fn lines_are_whole_across_reads_and_the_rest_waits() {
        let (out, rest) = lines(&[b"one\ntw", b"o\n\nthr", b"ee"]);
        let texts: Vec<_> = out.iter().map(|(l, p)| (l.as_slice(), *p)).collect();
        assert_eq!(texts, [(&b"one"[..], false), (b"two", false), (b"", false)]);
        assert_eq!(rest, b"three");
    }

    #[test]
    fn a_line_over_the_limit_is_cut_and_nothing_waits_beyond_it() {
        let big = vec![b'x'; 3 * MAX_LINE + 10];
        let (out, rest) = lines(&[&big]);
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|(l, p)| l.len() == MAX_LINE && *p));
        assert_eq!(rest.len(), 10);
        // Fed a byte at a time, the same.
        let mut pending = Vec::new();
        let mut n = 0;
        for b in big.chunks(1) {
            split(&mut pending, b, &mut |_, _| n += 1);
            assert!(pending.len() <= MAX_LINE);
        }
        assert_eq!(n, 3);
        // A line of exactly the limit is one line.
        let exact = [vec![b'y'; MAX_LINE], b"\n".to_vec()].concat();
        let (out, rest) = lines(&[&exact]);
        assert_eq!(out, [(vec![b'y'; MAX_LINE], false)]);
        assert!(rest.is_empty());
    }

    #[test]
    fn a_cut_keeps_utf8_characters_whole() {
        let mut s = "a".repeat(MAX_LINE - 1).into_bytes();
        s.extend("é".repeat(10).as_bytes());
        s.push(b'\n');
        let (out, _) = lines(&[&s]);
        assert_eq!(out[0].0.len(), MAX_LINE - 1);
        assert!(std::str::from_utf8(&out[0].0).is_ok());
        assert!(std::str::from_utf8(&out[1].0).is_ok());
    }

    fn line(slot: usize, text: &str) -> Line {
        Line {
            seq: 0,
            time_ms: 0,
            slot,
            pid: 7,
            stream: Stream::Stdout,
            line: text.into(),
            partial: false,
        }
    }

    #[test]
    fn rings_keep_the_last_lines_of_each_slot_within_their_bounds() {
        let logs = Logs::default();
        for i in 0..RING_LINES + 5 {
            logs.push(line(1, &i.to_string()));
        }
        logs.push(line(0, "zero"));
        let one = logs.tail(Some(1), 3, 0);
        let texts: Vec<&str> = one.iter().map(|l| l.line.as_str()).collect();
        assert_eq!(texts, ["1002", "1003", "1004"]);
        assert_eq!(logs.tail(Some(1), usize::MAX, 0).len(), RING_LINES);
        let all = logs.tail(None, 1, 0);
        assert_eq!(all.len(), 2);
        assert!(all[0].seq < all[1].seq);
        let after = logs.tail(None, usize::MAX, all[0].seq);
        assert_eq!(after.len(), 1);
        // Bytes bound the ring too.
        let big = "b".repeat(RING_BYTES / 4 + 1);
        for _ in 0..10 {
            logs.push(line(2, &big));
        }
        assert_eq!(logs.tail(Some(2), usize::MAX, 0).len(), 3);
        // Carried over and restored, the sequence goes on.
        let carried = logs.carry();
        let next = Logs::default();
        next.restore(carried.clone());
        assert_eq!(next.carry(), carried);
        let l = next.push(line(0, "after"));
        assert_eq!(l.seq, carried.last().unwrap().seq + 1);
    }

    #[test]
    fn the_error_line_of_a_worker_that_failed_is_found_among_its_last_lines() {
        let err = |slot: usize, text: &str| Line {
            stream: Stream::Stderr,
            ..line(slot, text)
        };
        let logs = Logs::default();
        assert!(logs.last_error().is_none());
        // Node's output for `node server.js` without the file, as it prints it.
        for text in [
            "node:internal/modules/cjs/loader:1080",
            "  throw err;",
            "  ^",
            "",
            "Error: Cannot find module '/x/server.js'",
            "    at Module._resolveFilename (node:internal/modules/cjs/loader:1077:15)",
            "  code: 'MODULE_NOT_FOUND',",
            "  requireStack: []",
            "}",
            "",
            "Node.js v20.11.0",
        ] {
            logs.push(err(0, text));
        }
        logs.push(line(1, "TypeError: on stdout, not an error line"));
        let found = logs.last_error().expect("found");
        assert_eq!(found.line, "Error: Cannot find module '/x/server.js'");
        // Python's and the newest wins.
        logs.push(err(1, "ModuleNotFoundError: No module named 'flask'"));
        assert!(
            logs.last_error()
                .unwrap()
                .line
                .starts_with("ModuleNotFound")
        );
        // No line reads as an error: the newest plain one.
        let logs = Logs::default();
        logs.push(err(0, "cannot bind: address in use"));
        logs.push(err(0, "    at frame"));
        assert_eq!(
            logs.last_error().unwrap().line,
            "cannot bind: address in use"
        );
    }

    #[test]
    fn formats() {
        let mut l = line(2, "hello \"you\"");
        l.time_ms = 1_796_328_000_123;
        assert_eq!(l.prefixed(), "[worker 2] hello \"you\"\n");
        let v: serde_json::Value = serde_json::from_str(&l.json()).unwrap();
        assert_eq!(v["time"], "2026-12-03T20:00:00.123Z");
        assert_eq!(v["slot"], 2);
        assert_eq!(v["pid"], 7);
        assert_eq!(v["stream"], "stdout");
        assert_eq!(v["line"], "hello \"you\"");
        assert!(v.get("partial").is_none());
        l.partial = true;
        assert!(l.prefixed().ends_with(" [continued]\n"));
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
