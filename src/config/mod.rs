//! Settings: the command line, the TOML config file, and how they merge.
//!
//! Every option exists in both places (`--shutdown-timeout` on the command line is
//! `shutdown_timeout` in the file); command-line flags override the file, which overrides the
//! defaults. Every value a user can get wrong is validated here, once, and reported as one line
//! naming the option (and, for the file, the line) and the bad value.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;
use toml::Spanned;

use crate::balance::{DEFAULT_HASH_SEED, Policy};
use crate::channel::Serialization;

mod cli;
mod parse;
pub use cli::*;
pub use parse::*;

/// A settings error: always one line, naming the input.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value that does not parse or is out of range.
    #[error("{origin}: invalid value `{value}` for `{key}`: {reason}")]
    Invalid {
        /// Where the value came from (`command line`, `lb.toml line 3`).
        origin: String,
        /// The option name.
        key: String,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The config file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has an unknown key / wrong type.
    #[error("config file {path} line {line}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// The parser's message (one line).
        message: String,
    },
    /// Options that cannot be combined.
    #[error("{0}")]
    Conflict(String),
    /// The worker command cannot be run.
    #[error("worker command `{command}` not found or not executable{hint}")]
    CommandNotFound {
        /// The program name as given.
        command: String,
        /// Extra help.
        hint: String,
    },
}

/// Where sticky clients go while their worker is stalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StalledSticky {
    /// To their next rendezvous choice (availability first).
    Next,
    /// Wait (bounded by the queue timeout) for their own worker (stickiness first).
    Wait,
}

/// `--steering`: who picks the worker for each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steering {
    /// The master accepts every connection and hands it over.
    Master,
    /// The kernel picks the slot's listener by client IP; workers accept themselves.
    Kernel,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Defines every server option once: its command-line flag (`RunArgs`), its config-file key
/// (`FileConfig`), its resolved field (`Settings`) and how it is parsed and defaulted
/// (`Settings::from_cli`). The doc comment is the `--help` text and the field's doc.
macro_rules! options {
    ($(
        $(#[doc = $doc:literal])*
        $name:ident: $ty:ty = $default:expr, $parse:expr, $value_name:literal $(, $short:literal)?;
    )*) => {
        /// Server options, as given on the command line (all optional: the file and defaults
        /// fill in).
        #[derive(Debug, Default, Clone, Args)]
        pub struct RunArgs {
            /// TOML config file; flags override it
            #[arg(short, long, value_name = "FILE")]
            pub config: Option<PathBuf>,
            /// A worker is ready only once it sends {"type":"ready"}
            #[arg(long)]
            pub wait_ready: bool,
            $(
                $(#[doc = $doc])*
                #[arg(long, value_name = $value_name $(, short = $short)?)]
                pub $name: Option<String>,
            )*
        }

        /// The config file's keys (the long option names with `_`), each optional.
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct FileConfig {
            wait_ready: Option<Spanned<toml::Value>>,
            command: Option<Spanned<toml::Value>>,
            $($name: Option<Spanned<toml::Value>>,)*
        }

        /// The fully resolved, validated settings lb runs with.
        #[derive(Debug, Clone)]
        pub struct Settings {
            $($(#[doc = $doc])* pub $name: $ty,)*
            /// Readiness gating on `{"type":"ready"}` (`--wait-ready`).
            pub wait_ready: bool,
            /// Worker command; `None` = the built-in worker.
            pub command: Option<Vec<String>>,
        }

        impl Settings {
            /// The settings whose values differ between `self` and `other`, by their config-file
            /// names, in table order (a reload reports and applies these).
            pub fn differences(&self, other: &Self) -> Vec<&'static str> {
                let mut d = Vec::new();
                $(
                    if self.$name != other.$name {
                        d.push(stringify!($name));
                    }
                )*
                if self.wait_ready != other.wait_ready {
                    d.push("wait_ready");
                }
                if self.command != other.command {
                    d.push("command");
                }
                d
            }

            /// Resolves settings from parsed command-line arguments (reading `--config` if
            /// given): flags over the file over the defaults.
            pub fn from_cli(run: &RunArgs, command: &[String]) -> Result<Self, ConfigError> {
                Self::from_cli_text(run, command, None)
            }

            /// [`Settings::from_cli`] with the config file's text already read (`text`), as an
            /// in-place upgrade carries it; `None` reads the file.
            pub fn from_cli_text(
                run: &RunArgs,
                command: &[String],
                text: Option<&str>,
            ) -> Result<Self, ConfigError> {
                let file = match (run.config.as_deref(), text) {
                    (Some(path), Some(text)) => Some(File::parse(path, text.to_owned())?),
                    (Some(path), None) => Some(File::load(path)?),
                    (None, _) => None,
                };
                let fk = file.as_ref().map(|f| &f.keys);
                $(
                    let $name: $ty = match pick(
                        file.as_ref(),
                        stringify!($name),
                        run.$name.as_ref(),
                        fk.and_then(|k| k.$name.as_ref()),
                    ) {
                        Some(s) => s.parse($parse)?,
                        None => $default,
                    };
                )*
                let wait_ready = run.wait_ready
                    || match pick(
                        file.as_ref(),
                        "wait_ready",
                        None,
                        fk.and_then(|k| k.wait_ready.as_ref()),
                    ) {
                        Some(s) => s.parse(parse_bool)?,
                        None => false,
                    };
                let command = worker_command(file.as_ref(), command)?;
                let settings = Self {
                    $($name,)*
                    wait_ready,
                    command,
                };
                settings.check_steering()?;
                settings.check_keys()?;
                Ok(settings)
            }
        }
    };
}

options! {
    /// TCP address to accept on (`[::]:8000` is dual-stack; port 0 = any free port)
    /// [default: 127.0.0.1:8000]
    listen: SocketAddr = "127.0.0.1:8000".parse().expect("valid default"), parse_addr, "ADDR", 'l';
    /// Worker processes [default: number of CPUs]
    workers: usize = std::thread::available_parallelism().map_or(1, |n| n.get()),
        parse_workers, "N", 'w';
    /// sticky, round-robin or least-connections [default: sticky]
    policy: Policy = Policy::Sticky, |v| v.parse::<Policy>().map_err(|e| e.to_string()), "P", 'p';
    /// Prometheus/admin HTTP address, or `off` [default: 127.0.0.1:9464]
    metrics: Option<SocketAddr> = Some("127.0.0.1:9464".parse().expect("valid default")),
        |v| off_or(v, parse_addr), "ADDR";
    /// Seed of the sticky hash (decimal u64)
    hash_seed: u64 = DEFAULT_HASH_SEED, parse_seed, "S";
    /// Graceful drain time before workers are killed [default: 30s]
    shutdown_timeout: Duration = Duration::from_secs(30), parse_duration, "D";
    /// Restart a worker that sent heartbeats and then stays silent this long [default: 30s]
    heartbeat_timeout: Duration = Duration::from_secs(30), parse_duration, "D";
    /// Send every worker `{"cmd":"heartbeat"}` this often (for workers that answer pings, the
    /// style where the primary pings) [default: off]
    heartbeat_ping: Option<Duration> = None, |v| off_or(v, parse_interval), "D";
    /// Restart a worker whose RSS exceeds this (e.g. 512MiB) [default: off]
    max_memory: Option<u64> = None, |v| off_or(v, parse_bytes), "BYTES";
    /// Built-in worker: a connection that has not sent a complete first request by then is
    /// closed (nginx's client_header_timeout) [default: 60s]
    client_header_timeout: Duration = Duration::from_secs(60), parse_duration, "D";
    /// Built-in worker: an idle kept-alive connection is closed after this (nginx's
    /// keepalive_timeout; WebSockets are not affected) [default: 75s]
    keepalive_timeout: Duration = Duration::from_secs(75), parse_duration, "D";
    /// How long a connection may wait for a ready worker [default: 5s]
    queue_timeout: Duration = Duration::from_secs(5), parse_duration, "D";
    /// How long a new worker may take to become ready [default: 30s]
    ready_timeout: Duration = Duration::from_secs(30), parse_duration, "D";
    /// Listen backlog [default: 4096]
    backlog: u32 = 4096, |v| parse_count(v, 1, 1 << 20).map(|n| n as u32), "N";
    /// Most connections waiting for a worker before new ones are closed [default: 4096]
    max_queue: usize = 4096, |v| parse_count(v, 0, 1 << 24), "N";
    /// Most unconfirmed handoffs per worker (sent, not yet ACKed) before it is skipped
    /// [default: 256]
    max_pending: usize = 256, |v| parse_count(v, 1, 1 << 16), "N";
    /// A worker that leaves a handoff unanswered this long gets no new connections until it
    /// answers [default: 2s]
    stall_timeout: Duration = Duration::from_secs(2), parse_duration, "D";
    /// Where sticky clients of a stalled worker go: `next` (their next rendezvous choice) or
    /// `wait` (queue for up to --queue-timeout) [default: next]
    sticky_stalled: StalledSticky = StalledSticky::Next,
        |v| choice(v, &[("next", StalledSticky::Next), ("wait", StalledSticky::Wait)]), "MODE";
    /// Who picks the worker for a connection: `master` (lb accepts and hands the connection
    /// over) or `kernel` (one SO_REUSEPORT listener per slot and a BPF program computing
    /// sticky; workers accept for themselves) [default: master]
    steering: Steering = Steering::Master,
        |v| choice(v, &[("master", Steering::Master), ("kernel", Steering::Kernel)]), "MODE";
    /// PROXY protocol from the balancer in front: `off`, `strip` (lb reads the v1/v2 header and
    /// hashes on the client's address; the worker gets the client's bytes) or `keep` (the
    /// header stays in the stream) [default: off]
    proxy_protocol: crate::proxy::Mode = crate::proxy::Mode::Off,
        |v| choice(v, &[("off", crate::proxy::Mode::Off), ("strip", crate::proxy::Mode::Strip),
                        ("keep", crate::proxy::Mode::Keep)]), "MODE";
    /// Sources that must send a PROXY header, as CIDR[,CIDR…]; others are direct clients
    /// [default: any]
    proxy_trusted: Option<Vec<crate::proxy::Cidr>> = None, crate::proxy::parse_trusted, "CIDRS";
    /// A PROXY header not complete by then closes the connection [default: 3s]
    proxy_timeout: Duration = Duration::from_secs(3), parse_duration, "D";
    /// The message a handed-over connection travels with: `sticky-session:connection` (Node's
    /// cluster guide), `sticky:balance` (the sticky-session package), `socket.io`
    /// (@socket.io/sticky's setupWorker; lb also routes a request carrying a session's `sid=` to
    /// its worker), or any other string [default: sticky-session:connection]
    handoff: crate::channel::HandoffMsg = crate::channel::HandoffMsg::Default,
        crate::channel::HandoffMsg::parse, "MESSAGE";
    /// How long lb waits for a connection's request head to look for its socket.io `sid=`
    /// (`--handoff socket.io`) or its `--hash-key` (peeking, never reading); then it routes by
    /// the IP. `0s` turns peeking off [default: 1s]
    peek_timeout: Duration = Duration::from_secs(1), parse_duration, "D";
    /// What `sticky` hashes, the first present wins: `ip`, `xff` (the address a --proxy-trusted
    /// proxy appended to X-Forwarded-For), `cookie:NAME`, `header:NAME`, `query:NAME`; the IP
    /// when none is [default: ip]
    hash_key: std::sync::Arc<crate::hashkey::HashKeys> = Default::default(),
        |v| crate::hashkey::HashKeys::parse(v).map(std::sync::Arc::new), "KEY[,KEY…]";
    /// Bounded loads for `sticky`: a slot is full when its active connections would exceed
    /// ⌈F × (total active + 1) / live slots⌉, and a new client whose home is full goes to its
    /// next choice (F > 1, e.g. 1.25) [default: off]
    balance_factor: Option<f64> = None, |v| off_or(v, parse_factor), "F";
    /// Aggregate the Node workers' prom-client metrics (cluster mode's `AggregatorRegistry`) on
    /// lb's `/metrics`: `on` or `off` [default: on]
    app_metrics: bool = true, |v| choice(v, &[("on", true), ("off", false)]), "on|off";
    /// The most a scrape of `/metrics` waits for the workers' prom-client answers (a worker
    /// that has not answered by then is left out of that scrape and counted) [default: 500ms]
    app_metrics_timeout: Duration = Duration::from_millis(500), parse_duration, "D";
    /// Crash-loop guard: EXITS/WINDOW, e.g. 10/1m: that many exits within the window mark a slot
    /// failed for the length of the window [default: 10/1m]
    crash_loop: CrashLoop = CrashLoop::default(), parse_crash_loop, "N/D";
    /// Node's channel format for all workers: `json`, or `advanced` (V8 values: binary
    /// crosses workers as binary) [default: json]
    serialization: Serialization = Serialization::Json,
        |v| choice(v, &[("json", Serialization::Json), ("advanced", Serialization::Advanced)]), "MODE";
    /// Control socket for `lb status`/`roll`/`stop` (mode 0600), `auto` (one per instance,
    /// named by the listen address: $XDG_RUNTIME_DIR/lb/ADDR.sock, else /run/lb/ADDR.sock as
    /// root, else /tmp/lb-<uid>/ADDR.sock), or `off` [default: auto]
    control: Option<PathBuf> = Some(PathBuf::from(CONTROL_AUTO)),
        |v| off_or(v, |p| Ok(PathBuf::from(p))), "PATH";
    /// Run the workers as USER or USER:GROUP (with the user's groups and HOME); lb must run as root
    /// [default: lb's own user]
    user: Option<crate::user::WorkerUser> = None,
        |v| crate::user::WorkerUser::resolve(v).map(Some), "USER[:GROUP]";
    /// The workers' stdout and stderr: `inherit` (they write to lb's own, untouched), `prefix`
    /// (`[worker N] ` before each line) or `json` (one object per line: time, slot, pid,
    /// stream, line); with prefix and json `lb logs` shows each worker's last lines
    /// [default: inherit]
    worker_output: crate::output::Mode = crate::output::Mode::Inherit,
        |v| choice(v, &[("inherit", crate::output::Mode::Inherit),
                        ("prefix", crate::output::Mode::Prefix), ("json", crate::output::Mode::Json)]), "MODE";
    /// text or json [default: text]
    log_format: LogFormat = LogFormat::Text,
        |v| choice(v, &[("text", LogFormat::Text), ("json", LogFormat::Json)]), "F";
}

impl Settings {
    /// Whether lb peeks at request heads: for socket.io sids or for `--hash-key` keys.
    pub fn peeks(&self) -> bool {
        !self.peek_timeout.is_zero()
            && (self.handoff == crate::channel::HandoffMsg::SocketIo || self.hash_key.peeks())
    }

    /// What lb may place by: `--hash-key` and `--balance-factor` shape `sticky` only, and `xff`
    /// needs the proxies it may believe.
    fn check_keys(&self) -> Result<(), ConfigError> {
        let conflict = |m: String| Err(ConfigError::Conflict(m));
        if self.policy != Policy::Sticky {
            if *self.hash_key != crate::hashkey::HashKeys::default() {
                return conflict(format!(
                    "--hash-key chooses what sticky hashes; policy is {}",
                    self.policy
                ));
            }
            if self.balance_factor.is_some() {
                return conflict(format!(
                    "--balance-factor bounds sticky's loads; policy is {} (least-connections already places by load)",
                    self.policy
                ));
            }
        }
        if self.hash_key.has_xff() && self.proxy_trusted.is_none() {
            return conflict(
                "--hash-key xff needs --proxy-trusted CIDRS: the proxies whose X-Forwarded-For lb may believe (from anyone else the header would let a client pick its worker)".into(),
            );
        }
        Ok(())
    }

    /// `--steering kernel` needs what the kernel can do: sticky (the program computes sticky's
    /// hash), the client's own address (the kernel cannot read a PROXY header), and few enough
    /// slots for one BPF program.
    fn check_steering(&self) -> Result<(), ConfigError> {
        if self.steering != Steering::Kernel {
            return Ok(());
        }
        let conflict = |m: &str| Err(ConfigError::Conflict(format!("--steering kernel: {m}")));
        if self.policy != Policy::Sticky {
            return conflict(&format!(
                "the kernel computes sticky only (policy is {}); use --steering master",
                self.policy
            ));
        }
        if self.proxy_protocol != crate::proxy::Mode::Off {
            return conflict(
                "the kernel sees the balancer's address, not the PROXY header's; use --steering master with --proxy-protocol",
            );
        }
        if self.balance_factor.is_some() {
            return conflict(
                "the kernel places by hash alone and cannot see the slots' loads; use --steering master with --balance-factor",
            );
        }
        if self.hash_key.peeks() {
            return conflict(
                "the kernel places before a byte arrives and cannot read a key; use --steering master with --hash-key",
            );
        }
        if self.workers > crate::steering::MAX_SLOTS {
            return conflict(&format!(
                "at most {} workers fit in one BPF program",
                crate::steering::MAX_SLOTS
            ));
        }
        Ok(())
    }
}

/// A loaded config file: its keys plus what is needed to name lines in errors.
struct File {
    path: PathBuf,
    text: String,
    keys: FileConfig,
}

impl File {
    fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(path, read_text(path)?)
    }

    fn parse(path: &Path, text: String) -> Result<Self, ConfigError> {
        let keys: FileConfig = toml::from_str(&text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            line: e.span().map_or(1, |s| line_of(&text, s.start)),
            message: one_line(e.message()),
        })?;
        Ok(Self {
            path: path.to_owned(),
            text,
            keys,
        })
    }

    fn origin(&self, v: &Spanned<toml::Value>) -> String {
        format!(
            "config file {} line {}",
            self.path.display(),
            line_of(&self.text, v.span().start)
        )
    }
}

/// The text of a config file.
pub fn read_text(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// One source of a value: the command line or a file entry.
struct Source<'a> {
    key: &'static str,
    origin: String,
    raw: Raw<'a>,
}

enum Raw<'a> {
    Str(&'a str),
    Toml(&'a toml::Value),
}

impl Source<'_> {
    fn text(&self) -> String {
        match &self.raw {
            Raw::Str(s) => (*s).to_owned(),
            Raw::Toml(toml::Value::String(s)) => s.clone(),
            Raw::Toml(v) => v.to_string(),
        }
    }

    fn invalid(&self, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.clone(),
            key: self.key.replace('_', "-"),
            value: self.text(),
            reason: reason.into(),
        }
    }

    /// Parses the value with `parse` (TOML integers and booleans are accepted as their text).
    fn parse<T>(&self, parse: impl Fn(&str) -> Result<T, String>) -> Result<T, ConfigError> {
        if let Raw::Toml(v) = &self.raw
            && !matches!(
                v,
                toml::Value::String(_) | toml::Value::Integer(_) | toml::Value::Boolean(_)
            )
        {
            return Err(self.invalid(format!(
                "expected a string or number, found {}",
                v.type_str()
            )));
        }
        parse(&self.text()).map_err(|r| self.invalid(r))
    }
}

/// The value for `key` from the command line, else from the file, if either has it.
fn pick<'a>(
    file: Option<&File>,
    key: &'static str,
    cli: Option<&'a String>,
    file_v: Option<&'a Spanned<toml::Value>>,
) -> Option<Source<'a>> {
    if let Some(s) = cli {
        return Some(Source {
            key,
            origin: "command line".into(),
            raw: Raw::Str(s.as_str()),
        });
    }
    let (f, v) = (file?, file_v?);
    Some(Source {
        key,
        origin: f.origin(v),
        raw: Raw::Toml(v.get_ref()),
    })
}

/// The worker command: after `--`, else the file's `command`; checked to be executable.
fn worker_command(file: Option<&File>, cli: &[String]) -> Result<Option<Vec<String>>, ConfigError> {
    let command = if !cli.is_empty() {
        Some(cli.to_vec())
    } else if let Some((f, v)) = file.and_then(|f| Some((f, f.keys.command.as_ref()?))) {
        let src = Source {
            key: "command",
            origin: f.origin(v),
            raw: Raw::Toml(v.get_ref()),
        };
        let list = v.get_ref().as_array().map(|a| {
            a.iter()
                .map(|x| x.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
        });
        match list {
            Some(Some(list)) if !list.is_empty() && !list[0].is_empty() => Some(list),
            _ => {
                return Err(src.invalid(
                    "expected a non-empty array of strings, e.g. [\"node\", \"server.js\"]",
                ));
            }
        }
    } else {
        None
    };
    if let Some(cmd) = &command {
        check_command(&cmd[0])?;
        check_node_script(cmd)?;
    }
    Ok(command)
}

/// Resolves `lb route`'s worker count and seed (flags over file over defaults).
pub fn route_settings(
    workers: Option<&String>,
    hash_seed: Option<&String>,
    config: Option<&Path>,
) -> Result<(usize, u64), ConfigError> {
    let run = RunArgs {
        workers: workers.cloned(),
        hash_seed: hash_seed.cloned(),
        config: config.map(Path::to_owned),
        ..RunArgs::default()
    };
    let s = Settings::from_cli(&run, &[])?;
    Ok((s.workers, s.hash_seed))
}

/// Checks that the worker program exists and is executable (searching `PATH` for bare names).
fn check_command(program: &str) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let found = if program.contains('/') {
        executable(Path::new(program))
    } else {
        std::env::var_os("PATH").is_some_and(|path| {
            std::env::split_paths(&path).any(|dir| executable(&dir.join(program)))
        })
    };
    if found {
        Ok(())
    } else {
        Err(ConfigError::CommandNotFound {
            command: program.to_owned(),
            hint: if program.contains('/') {
                String::new()
            } else {
                " in PATH".into()
            },
        })
    }
}

/// `node SCRIPT …`: the script exists, as Node's loader would find it (`SCRIPT`, or with
/// `.js`, `.mjs`, `.cjs`, `.json` or `.node` added). Options before the script (`node -r x
/// app.js`) are not interpreted: only a first argument that is not an option is checked.
fn check_node_script(cmd: &[String]) -> Result<(), ConfigError> {
    let is_node = Path::new(&cmd[0])
        .file_name()
        .is_some_and(|n| n == "node" || n == "nodejs");
    let Some(script) = cmd.get(1).filter(|a| is_node && !a.starts_with('-')) else {
        return Ok(());
    };
    let path = Path::new(script);
    let found = path.exists()
        || ["js", "mjs", "cjs", "json", "node"]
            .iter()
            .any(|ext| Path::new(&format!("{script}.{ext}")).exists());
    if found {
        return Ok(());
    }
    let full = std::env::current_dir().map_or_else(|_| path.to_owned(), |d| d.join(path));
    Err(ConfigError::Conflict(format!(
        "worker script `{script}` not found (node would fail with: Cannot find module '{}')",
        full.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("30").unwrap_err().contains("missing unit"));
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn crash_loop_guard() {
        let c = parse_crash_loop("3/10s").unwrap();
        assert_eq!((c.exits, c.window), (3, Duration::from_secs(10)));
        assert!(parse_crash_loop("10").is_err());
        assert!(parse_crash_loop("0/1m").is_err());
        assert!(parse_crash_loop("5/0s").is_err());
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("100MB").unwrap(), 100_000_000);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("0").is_err());
    }

    #[test]
    fn addresses() {
        assert_eq!(parse_addr("[::]:8000").unwrap().to_string(), "[::]:8000");
        assert_eq!(
            parse_addr("localhost:0").unwrap().to_string(),
            "127.0.0.1:0"
        );
        assert!(parse_addr("127.0.0.1").is_err());
        assert!(parse_addr("nowhere:80").is_err());
    }

    fn file(text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lb-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = dir.join(format!("{n}.toml"));
        std::fs::write(&p, text).unwrap();
        p
    }

    fn load(text: &str, cli: RunArgs) -> Result<Settings, ConfigError> {
        let run = RunArgs {
            config: Some(file(text)),
            ..cli
        };
        Settings::from_cli(&run, &[])
    }

    #[test]
    fn file_values_and_cli_override() {
        let s = load(
            "workers = 3\npolicy = \"round-robin\"\nshutdown_timeout = \"2s\"\n",
            RunArgs::default(),
        )
        .unwrap();
        assert_eq!(
            (s.workers, s.policy, s.shutdown_timeout),
            (3, Policy::RoundRobin, Duration::from_secs(2))
        );
        let s = load(
            "workers = 3\n",
            RunArgs {
                workers: Some("5".into()),
                ..RunArgs::default()
            },
        )
        .unwrap();
        assert_eq!(s.workers, 5);
    }

    #[test]
    fn file_errors_name_line_key_and_value() {
        let e = load(
            "listen = \"127.0.0.1:0\"\nworkers = 0\n",
            RunArgs::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("line 2") && e.contains("`workers`") && e.contains("`0`"),
            "{e}"
        );
        let e = load("\nbogus = 1\n", RunArgs::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("bogus"), "{e}");
        let e = load("workers = [1]\n", RunArgs::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("workers") && e.contains("array"), "{e}");
        let e = load("workers = \n", RunArgs::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1"), "{e}");
        let e = load("queue_timeout = \"soon\"\n", RunArgs::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("queue-timeout") && e.contains("soon"), "{e}");
        let e = load("command = []\n", RunArgs::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("command"), "{e}");
        for e in [
            load("workers = 0\n", RunArgs::default())
                .unwrap_err()
                .to_string(),
            load("\nbogus = 1\n", RunArgs::default())
                .unwrap_err()
                .to_string(),
        ] {
            assert!(!e.contains('\n'), "error must be one line: {e}");
        }
    }

    #[test]
    fn command_from_file_is_checked() {
        let s = load("command = [\"sh\", \"-c\", \"true\"]\n", RunArgs::default()).unwrap();
        assert_eq!(s.command.unwrap()[0], "sh");
        let e = load("command = [\"no-such-program-xyz\"]\n", RunArgs::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no-such-program-xyz"), "{e}");
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Any config file text gives settings or a one-line error, never a panic.
            #[test]
            fn any_config_text_is_ok_or_a_one_line_error(
                text in r#"(([a-z_]{1,18}) = ("[^"\n]{0,12}"|[0-9-]{1,6}|true|\[\]|\{\})?\n){0,6}"#
            ) {
                match load(&text, RunArgs::default()) {
                    Ok(_) => {}
                    Err(e) => prop_assert!(!e.to_string().contains('\n'), "multi-line error: {}", e),
                }
            }

            /// Durations and sizes never panic on arbitrary text.
            #[test]
            fn value_parsers_never_panic(v in "\\PC{0,16}") {
                let _ = parse_duration(&v);
                let _ = parse_bytes(&v);
                let _ = parse_addr(&v);
            }
        }
    }
}
