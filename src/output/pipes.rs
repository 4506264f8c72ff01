//! The pipes of `prefix` and `json`: made before a worker starts, each read by its own task,
//! and written to lb's stdout and stderr by one thread through a bounded queue.
//!
//! lb keeps the read end of every pipe in one table; a reader task works on a duplicate. So an
//! in-place upgrade can stop the readers (each leaves the start of a line it has not finished
//! in the table), let the writer write what is queued, and pass the table's fds and unfinished
//! lines to the next image, which reads on where this one stopped: what a worker wrote in
//! between waits in its pipe.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::{CONTINUED, Line, Logs, Mode, Stream, split};

/// How much a reader reads at once.
const READ_CHUNK: usize = 16 * 1024;

/// Batches of lines waiting for lb's stdout or stderr (each at most a read's lines, or one
/// piece of a long line): when they are all waiting, the readers wait, and so do the workers.
const QUEUE: usize = 64;

/// A pipe an in-place upgrade carries: its fd in the new image and the unfinished line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Carried {
    /// The slot of the worker writing to it.
    pub slot: usize,
    /// That worker's pid.
    pub pid: u32,
    /// Which of its streams.
    pub stream: Stream,
    /// The read end.
    pub fd: RawFd,
    /// The start of a line not yet ended.
    #[serde(default)]
    pub pending: Vec<u8>,
}

/// The write ends a new worker gets as its stdout and stderr.
#[derive(Debug)]
pub struct WriteEnds {
    /// Its stdout.
    pub stdout: OwnedFd,
    /// Its stderr.
    pub stderr: OwnedFd,
}

/// The read ends lb keeps, for [`Output::attach`] once the worker has started.
#[derive(Debug)]
pub struct ReadEnds {
    stdout: OwnedFd,
    stderr: OwnedFd,
}

/// New pipes for a worker's stdout and stderr (all four ends close-on-exec; the spawn puts the
/// write ends on the worker's fds 1 and 2).
pub fn worker_pipes() -> io::Result<(WriteEnds, ReadEnds)> {
    let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from);
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    Ok((
        WriteEnds {
            stdout: out_w,
            stderr: err_w,
        },
        ReadEnds {
            stdout: out_r,
            stderr: err_r,
        },
    ))
}

#[derive(Debug)]
struct Entry {
    slot: usize,
    pid: u32,
    stream: Stream,
    fd: OwnedFd,
    pending: Vec<u8>,
}

type Table = Arc<Mutex<HashMap<u64, Entry>>>;

#[derive(Debug)]
enum Msg {
    Write(Stream, Vec<u8>),
    Flush(oneshot::Sender<()>),
}

/// The workers' output under `prefix` or `json`.
#[derive(Debug)]
pub struct Output {
    mode: Mode,
    logs: Arc<Logs>,
    sink: mpsc::Sender<Msg>,
    table: Table,
    next_id: u64,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Output {
    /// Starts the writer for `mode`; `None` for `inherit` (nothing to do).
    pub fn start(mode: Mode, logs: Arc<Logs>) -> io::Result<Option<Self>> {
        logs.set_mode(mode);
        if mode == Mode::Inherit {
            return Ok(None);
        }
        let (sink, rx) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("lb-output".into())
            .spawn(move || write_out(rx))?;
        Ok(Some(Self {
            mode,
            logs,
            sink,
            table: Table::default(),
            next_id: 0,
            stop: watch::channel(false).0,
            tasks: Vec::new(),
        }))
    }

    /// Reads the pipes of the worker `pid` of `slot`, which has started.
    pub fn attach(&mut self, slot: usize, pid: u32, ends: ReadEnds) {
        self.tasks.retain(|t| !t.is_finished());
        for (stream, fd) in [(Stream::Stdout, ends.stdout), (Stream::Stderr, ends.stderr)] {
            self.add(slot, pid, stream, fd, Vec::new());
        }
    }

    /// Takes the pipes lb's previous image read.
    pub fn adopt(&mut self, carried: Vec<Carried>) {
        for c in carried {
            match crate::sys::adopt_fd(c.fd) {
                Ok(fd) => self.add(c.slot, c.pid, c.stream, fd, c.pending),
                Err(e) => tracing::warn!(
                    slot = c.slot,
                    pid = c.pid,
                    "cannot take over the worker's {} pipe: {e}",
                    c.stream.as_str()
                ),
            }
        }
    }

    fn add(&mut self, slot: usize, pid: u32, stream: Stream, fd: OwnedFd, pending: Vec<u8>) {
        let id = self.next_id;
        self.next_id += 1;
        self.table.lock().expect("output table").insert(
            id,
            Entry {
                slot,
                pid,
                stream,
                fd,
                pending,
            },
        );
        self.read(id);
    }

    /// Starts the reader of the table's pipe `id`, on a duplicate of its fd.
    fn read(&mut self, id: u64) {
        let mut table = self.table.lock().expect("output table");
        let Some(e) = table.get_mut(&id) else { return };
        let reader = Reader {
            id,
            slot: e.slot,
            pid: e.pid,
            stream: e.stream,
            mode: self.mode,
            pending: std::mem::take(&mut e.pending),
            logs: self.logs.clone(),
            sink: self.sink.clone(),
            table: self.table.clone(),
            stop: self.stop.subscribe(),
        };
        let pipe =
            e.fd.try_clone()
                .and_then(tokio::net::unix::pipe::Receiver::from_owned_fd);
        match pipe {
            Ok(pipe) => self.tasks.push(tokio::spawn(reader.run(pipe))),
            // The pipe stays open (the worker does not get EPIPE); its lines wait in it.
            Err(e) => tracing::error!(
                slot = reader.slot,
                pid = reader.pid,
                "cannot read the worker's {}: {e}",
                reader.stream.as_str()
            ),
        }
    }

    /// Stops the readers and writes out what they read (at most `limit` in all), for an
    /// in-place upgrade: the pipes to carry. [`Output::resume`] undoes it.
    pub async fn pause(&mut self, limit: Duration) -> Vec<Carried> {
        let deadline = tokio::time::Instant::now() + limit;
        let _ = self.stop.send(true);
        let mut stuck = 0;
        for mut t in std::mem::take(&mut self.tasks) {
            if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
                t.abort();
                stuck += 1;
            }
        }
        if stuck > 0 {
            tracing::warn!(
                "{stuck} worker output reader(s) were still waiting for lb's stdout/stderr \
                 after {limit:?}: the lines they held are lost"
            );
        }
        self.flush(deadline).await;
        self.table
            .lock()
            .expect("output table")
            .values()
            .map(|e| Carried {
                slot: e.slot,
                pid: e.pid,
                stream: e.stream,
                fd: e.fd.as_raw_fd(),
                pending: e.pending.clone(),
            })
            .collect()
    }

    /// Reads on after a [`Output::pause`] (the upgrade did not happen).
    pub fn resume(&mut self) {
        self.stop = watch::channel(false).0;
        let ids: Vec<u64> = self
            .table
            .lock()
            .expect("output table")
            .keys()
            .copied()
            .collect();
        for id in ids {
            self.read(id);
        }
    }

    /// At exit: waits (at most `limit`) for the pipes to end — every worker has exited, but
    /// what it wrote last may still be in its pipe — and writes out what was read.
    pub async fn finish(&mut self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        for t in std::mem::take(&mut self.tasks) {
            let _ = tokio::time::timeout_at(deadline, t).await;
        }
        self.flush(deadline).await;
    }

    async fn flush(&self, deadline: tokio::time::Instant) {
        let (tx, rx) = oneshot::channel();
        if tokio::time::timeout_at(deadline, self.sink.send(Msg::Flush(tx)))
            .await
            .is_ok()
        {
            let _ = tokio::time::timeout_at(deadline, rx).await;
        }
    }
}

impl Stream {
    /// `stdout` or `stderr`.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// One pipe's reader.
struct Reader {
    id: u64,
    slot: usize,
    pid: u32,
    stream: Stream,
    mode: Mode,
    pending: Vec<u8>,
    logs: Arc<Logs>,
    sink: mpsc::Sender<Msg>,
    table: Table,
    stop: watch::Receiver<bool>,
}

impl Reader {
    async fn run(mut self, mut pipe: tokio::net::unix::pipe::Receiver) {
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let read = tokio::select! {
                biased;
                _ = self.stop.wait_for(|s| *s) => {
                    // An upgrade: the unfinished line goes with the pipe.
                    if let Some(e) = self.table.lock().expect("output table").get_mut(&self.id) {
                        e.pending = std::mem::take(&mut self.pending);
                    }
                    return;
                }
                r = pipe.read(&mut buf) => r,
            };
            let n = match read {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(
                        slot = self.slot,
                        pid = self.pid,
                        "reading the worker's {}: {e}",
                        self.stream.as_str()
                    );
                    0
                }
            };
            let batch = self.lines(&buf[..n], n == 0);
            if !batch.is_empty() {
                let _ = self.sink.send(Msg::Write(self.stream, batch)).await;
            }
            if n == 0 {
                // Every writer has closed it: the worker (and its children) are gone.
                self.table.lock().expect("output table").remove(&self.id);
                return;
            }
        }
    }

    /// The lines `data` completes, as lb writes them (and kept for `lb logs`); at the end of
    /// the pipe the unfinished line too.
    fn lines(&mut self, data: &[u8], end: bool) -> Vec<u8> {
        let time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut batch = Vec::new();
        let time = match self.mode {
            Mode::Json => super::rfc3339(time_ms),
            Mode::Prefix | Mode::Inherit => String::new(),
        };
        let (slot, pid, stream, mode, logs) =
            (self.slot, self.pid, self.stream, self.mode, &self.logs);
        let mut emit = |text: &[u8], partial: bool| {
            let line = logs.push(Line {
                seq: 0,
                time_ms,
                slot,
                pid,
                stream,
                line: String::from_utf8_lossy(text).into_owned(),
                partial,
            });
            match mode {
                // The worker's bytes as they are, invalid UTF-8 too.
                Mode::Prefix | Mode::Inherit => {
                    let _ = write!(batch, "[worker {slot}] ");
                    batch.extend_from_slice(text);
                    if partial {
                        batch.extend_from_slice(CONTINUED.as_bytes());
                    }
                    batch.push(b'\n');
                }
                Mode::Json => line.write_json(&time, &mut batch),
            }
        };
        split(&mut self.pending, data, &mut emit);
        if end && !self.pending.is_empty() {
            let rest = std::mem::take(&mut self.pending);
            emit(&rest, false);
        }
        batch
    }
}

/// The writer thread: batches to lb's stdout or stderr, each under the stream's lock (lb's own
/// log lines take the same lock, so no line is split by another).
fn write_out(mut rx: mpsc::Receiver<Msg>) {
    let mut failed = [false; 2];
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            Msg::Write(stream, bytes) => {
                let written = match stream {
                    Stream::Stdout => {
                        let mut out = io::stdout().lock();
                        out.write_all(&bytes).and_then(|()| out.flush())
                    }
                    Stream::Stderr => io::stderr().lock().write_all(&bytes),
                };
                let i = stream as usize;
                match written {
                    Ok(()) => failed[i] = false,
                    Err(e) if !failed[i] => {
                        failed[i] = true;
                        tracing::warn!(
                            "cannot write the workers' {} to lb's: {e}; their lines are dropped \
                             until it works again (`lb logs` still has them)",
                            stream.as_str()
                        );
                    }
                    Err(_) => {}
                }
            }
            Msg::Flush(done) => {
                let _ = io::stdout().lock().flush();
                let _ = done.send(());
            }
        }
    }
}
