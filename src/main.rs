//! The `lb` binary: parses settings, binds, and runs the master (or the built-in worker).

use std::os::fd::AsRawFd;
use std::process::ExitCode;

use clap::Parser;
use lb::config::{Cli, LogFormat, Settings, Sub};
use lb::listener::{self, Listener};
use lb::metrics::{self, Shared};
use lb::supervisor::shell::{self, Master};

/// `print!` for the client commands: a closed stdout (`lb status --watch | head -1`) is a normal
/// end, as for `ls | head`: exit 0, no message.
macro_rules! out {
    ($($t:tt)*) => { write_out(format!($($t)*).as_bytes()) };
}

/// `println!` likewise.
macro_rules! outln {
    ($($t:tt)*) => { write_out(format!("{}\n", format_args!($($t)*)).as_bytes()) };
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => e.exit(), // usage errors exit 2, --help/--version exit 0
    };
    match cli.sub {
        Some(Sub::BuiltinWorker { listen }) => {
            init_logging(LogFormat::Text);
            let run = match listen {
                Some(addr) => lb::worker::builtin::main_standalone(addr).map_err(Into::into),
                None => lb::worker::builtin::main(),
            };
            match run {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&format!("built-in worker: {e}")),
            }
        }
        Some(Sub::Status {
            json,
            watch,
            target,
        }) => status(&target, json, watch),
        Some(Sub::Logs {
            worker,
            lines,
            follow,
            json,
            target,
        }) => logs(&target, worker.as_deref(), lines.as_deref(), follow, json),
        Some(Sub::Ls { json }) => {
            let running = lb::control::instances();
            if json {
                let all: Vec<&serde_json::Value> = running.iter().map(|i| &i.status).collect();
                outln!("{}", serde_json::Value::from(all.into_iter().cloned().collect::<Vec<_>>()));
            } else {
                out!("{}", lb::control::instances_table(&running));
            }
            ExitCode::SUCCESS
        }
        Some(Sub::Roll { target }) => {
            let path = match target_path(&target) {
                Ok(p) => p,
                Err(e) => return fail(&e.to_string()),
            };
            match lb::control::send(&path, &lb::control::Request::Roll, std::time::Duration::from_secs(3600)) {
                Ok(v) => {
                    outln!("rolling restart complete");
                    out!("{}", lb::control::status_table(&v["status"], color()));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e.to_string()),
            }
        }
        Some(Sub::Completions { shell }) => {
            use clap::CommandFactory;
            let mut script = Vec::new();
            let mut cmd = lb::config::with_choices(Cli::command());
            clap_complete::generate(shell, &mut cmd, "lb", &mut script);
            write_out(&script);
            ExitCode::SUCCESS
        }
        Some(Sub::Manpage { dir: Some(dir) }) => {
            use clap::CommandFactory;
            let written = std::fs::create_dir_all(&dir)
                .and_then(|()| clap_mangen::generate_to(Cli::command(), &dir));
            match written {
                Ok(()) => {
                    outln!("wrote lb.1 and its subcommands' pages to {}", dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&format!("cannot write the man pages to {}: {e}", dir.display())),
            }
        }
        Some(Sub::Manpage { dir: None }) => {
            use clap::CommandFactory;
            let mut page = Vec::new();
            // As `--dir` writes it: no `lb help` subcommand page to point to.
            let cmd = Cli::command().disable_help_subcommand(true);
            match clap_mangen::Man::new(cmd).render(&mut page) {
                Ok(()) => {
                    write_out(&page);
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&format!("cannot write the man page: {e}")),
            }
        }
        Some(Sub::Scale {
            workers,
            no_wait,
            target,
        }) => {
            let n = match lb::config::parse_workers(&workers) {
                Ok(n) => n,
                Err(e) => return fail(&format!("invalid worker count `{workers}`: {e}")),
            };
            let path = match target_path(&target) {
                Ok(p) => p,
                Err(e) => return fail(&e.to_string()),
            };
            let req = lb::control::Request::Scale { workers: n };
            match lb::control::send(&path, &req, std::time::Duration::from_secs(30)) {
                Ok(_) if no_wait => {
                    outln!("scaling to {n} workers (not waiting for them)");
                    ExitCode::SUCCESS
                }
                Ok(_) => {
                    outln!("scaling to {n} workers…");
                    match lb::control::wait_scaled(&path, n, std::time::Duration::from_secs(60)) {
                        Ok(()) => {
                            outln!("{n} workers ready");
                            ExitCode::SUCCESS
                        }
                        Err(e) => fail(&e.to_string()),
                    }
                }
                Err(e) => fail(&e.to_string()),
            }
        }
        Some(Sub::Reload { target }) => {
            let path = match target_path(&target) {
                Ok(p) => p,
                Err(e) => return fail(&e.to_string()),
            };
            match lb::control::send(&path, &lb::control::Request::Reload, std::time::Duration::from_secs(30)) {
                Ok(v) => {
                    let r = &v["reload"];
                    let list = |k: &str| {
                        let items: Vec<&str> = r[k]
                            .as_array()
                            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
                            .unwrap_or_default();
                        if items.is_empty() {
                            "nothing".to_string()
                        } else {
                            items.join(", ")
                        }
                    };
                    outln!("reloaded: changed {}", list("changed"));
                    for note in r["notes"].as_array().into_iter().flatten() {
                        outln!("{}", note.as_str().unwrap_or_default());
                    }
                    if r["restart_needed"]
                        .as_array()
                        .is_some_and(|a| !a.is_empty())
                    {
                        outln!(
                            "not applied until lb is restarted: {}",
                            list("restart_needed")
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e.to_string()),
            }
        }
        Some(Sub::Stop { no_wait, target }) => {
            let path = match target_path(&target) {
                Ok(p) => p,
                Err(e) => return fail(&e.to_string()),
            };
            match lb::control::send(&path, &lb::control::Request::Stop, std::time::Duration::from_secs(10)) {
                Ok(_) if no_wait => {
                    outln!("graceful shutdown started");
                    ExitCode::SUCCESS
                }
                Ok(v) => {
                    let pid = v["stop"]["pid"].as_u64().unwrap_or(0) as u32;
                    let limit = std::time::Duration::from_millis(
                        v["stop"]["timeout_ms"].as_u64().unwrap_or(35_000),
                    );
                    outln!(
                        "graceful shutdown started: waiting for lb (pid {pid}) to exit (at most {}s)…",
                        limit.as_secs()
                    );
                    if lb::control::wait_exited(pid, &path, limit) {
                        outln!("stopped");
                        ExitCode::SUCCESS
                    } else {
                        fail(&format!(
                            "lb (pid {pid}) has not exited after {}s",
                            limit.as_secs()
                        ))
                    }
                }
                Err(e) => fail(&e.to_string()),
            }
        }
        Some(Sub::Route {
            ip,
            key,
            live: true,
            target,
            ..
        }) => {
            let path = match target_path(&target) {
                Ok(p) => p,
                Err(e) => return fail(&e.to_string()),
            };
            let req = lb::control::Request::Route { ip, key };
            match lb::control::send(&path, &req, std::time::Duration::from_secs(5)) {
                Ok(v) => {
                    out!("{}", lb::control::describe_route(&v["route"]));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e.to_string()),
            }
        }
        Some(Sub::Route {
            ip,
            key,
            workers,
            hash_seed,
            config,
            ..
        }) => route(
            ip.as_deref(),
            key.as_deref(),
            workers.as_ref(),
            hash_seed.as_ref(),
            config.as_deref(),
        ),
        Some(Sub::Check {
            run,
            command,
            takeover,
        }) => match Settings::from_cli_text(
            &run,
            &command,
            // The preflight of an in-place upgrade checks the text the next image will run with.
            takeover
                .and_then(|_| std::env::var(lb::upgrade::CONFIG_ENV).ok())
                .as_deref(),
        )
            .map_err(|e| e.to_string())
            .and_then(|s| user_allowed(&s).map(|()| s))
            .and_then(|s| match takeover {
                Some(f) if f != lb::upgrade::FORMAT => Err(format!(
                    "cannot take over from the running lb: its state format is {f}, lb {} reads format {}",
                    lb::VERSION,
                    lb::upgrade::FORMAT
                )),
                _ => Ok(s),
            }) {
            Ok(s) => {
                outln!(
                    "configuration ok: listen {}, {} workers, policy {}, steering {}, worker command: {}",
                    s.listen,
                    s.workers,
                    s.policy,
                    if s.steering == lb::config::Steering::Kernel {
                        "kernel"
                    } else {
                        "master"
                    },
                    s.command
                        .as_ref()
                        .map_or_else(|| "built-in".to_string(), |c| c.join(" "))
                );
                if s.command.is_some() {
                    outln!(
                        "checked: the worker program exists and is executable (and a node script exists); \
             not checked: that it starts and serves (lb stops if every worker fails to start {} times)",
                        lb::supervisor::GIVE_UP_AFTER
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        None => {
            // An in-place upgrade: lb's previous image left its sockets, workers and counters,
            // and the config file's text its preflight checked (the file may have changed since).
            let resumed = match lb::upgrade::take() {
                Some(Ok(state)) => Some(state),
                Some(Err(e)) => {
                    return fail(&format!("cannot take over from lb's previous image: {e}"));
                }
                None => None,
            };
            let text = resumed.as_ref().and_then(|s| s.config.as_deref());
            match Settings::from_cli_text(&cli.run, &cli.command, text) {
                Ok(settings) => serve(settings, cli.run.clone(), cli.command.clone(), resumed),
                Err(e) => fail(&e.to_string()),
            }
        }
    }
}

/// Prints a one-line error and returns exit status 2.
fn write_out(bytes: &[u8]) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("lb: error: cannot write to standard output: {e}");
        std::process::exit(1);
    }
}

/// Colours only on a terminal (and not with NO_COLOR).
fn color() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// The control socket a client command talks to (see [`lb::control::find`]).
fn target_path(t: &lb::config::Target) -> Result<std::path::PathBuf, lb::control::ControlError> {
    lb::control::find(t.control.clone(), t.listen.as_deref())
}

/// `lb logs`: the workers' last lines (and, following, new ones).
fn logs(
    target: &lb::config::Target,
    worker: Option<&str>,
    lines: Option<&str>,
    follow: bool,
    json: bool,
) -> ExitCode {
    use lb::output::tail;
    let worker = match worker.map(|w| lb::config::parse_count(w, 0, 1023)) {
        Some(Err(e)) => return fail(&format!("invalid --worker `{}`: {e}", worker.unwrap_or(""))),
        Some(Ok(n)) => Some(n),
        None => None,
    };
    let lines = match lines.map(|n| lb::config::parse_count(n, 0, lb::output::RING_LINES)) {
        Some(Err(e)) => return fail(&format!("invalid -n `{}`: {e}", lines.unwrap_or(""))),
        Some(Ok(n)) => n,
        None => tail::DEFAULT_LINES,
    };
    let path = match target_path(target) {
        Ok(p) => p,
        Err(e) => return fail(&e.to_string()),
    };
    let req = tail::Request {
        worker,
        lines,
        follow,
        after: 0,
    };
    match tail::run(&path, req, json, &mut |line| {
        write_out(line.as_bytes());
        true
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn status(target: &lb::config::Target, json: bool, watch: bool) -> ExitCode {
    let path = match target_path(target) {
        Ok(p) => p,
        Err(e) => return fail(&e.to_string()),
    };
    loop {
        match lb::control::send(
            &path,
            &lb::control::Request::Status,
            std::time::Duration::from_secs(5),
        ) {
            Ok(v) if json => outln!("{}", v["status"]),
            Ok(v) => {
                if watch && color() {
                    out!("\x1b[2J\x1b[H"); // clear the screen, like pm2 monit
                }
                out!("{}", lb::control::status_table(&v["status"], color()));
            }
            Err(e) => return fail(&e.to_string()),
        }
        if !watch {
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("lb: error: {msg}");
    ExitCode::from(2)
}

fn route(
    ip: Option<&str>,
    key: Option<&str>,
    workers: Option<&String>,
    seed: Option<&String>,
    config: Option<&std::path::Path>,
) -> ExitCode {
    let hashed = match lb::control::route_key(ip, key) {
        Ok(k) => k,
        Err(e) => return fail(&e),
    };
    match lb::config::route_settings(workers, seed, config) {
        Ok((n, seed)) => {
            let home = lb::balance::StickyHash::new(seed).pick_key(hashed, n, |_| true);
            outln!("{}", home.expect("at least one slot"));
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e.to_string()),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// `--user` needs root, unless it names lb's own user.
fn user_allowed(settings: &Settings) -> Result<(), String> {
    if let Some(u) = &settings.user {
        let me = nix::unistd::getuid().as_raw();
        if me != 0 && me != u.uid {
            return Err(format!(
                "--user {}: running workers as another user needs lb to run as root (it runs as uid {me})",
                u.name
            ));
        }
    }
    Ok(())
}

/// The listener and admin socket lb's previous image passed (an in-place upgrade).
fn resumed_sockets(state: &lb::upgrade::State) -> std::io::Result<lb::systemd::Passed> {
    let listener = match state.listener {
        Some(fd) => Some(socket2::Socket::from(lb::upgrade::adopt(fd)?)),
        None => None,
    };
    let metrics = match state.metrics {
        Some(fd) => Some(lb::upgrade::listener(fd)?),
        None => None,
    };
    Ok(lb::systemd::Passed { listener, metrics })
}

fn serve(
    mut settings: Settings,
    run: lb::config::RunArgs,
    command: Vec<String>,
    resumed: Option<lb::upgrade::State>,
) -> ExitCode {
    if let Err(e) = user_allowed(&settings) {
        return fail(&e);
    }
    if let Some(u) = &settings.user
        && nix::unistd::getuid().as_raw() == u.uid
        && u.uid != 0
    {
        settings.user = None; // already that user
    }
    init_logging(settings.log_format);
    if settings.proxy_trusted.is_some()
        && settings.proxy_protocol == lb::proxy::Mode::Off
        && !settings.hash_key.has_xff()
    {
        tracing::warn!(
            "--proxy-trusted has no effect without --proxy-protocol strip|keep or --hash-key xff: no connection is asked for a PROXY header and no X-Forwarded-For is read"
        );
    }
    if let Some(limit) = listener::raise_nofile_limit() {
        tracing::debug!("open-file limit: {limit}");
    }
    let argv = match &settings.command {
        Some(cmd) => cmd.clone(),
        None => match std::env::current_exe() {
            Ok(exe) => vec![
                exe.to_string_lossy().into_owned(),
                lb::spawn::BUILTIN_WORKER.into(),
            ],
            Err(e) => {
                return fail(&format!(
                    "cannot find lb's own executable for the built-in worker: {e}"
                ));
            }
        },
    };
    // Sockets systemd passed (socket activation) are used instead of binding (after an in-place
    // upgrade they are in the state: LISTEN_FDS still describes the first image).
    let passed = match &resumed {
        Some(state) => match resumed_sockets(state) {
            Ok(p) => p,
            Err(e) => return fail(&format!("cannot take over lb's sockets: {e}")),
        },
        None => match lb::systemd::passed() {
            Ok(p) => p,
            Err(e) => return fail(&format!("socket activation: {e}")),
        },
    };
    let activated = passed.listener.is_some() && resumed.is_none();
    if resumed.is_some() && settings.steering == lb::config::Steering::Kernel {
        tracing::warn!("steering: not applied until lb is restarted");
        settings.steering = lb::config::Steering::Master;
    }
    let kernel = settings.steering == lb::config::Steering::Kernel;
    if kernel && activated {
        return fail(
            "--steering kernel binds one listener per slot itself; it cannot use a socket from systemd",
        );
    }
    // Kernel steering: one SO_REUSEPORT listener per slot instead of one the master accepts on.
    let (socket, group) = match passed.listener {
        Some(s) => {
            listener::no_delay(&s);
            (Some(s), None)
        }
        None if kernel => {
            match lb::steering::bind_group(settings.listen, settings.workers, settings.backlog) {
                Ok(g) => (None, Some(g)),
                Err(e) => return fail(&e.to_string()),
            }
        }
        None => match listener::bind(settings.listen, settings.backlog) {
            Ok(s) => (Some(s), None),
            Err(e) => return fail(&e.to_string()),
        },
    };
    let metrics_listener = match passed.metrics {
        Some(l) => Some(l),
        None => match settings.metrics.map(metrics::bind).transpose() {
            Ok(l) => l,
            Err(e) => return fail(&format!("metrics endpoint: {e}")),
        },
    };
    // The address clients reach (port 0 resolved): it names this instance's control socket.
    let bound = match (&socket, &group) {
        (Some(s), _) => s.local_addr().ok().and_then(|a| a.as_socket()),
        (None, Some(g)) => g.first().and_then(|s| s.local_addr().ok()?.as_socket()),
        (None, None) => None,
    }
    .unwrap_or(settings.listen);
    // (`settings.control` stays as configured, `auto`, so a reload sees no change.)
    let control_path = settings.control.as_ref().map(|p| {
        if p.as_os_str() == lb::control::AUTO {
            lb::control::instance_path(bound)
        } else {
            p.clone()
        }
    });
    let control = match resumed.as_ref().map(|s| s.control) {
        Some(Some(fd)) => match lb::upgrade::unix_listener(fd) {
            Ok(c) => Some(c),
            Err(e) => return fail(&format!("cannot take over the control socket: {e}")),
        },
        Some(None) => None,
        None => match control_path.as_deref().map(lb::control::bind).transpose() {
            Ok(c) => c,
            Err(e) => return fail(&e.to_string()),
        },
    };
    let takeover = std::env::current_exe().ok().map(|exe| shell::Takeover {
        exe,
        args: std::env::args_os().skip(1).collect(),
        metrics_fd: metrics_listener.as_ref().map(|l| l.as_raw_fd()),
        control_fd: control.as_ref().map(|c| c.as_raw_fd()),
    });
    // Everything that needed root besides starting workers as another user is done.
    if settings.user.is_some()
        && let Err(e) = lb::spawn::drop_master_privileges()
    {
        return fail(&e);
    }
    // One thread: the master's work per connection is a few syscalls, and workers must be
    // spawned from a thread that lives as long as the process (PR_SET_PDEATHSIG).
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the runtime: {e}")),
    };
    let result = rt.block_on(async move {
        let listener = socket.map(Listener::new).transpose()?;
        let group = match group {
            Some(g) => Some(lb::steering::Group::new(
                g,
                settings.backlog,
                lb::balance::StickyHash::new(settings.hash_seed),
            )?),
            None => None,
        };
        let local = match (&listener, &group) {
            (Some(l), _) => l.local_addr()?,
            (None, Some(g)) => g.local_addr(),
            (None, None) => return Err(std::io::Error::other("no listening socket")),
        };
        let shared = Shared::new(settings.workers, settings.policy);
        let _ = shared.listen.set(local);
        let metrics_addr = match metrics_listener {
            Some(l) => {
                l.set_nonblocking(true)?;
                let l = tokio::net::TcpListener::from_std(l)?;
                let addr = l.local_addr()?;
                tokio::spawn(metrics::serve(l, shared.clone()));
                Some(addr)
            }
            None => None,
        };
        tracing::info!(
            "{}{} ({} workers, policy {}, worker command: {})",
            shell::listening_line(local, metrics_addr),
            if activated {
                " (sockets from systemd)"
            } else if kernel {
                " (kernel steering)"
            } else {
                ""
            },
            settings.workers,
            settings.policy,
            settings
                .command
                .as_ref()
                .map_or_else(|| "built-in".to_string(), |c| c.join(" "))
        );
        let commands = match control {
            Some(c) => {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                let c = tokio::net::UnixListener::from_std(c)?;
                tokio::spawn(lb::control::serve(c, shared.clone(), tx));
                Some(rx)
            }
            None => None,
        };
        lb::reaper::become_subreaper();
        let mut master = Master::new(settings, argv, shared).reload_from(run, command);
        if let Some(t) = takeover {
            master = master.with_takeover(t);
        }
        if let Some(state) = resumed {
            master = master.resume_from(state);
        }
        master.run(listener, group, commands).await
    });
    if let Some(p) = control_path {
        let _ = std::fs::remove_file(p);
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e.to_string()),
    }
}
