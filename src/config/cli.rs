//! The command line: `lb`'s own options ([`RunArgs`], defined with the settings) and its
//! subcommands, and the word lists shell completion offers.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use super::RunArgs;

/// `lb`: sticky-session TCP load balancer that passes accepted connections to worker processes.
#[derive(Debug, Parser)]
#[command(name = "lb", version = crate::VERSION, about, long_about = None)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
#[command(
    after_help = "Without a worker command, lb runs its built-in HTTP/WebSocket worker.\n\
Examples:\n  lb\n  lb -w 4 -l 0.0.0.0:3000 -- node server.js\n  lb route 203.0.113.7 --workers 4"
)]
pub struct Cli {
    /// Helper subcommands.
    #[command(subcommand)]
    pub sub: Option<Sub>,
    /// Options of the server.
    #[command(flatten)]
    pub run: RunArgs,
    /// Worker command and its arguments (after `--`); default: the built-in worker.
    #[arg(last = true, value_name = "WORKER_COMMAND")]
    pub command: Vec<String>,
}

/// Which running lb a client command talks to: `--control PATH`, or `--listen ADDR` (the lb
/// listening there, found by its per-instance control socket), or the only one running.
#[derive(Debug, Clone, Default, Args)]
pub struct Target {
    /// That lb's control socket [default: the only lb running, or the one --listen names].
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// The lb listening on this address (when several run).
    #[arg(short, long, value_name = "ADDR")]
    pub listen: Option<String>,
}

/// `--control auto` (the default): one control socket per lb instance, named by its listen
/// address (`crate::control::instance_path`).
pub const CONTROL_AUTO: &str = "auto";

/// Helper subcommands.
#[derive(Debug, Subcommand)]
pub enum Sub {
    /// Print the slot (0-based) that `sticky` sends IP (or a `--hash-key` key) to when all
    /// slots are up: its home.
    Route {
        /// The client IP address (or, with `xff`, the address the proxy appended).
        #[arg(required_unless_present = "key", conflicts_with = "key")]
        ip: Option<String>,
        /// A key's value instead of an IP (a cookie's, a header's, a query parameter's).
        #[arg(long, value_name = "VALUE")]
        key: Option<String>,
        /// Number of worker slots.
        #[arg(short, long)]
        workers: Option<String>,
        /// Seed of the sticky hash.
        #[arg(long)]
        hash_seed: Option<String>,
        /// Read workers / hash_seed from this config file.
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Ask the running lb instead: the home slot, its load (full or not, with
        /// --balance-factor) and where a new connection would go now.
        #[arg(long, conflicts_with_all = ["workers", "hash_seed", "config"])]
        live: bool,
        /// With --live: which running lb.
        #[command(flatten)]
        target: Target,
    },
    /// List the lbs running on this host (one per control socket that answers): listen
    /// address, pid, workers ready, uptime, version.
    Ls {
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Show the workers of a running lb (like `pm2 ls`).
    Status {
        /// Print the JSON document instead of the table.
        #[arg(long)]
        json: bool,
        /// Refresh every second until interrupted.
        #[arg(long)]
        watch: bool,
        /// Which running lb: its control socket, or the one listening on an address.
        #[command(flatten)]
        target: Target,
    },
    /// Show the workers' last output lines and follow new ones (like `pm2 logs`); needs lb
    /// started with --worker-output prefix or json.
    Logs {
        /// Only this worker's lines (its slot, 0-based).
        #[arg(long, value_name = "N")]
        worker: Option<String>,
        /// How many of each worker's last lines (at most 1000 are kept) [default: 15].
        #[arg(short = 'n', long, value_name = "LINES")]
        lines: Option<String>,
        /// Then print new lines as they come, until interrupted (or lb stops).
        #[arg(short, long)]
        follow: bool,
        /// Print each line as a JSON object (time, slot, pid, stream, line).
        #[arg(long)]
        json: bool,
        /// Which running lb: its control socket, or the one listening on an address.
        #[command(flatten)]
        target: Target,
    },
    /// Rolling restart of a running lb; returns when it has finished.
    Roll {
        /// Which running lb: its control socket, or the one listening on an address.
        #[command(flatten)]
        target: Target,
    },
    /// Change the number of workers of a running lb: new slots start, removed slots drain;
    /// returns when the new slots are ready and the removed ones gone (at most 60s).
    Scale {
        /// The new number of workers.
        workers: String,
        /// Return once lb has the request, without waiting for the workers.
        #[arg(long)]
        no_wait: bool,
        /// Which running lb: its control socket, or the one listening on an address.
        #[command(flatten)]
        target: Target,
    },
    /// Reload a running lb's configuration (as SIGHUP) and report what changed.
    Reload {
        /// Which running lb: its control socket, or the one listening on an address.
        #[command(flatten)]
        target: Target,
    },
    /// Graceful shutdown of a running lb; returns when it has exited (at most its
    /// --shutdown-timeout and a few seconds).
    Stop {
        /// Return once lb has begun shutting down, without waiting for it to exit.
        #[arg(long)]
        no_wait: bool,
        /// Which running lb: its control socket, or the one listening on an address.
        #[command(flatten)]
        target: Target,
    },
    /// Validate a configuration (flags, `--config` file, worker command) as a start would,
    /// without binding or spawning anything; exit 0, or one line and exit 2.
    Check {
        /// The options to check (as for `lb` itself).
        #[command(flatten)]
        run: Box<RunArgs>,
        /// The worker command to check (after `--`).
        #[arg(last = true, value_name = "WORKER_COMMAND")]
        command: Vec<String>,
        /// Also check that this lb can take over from a running lb whose state is in this
        /// format (the preflight of an in-place upgrade, DESIGN §10).
        #[arg(long, hide = true, value_name = "FORMAT")]
        takeover: Option<u32>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page lb(1) (roff) on stdout, or with --dir write lb(1) and a page per
    /// subcommand (lb-status(1), lb-route(1), …) into a directory.
    Manpage {
        /// Write lb.1 and every lb-SUBCOMMAND.1 here (created if missing), e.g.
        /// /usr/local/share/man/man1.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Run as lb's built-in worker (lb starts this itself; not for direct use).
    #[command(hide = true, name = "builtin-worker")]
    BuiltinWorker {
        /// Serve HTTP directly on this address instead of taking connections from lb
        /// (benchmark baseline; SO_REUSEPORT).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
}

/// The options that take one of a fixed set of words, for shell completion (`--policy <TAB>`
/// offers these instead of file names). Parsing stays with each option's own parser, whose
/// errors are one line.
pub const WORD_CHOICES: &[(&str, &[&str])] = &[
    ("policy", &["sticky", "round-robin", "least-connections"]),
    ("sticky_stalled", &["next", "wait"]),
    ("steering", &["master", "kernel"]),
    ("proxy_protocol", &["off", "strip", "keep"]),
    ("app_metrics", &["on", "off"]),
    ("serialization", &["json", "advanced"]),
    ("log_format", &["text", "json"]),
    ("worker_output", &["inherit", "prefix", "json"]),
    (
        "handoff",
        &["sticky-session:connection", "sticky:balance", "socket.io"],
    ),
];

/// `cmd` with [`WORD_CHOICES`] as possible values, for a completion script (lb itself parses
/// with its own parsers).
pub fn with_choices(cmd: clap::Command) -> clap::Command {
    let add = |mut c: clap::Command| {
        for (name, words) in WORD_CHOICES {
            if c.get_arguments().any(|a| a.get_id() == *name) {
                c = c.mut_arg(*name, |a| {
                    a.value_parser(clap::builder::PossibleValuesParser::new(words.iter()))
                });
            }
        }
        c
    };
    add(cmd).mut_subcommand("check", add)
}
