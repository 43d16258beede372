//! `ferry`: run commands in a microVM through its ferry agent.
//!
//! Exit status: the remote command's code; 128+N when it died of signal N; 124 when its
//! `--timeout` ended it (as timeout(1)); 127 when the program was not found; 126 when it could
//! not be executed; 255 for ferry's own errors (usage, transport, an agent that stopped
//! answering).

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

mod cp;
mod jobs;
mod signals;
mod sysops;
mod term;
mod units;

use clap::{Parser, Subcommand};
use ferry_host::{
    errno_name, read_secret_file, AgentInfo, AttachEvent, AttachOptions, Attachment, Client,
    Command, ConnectOptions, Controller, Ending, Error, ErrorCode, Event, Execution, ExitStatus,
    Security, Stdin, StdinWriter, Stream, Target, Termination, TreeKill,
};
use signals::{Caught, Forwarding, Keys};

/// Exit status for ferry's own failures (transport, protocol, usage), as ssh does.
const EXIT_FERRY: u8 = 255;
const EXIT_NOT_FOUND: u8 = 127;
const EXIT_CANNOT_EXECUTE: u8 = 126;
/// Our own stdout was closed under us: the shell's status for death by SIGPIPE.
const EXIT_BROKEN_PIPE: u8 = 128 + 13;
/// The command's `--timeout` ended it: timeout(1)'s status.
const EXIT_TIMED_OUT: u8 = 124;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Run commands in a microVM through its ferry agent"
)]
struct Cli {
    /// The agent: vsock://CID:PORT, hvsock://PATH:PORT or unix://PATH
    #[arg(long, short = 'c', env = "FERRY_CONNECT", value_name = "TARGET")]
    connect: String,

    /// Give up connecting after this many seconds
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    connect_timeout: u64,

    /// The agent's secret (a file only its owner may read; `cargo xtask vm` prints one).
    /// Without it, ferry talks only to an agent started --insecure
    #[arg(long, env = "FERRY_SECRET_FILE", value_name = "PATH")]
    secret_file: Option<PathBuf>,

    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a program in the guest, streaming its output; exit with its status
    ///
    /// While it runs, the signals ferry gets are the command's: SIGINT, SIGTERM, SIGHUP, SIGQUIT,
    /// SIGUSR1 and SIGUSR2 are forwarded to its process group; with -t, SIGTERM ends its whole
    /// tree instead (an interactive shell ignores SIGTERM) and SIGWINCH resizes its terminal;
    /// with -it on a terminal, keys are bytes (^C, ^\) and only SIGTERM and SIGHUP are handled.
    /// A second SIGINT, SIGTERM, SIGHUP or SIGQUIT ends ferry at once, and the agent then ends
    /// the command's tree.
    Exec(ExecArgs),
    /// Run the target user's login shell on a terminal (`exec -it` of `$SHELL -l`, which the
    /// agent sets from the user's passwd entry; /bin/sh when it has none)
    Shell(ShellArgs),
    /// Check that the agent answers and proves the secret; print its version, protocol, security
    /// mode and limits
    Health,
    /// End every command the agent runs (everything in its commands' cgroup), whoever started
    /// them: the way back from a fork bomb or a runaway daemon
    KillAll,
    /// Copy files or directories between the host and the guest (a guest path is :PATH), with
    /// their SHA-256 checked end to end
    Cp(cp::CpArgs),
    /// Describe the guest: kernel, uptime, clock, CPUs, memory, mounts, interfaces, the agent
    Info(sysops::InfoArgs),
    /// Power the guest off (or reboot it): every process gets SIGTERM, SIGKILL after the
    /// grace, file systems are synced and unmounted. Exits 0 once the agent acknowledged
    Shutdown(sysops::ShutdownArgs),
    /// Set the guest's clock to the host's and print the step
    TimeSync,
    /// Add random bytes of the host's to the guest's entropy pool
    Reseed(sysops::ReseedArgs),
    /// List the detached jobs (`exec --detach`) the user may see
    Jobs(jobs::JobsArgs),
    /// Wait until a job ends; exit with its status (as exec does)
    Wait(jobs::JobArgs),
    /// End a job's whole tree (SIGTERM, SIGKILL after the grace), or send it a signal
    Kill(jobs::KillArgs),
    /// Follow a job's output from the start (or from offsets), then its exit status. ^C
    /// detaches; the job runs on
    Attach(jobs::AttachArgs),
    /// Forget an ended job and its output
    Rm(jobs::JobArgs),
}

#[derive(clap::Args)]
struct ExecArgs {
    /// Forward this process's stdin to the command (default: /dev/null)
    #[arg(short = 'i', long = "stdin")]
    interactive: bool,

    /// Run the command on a terminal in the guest, sized and typed (TERM) like ours; its stdout
    /// and stderr arrive as one stream. With -i and a terminal here, ours goes raw: every key is
    /// the command's (^C, ^\, ^Z included), as over ssh -t
    #[arg(short = 't', long = "tty")]
    tty: bool,

    #[command(flatten)]
    bounds: BoundArgs,

    /// Set an environment variable (repeatable)
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(OsString, OsString)>,

    /// Working directory in the guest
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    workdir: Option<OsString>,

    /// Start from an empty environment instead of the agent's
    #[arg(long)]
    clean_env: bool,

    /// Run as this guest user (NAME[:GROUP] or UID[:GID]) instead of the agent's default;
    /// the agent's policy decides who may be asked for
    #[arg(short = 'u', long = "user", value_name = "USER[:GROUP]")]
    user: Option<OsString>,

    /// Start the command as a detached job and print its id (one line on stdout, nothing else)
    /// once it started; it runs on after ferry exits. Its stdin (with -i) stays open for
    /// `ferry attach -i`
    #[arg(short = 'd', long)]
    detach: bool,

    /// Name the job (letters, digits, '.', '_', '-'; not only digits), unique while it exists,
    /// to refer to it instead of its id. Without --detach: start it as a job and follow it as
    /// exec does (if ferry goes away, the job runs on)
    #[arg(long, value_name = "NAME")]
    name: Option<String>,

    /// The program and its arguments (a bare name is looked up in the guest's PATH)
    // NOTE: no `allow_hyphen_values`: an unknown option before the program is a usage error
    // that names it (`ferry exec -X -- tty` must not run a program called `-X`). Everything after
    // the program, or after `--`, is the command's own.
    #[arg(required = true, trailing_var_arg = true, value_name = "PROG")]
    argv: Vec<OsString>,
}

/// How long a command may run and how much of its output is kept.
// NOTE: `allow_hyphen_values`: a value like `-1` reaches the parser, which says what is wrong
// with it and names the option, instead of clap taking it for an unknown flag.
#[derive(clap::Args)]
struct BoundArgs {
    /// End the command's whole tree after this long (500ms, 30s, 2m, 1h; a bare number is
    /// seconds; 0: no timeout): SIGTERM, then SIGKILL after --kill-after. Exit status 124
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout, allow_hyphen_values = true)]
    timeout: Option<Duration>,

    /// The grace between the SIGTERM and the SIGKILL of a timeout or a cancel (default: the
    /// agent's, 2s; 0: SIGKILL at once)
    #[arg(long, value_name = "DURATION", value_parser = parse_kill_after, allow_hyphen_values = true)]
    kill_after: Option<Duration>,

    /// When the command exits, kill what it left running too (background jobs, daemons)
    #[arg(long)]
    kill_tree_on_exit: bool,

    /// Keep at most this many bytes of each output stream (K, M, G: powers of 1024), within the
    /// agent's own maximum: past it the first bytes and the last are kept, and a line on stderr
    /// says how many were dropped between them. 0 is refused: protocol 3 reads it as the
    /// agent's own maximum
    #[arg(long, value_name = "BYTES", value_parser = units::parse_size, allow_hyphen_values = true)]
    max_output: Option<u64>,
}

#[derive(clap::Args)]
struct ShellArgs {
    /// Run as this guest user (NAME[:GROUP] or UID[:GID]); the agent's policy decides who may
    /// be asked for
    #[arg(short = 'u', long = "user", value_name = "USER[:GROUP]")]
    user: Option<OsString>,

    /// Working directory in the guest
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    workdir: Option<OsString>,

    /// Set an environment variable (repeatable)
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(OsString, OsString)>,

    #[command(flatten)]
    bounds: BoundArgs,
}

/// The shell `ferry shell` runs: the user's own, as a login shell. The agent sets `SHELL` from
/// the user's passwd entry (`/bin/sh` without one); `/bin/sh` reads it in the guest.
const LOGIN_SHELL: [&str; 3] = ["/bin/sh", "-c", r#"exec "${SHELL:-/bin/sh}" -l"#];

/// `--timeout`: a duration; 0 is no timeout, as in timeout(1).
fn parse_timeout(text: &str) -> Result<Duration, String> {
    units::parse_duration(text)
}

/// `--kill-after`: a duration the protocol can carry (whole milliseconds in 32 bits).
fn parse_kill_after(text: &str) -> Result<Duration, String> {
    let grace = units::parse_duration(text)?;
    if grace > Duration::from_millis(u64::from(u32::MAX)) {
        return Err(format!("{text:?} is too long (at most 49 days)"));
    }
    Ok(grace)
}

fn parse_env(text: &str) -> Result<(OsString, OsString), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.into(), value.into())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

fn main() -> ExitCode {
    // Before anything can put the terminal in raw mode: a panic restores it (the release
    // profile aborts, so no destructor would).
    term::install_panic_hook();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return ExitCode::from(if err.use_stderr() { EXIT_FERRY } else { 0 });
        }
    };
    let target: Target = match cli.connect.parse() {
        Ok(target) => target,
        Err(err) => return fail(&err),
    };
    let secret = match cli.secret_file.as_deref().map(read_secret_file).transpose() {
        Ok(secret) => secret,
        Err(err) => return fail(&err),
    };
    let options = ConnectOptions {
        connect_timeout: Duration::from_secs(cli.connect_timeout.max(1)),
        secret,
        ..ConnectOptions::default()
    };
    let client = Client::new(&target, options);
    match cli.command {
        Cmd::Exec(args) => exec(&client, args),
        Cmd::Shell(args) => shell(&client, args),
        Cmd::Health => health(&client),
        Cmd::KillAll => kill_all(&client),
        Cmd::Cp(args) => cp::cp(&client, args),
        Cmd::Info(args) => sysops::info(&client, args),
        Cmd::Shutdown(args) => sysops::shutdown(&client, args),
        Cmd::TimeSync => sysops::time_sync(&client),
        Cmd::Reseed(args) => sysops::reseed(&client, args),
        Cmd::Jobs(args) => jobs::list(&client, args),
        Cmd::Wait(args) => jobs::wait(&client, args),
        Cmd::Kill(args) => jobs::kill(&client, args),
        Cmd::Attach(args) => jobs::attach(&client, args),
        Cmd::Rm(args) => jobs::remove(&client, args),
    }
}

/// Once per run: an insecure agent runs anything for anyone who reaches it.
fn warn_if_insecure(info: &AgentInfo) {
    if info.security == Security::Insecure {
        eprintln!(
            "ferry: warning: the agent runs without authentication (--insecure): anyone who \
             can reach it can run commands"
        );
    }
}

fn kill_all(client: &Client) -> ExitCode {
    match client.kill_all() {
        Ok(0) => ExitCode::SUCCESS,
        Ok(count) => {
            eprintln!("ferry: killed {count} processes");
            ExitCode::SUCCESS
        }
        Err(err) => fail(&err),
    }
}

fn fail(err: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("ferry: {err}");
    ExitCode::from(EXIT_FERRY)
}

fn health(client: &Client) -> ExitCode {
    let health = match client.health() {
        Ok(health) => health,
        Err(err) => return fail(&err),
    };
    warn_if_insecure(&health.info);
    let limits = &health.info.limits;
    let bounds = &health.info.bounds;
    println!("target:     {}", client.target());
    println!("agent:      ferry-agent {}", health.info.agent_version);
    println!("protocol:   {}", health.info.protocol_version);
    println!(
        "security:   {}",
        match health.info.security {
            Security::Authenticated => "authenticated (both sides proved the secret)",
            Security::Insecure => "INSECURE (no authentication)",
        }
    );
    println!(
        "round trip: {:.3} ms",
        health.round_trip.as_secs_f64() * 1e3
    );
    println!(
        "limits:     frame {} B, data chunk {} B, argv {} B / {} args, env {} B / {} vars, path {} B, stdin window {} B",
        limits.max_frame_body,
        limits.max_data,
        limits.max_argv_bytes,
        limits.max_args,
        limits.max_env_bytes,
        limits.max_env_vars,
        limits.max_path,
        limits.stdin_window
    );
    let or_none = |value: u64, unit: &str| match value {
        0 => "none".to_owned(),
        value => format!("{value}{unit}"),
    };
    println!(
        "bounds:     runtime {}, output {}, file size {}, connections {}, handshake {} ms",
        or_none(bounds.max_runtime_s, " s"),
        or_none(bounds.max_output, " B"),
        or_none(bounds.max_file_size, " B"),
        bounds.max_connections,
        bounds.handshake_timeout_ms
    );
    println!(
        "commands:   as {}:{} by default; {} (memory {}, pids {})",
        bounds.default_uid,
        bounds.default_gid,
        if bounds.cgroup {
            "in a cgroup of their own"
        } else {
            "bounded by rlimits only (no cgroup v2)"
        },
        or_none(bounds.memory_max, " B"),
        or_none(u64::from(bounds.pids_max), "")
    );
    ExitCode::SUCCESS
}

fn exec(client: &Client, args: ExecArgs) -> ExitCode {
    let mut command = Command::new(&args.argv[0]);
    command.args(&args.argv[1..]);
    if args.clean_env {
        command.env_clear();
    }
    let run = Run {
        program: args.argv[0].clone(),
        interactive: args.interactive,
        tty: args.tty,
        timeout: args.bounds.timeout,
        job_name: args.name.clone(),
        user: args.user.clone(),
        forward_signals: true,
        attached: args.name.is_some(),
    };
    let place = Place {
        env: &args.env,
        workdir: args.workdir.as_ref(),
        user: args.user.as_ref(),
    };
    configure(&mut command, &run, &place, &args.bounds);
    if args.detach {
        return jobs::detach(client, &command, &run.program, args.name.as_deref());
    }
    run.start(client, &command)
}

fn shell(client: &Client, args: ShellArgs) -> ExitCode {
    // An interactive shell is for a person at a terminal: fed from a pipe or /dev/null it may
    // never see the end of its input (a login shell can start reading after our ^D was typed,
    // and wait for ever), so, as `docker exec -it` does, say so instead.
    if !io::stdin().is_terminal() {
        eprintln!(
            "ferry: shell: stdin is not a terminal; to feed a shell from a pipe, use \
             `ferry exec -t -i -- sh`"
        );
        return ExitCode::from(EXIT_FERRY);
    }
    let mut command = Command::new(LOGIN_SHELL[0]);
    command.args(&LOGIN_SHELL[1..]);
    let run = Run {
        program: LOGIN_SHELL[0].into(),
        interactive: true,
        tty: true,
        timeout: args.bounds.timeout,
        job_name: None,
        user: None,
        forward_signals: true,
        attached: false,
    };
    let place = Place {
        env: &args.env,
        workdir: args.workdir.as_ref(),
        user: args.user.as_ref(),
    };
    configure(&mut command, &run, &place, &args.bounds);
    run.start(client, &command)
}

/// Where and as whom a command runs: what `exec` and `shell` both take.
struct Place<'a> {
    env: &'a [(OsString, OsString)],
    workdir: Option<&'a OsString>,
    user: Option<&'a OsString>,
}

/// Applies what `exec` and `shell` share: the terminal, the environment, the directory, the
/// user, stdin and the bounds.
fn configure(command: &mut Command, run: &Run, place: &Place<'_>, bounds: &BoundArgs) {
    let env = place.env;
    if run.tty {
        let size = local_terminal()
            .and_then(|fd| term::window_size(fd.as_fd()))
            .unwrap_or(term::DEFAULT_SIZE);
        command.pty(size);
        // Ours, unless the command line sets its own.
        if !env.iter().any(|(key, _)| key == "TERM") {
            command.env("TERM", term::term_name());
        }
    }
    for (key, value) in env {
        command.env(key, value);
    }
    if let Some(dir) = place.workdir {
        command.current_dir(dir);
    }
    if let Some(user) = place.user {
        command.user(user);
    }
    command.stdin(if run.interactive {
        Stdin::Pipe
    } else {
        Stdin::Null
    });
    if let Some(timeout) = bounds.timeout {
        command.timeout(timeout);
    }
    if let Some(grace) = bounds.kill_after {
        command.kill_after(grace);
    }
    command.kill_tree_on_exit(bounds.kill_tree_on_exit);
    if let Some(bytes) = bounds.max_output {
        command.max_output(bytes);
    }
}

/// The terminal the CLI measures and listens to for resizes: stdin's, else stdout's, else
/// stderr's (`echo ls | ferry exec -t sh` still has one). A descriptor of its own.
fn local_terminal() -> Option<OwnedFd> {
    let (stdin, stdout, stderr) = (io::stdin(), io::stdout(), io::stderr());
    let terminal = [stdin.as_fd(), stdout.as_fd(), stderr.as_fd()]
        .into_iter()
        .find(|fd| fd.is_terminal())?;
    terminal.try_clone_to_owned().ok()
}

/// One `ferry exec` (or `ferry shell`): what the run loop needs beyond the request.
struct Run {
    program: OsString,
    interactive: bool,
    tty: bool,
    timeout: Option<Duration>,
    /// `exec --name`: run it as this named job, attached.
    job_name: Option<String>,
    /// The user job operations act as (`-u`).
    user: Option<OsString>,
    /// Our signals go to the command (not for `ferry attach`: ^C detaches).
    forward_signals: bool,
    /// What is followed is a job (its spool, not the command's pipes).
    attached: bool,
}

/// Per stream: bytes received, and bytes received before the agent said it dropped some (the
/// head), once it did.
#[derive(Default)]
struct Received {
    bytes: u64,
    head: Option<u64>,
}

impl Run {
    fn start(&self, client: &Client, command: &Command) -> ExitCode {
        if let Some(name) = &self.job_name {
            return self.start_job(client, command, name);
        }
        match client.spawn(command) {
            Ok(execution) => self.follow(execution),
            Err(err) => start_failure(&self.program, &err),
        }
    }

    /// `exec --name`: the command as a named job, followed as an exec is (its stdin, our
    /// signals, its status); if ferry goes away, the job runs on.
    fn start_job(&self, client: &Client, command: &Command, name: &str) -> ExitCode {
        let started = match client.start_job(command, Some(name)) {
            Ok(started) => started,
            Err(err) => return start_failure(&self.program, &err),
        };
        let mut job = client.job(started.id.to_string());
        if let Some(user) = &self.user {
            job = job.user(user);
        }
        let options = AttachOptions {
            stdin: self.interactive,
            ..AttachOptions::default()
        };
        match job.attach(options) {
            Ok(attachment) => {
                if self.interactive && !attachment.header().stdin {
                    eprintln!(
                        "ferry: job {}: another attachment took its stdin first; following \
                         without it",
                        started.id
                    );
                }
                self.follow(attachment)
            }
            Err(err) => fail(&format_args!("job {}: {err}", started.id)),
        }
    }

    /// Streams what `running` does to our stdout and stderr, feeds it our stdin, forwards our
    /// signals (unless attached by `ferry attach`), and exits with its status.
    fn follow(&self, mut running: impl Follow) -> ExitCode {
        warn_if_insecure(running.agent());

        // Keys travel as bytes only when ours are read raw into the command's terminal.
        let stdin = io::stdin();
        let raw_terminal = self.tty && self.interactive && stdin.is_terminal();
        let keys = if raw_terminal {
            Keys::AsBytes
        } else {
            Keys::AsSignals
        };
        let controller = running.controller();
        let tty = self.tty;
        let resizes = if self.tty { local_terminal() } else { None };
        // Declared before the raw mode: dropped after it, so a signal during the restore is
        // still handled.
        let _forwarding = if self.forward_signals {
            match Forwarding::start(keys, resizes.as_ref().map(AsFd::as_fd), move |caught| {
                forward(&controller, tty, caught)
            }) {
                Ok(forwarding) => Some(forwarding),
                Err(err) => return fail(&format_args!("cannot handle signals: {err}")),
            }
        } else {
            None
        };
        let raw = if raw_terminal {
            match term::RawMode::enter(stdin.as_fd()) {
                Ok(raw) => Some(raw),
                Err(err) => {
                    return fail(&format_args!("cannot put the terminal in raw mode: {err}"))
                }
            }
        } else {
            None
        };

        if let Some(mut writer) = running.take_stdin() {
            // Detached: it may sit in read(0) after the command ended; exiting ends it. At the
            // end of our stdin it sends EOF, and the command runs on (a half-close).
            thread::spawn(move || {
                let mut stdin = io::stdin().lock();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match stdin.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if writer.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                        Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                        Err(err) => {
                            eprintln!("ferry: reading stdin: {err}");
                            break;
                        }
                    }
                }
                let _ = writer.close();
            });
        }

        // Unbuffered handles on our own fds 1 and 2: output goes out as it arrives, in order.
        let (mut stdout, mut stderr) = match (
            raw_handle(io::stdout().as_fd()),
            raw_handle(io::stderr().as_fd()),
        ) {
            (Ok(out), Ok(err)) => (out, err),
            (Err(err), _) | (_, Err(err)) => {
                drop(raw);
                return fail(&format_args!("cannot use stdout/stderr: {err}"));
            }
        };
        let mut received = [Received::default(), Received::default()];
        let end = loop {
            let (stream, len, written) = match running.next_step() {
                Ok(Some(Step::Output(Stream::Stdout, data))) => {
                    (Stream::Stdout, data.len(), stdout.write_all(data))
                }
                Ok(Some(Step::Output(Stream::Stderr, data))) => {
                    (Stream::Stderr, data.len(), stderr.write_all(data))
                }
                Ok(Some(Step::Lost {
                    stream,
                    offset,
                    bytes,
                })) => {
                    report_lost(stream, offset, bytes);
                    continue;
                }
                Ok(Some(Step::Exited(end))) => break Ok(Some(end)),
                Ok(Some(Step::StillRunning)) => break Ok(None),
                Ok(None) => break Err(Error::Disconnected("while the command was running")),
                Err(err) => break Err(err),
            };
            let account = &mut received[stream_index(stream)];
            if account.head.is_none() && running.capped(stream) > 0 {
                // The notice came just before this chunk: it is the tail's first.
                account.head = Some(account.bytes);
            }
            account.bytes += len as u64;
            if let Err(err) = written {
                drop(raw);
                if err.kind() == io::ErrorKind::BrokenPipe {
                    // Dropping an execution disconnects: the agent ends the command (a job
                    // runs on).
                    return ExitCode::from(EXIT_BROKEN_PIPE);
                }
                return fail(&format_args!("writing the command's output: {err}"));
            }
        };
        // Before anything is printed: our lines need a cooked terminal.
        drop(raw);
        match end {
            Ok(Some(end)) => self.report(&end, &received),
            // Attached without following, and the job runs on.
            Ok(None) => ExitCode::SUCCESS,
            Err(err) => fail(&err),
        }
    }

    /// Says on stderr what the record holds beyond the exit status, and picks our status.
    fn report(&self, end: &Termination, received: &[Received; 2]) -> ExitCode {
        for (stream, name, record) in [
            (Stream::Stdout, "stdout", &end.stdout),
            (Stream::Stderr, "stderr", &end.stderr),
        ] {
            if record.dropped == 0 {
                continue;
            }
            let account = &received[stream_index(stream)];
            match account.head {
                Some(head) => eprintln!(
                    "ferry: {name}: {} bytes dropped, kept the first {head} and the last {}",
                    record.dropped,
                    account.bytes - head
                ),
                None if self.attached => eprintln!(
                    "ferry: {name}: {} bytes dropped by the agent (the job's output cap or its \
                     drain limit)",
                    record.dropped
                ),
                None => eprintln!(
                    "ferry: {name}: {} bytes dropped (written after the command ended, past \
                     the agent's drain limit)",
                    record.dropped
                ),
            }
        }
        report_end(end, self.timeout)
    }
}

/// Says on stderr what a termination record holds beyond the exit status and the dropped
/// output, and picks our status: exec's rules (also `ferry wait`'s).
fn report_end(end: &Termination, timeout: Option<Duration>) -> ExitCode {
    if end.output_dropped && end.stdout.dropped == 0 && end.stderr.dropped == 0 {
        eprintln!("ferry: warning: the agent dropped some of the command's output");
    }
    if end.pipes_held {
        eprintln!(
            "ferry: warning: processes the command started were still running with its \
             output open; what they write from now on is lost"
        );
    }
    if end.oom_killed {
        eprintln!("ferry: the out-of-memory killer killed a process of the command");
    }
    if let ExitStatus::Signal {
        core_dumped: true, ..
    } = end.status
    {
        eprintln!("ferry: the remote command dumped core");
    }
    let tree = match end.tree_kill {
        TreeKill::None => "",
        TreeKill::Cgroup => " (its whole tree was killed)",
        TreeKill::ProcessGroup => " (its process group was killed)",
    };
    match end.ending {
        Ending::Exited | Ending::Cancelled => {}
        Ending::TimedOut => {
            let after = timeout
                .map(|timeout| format!(" after {timeout:?}"))
                .unwrap_or_default();
            eprintln!("ferry: the command timed out{after}{tree}");
            return ExitCode::from(EXIT_TIMED_OUT);
        }
        Ending::RuntimeLimit => {
            eprintln!("ferry: the agent's maximum runtime ended the command{tree}");
        }
        Ending::OutputLimit => {
            eprintln!("ferry: the agent's maximum output ended the command{tree}");
        }
    }
    ExitCode::from(end.status.shell_code())
}

/// Says on stderr that the job's spool no longer had some of a stream's bytes.
fn report_lost(stream: Stream, offset: u64, bytes: u64) {
    let name = match stream {
        Stream::Stdout => "stdout",
        Stream::Stderr => "stderr",
    };
    eprintln!(
        "ferry: {name}: {bytes} bytes lost at offsets {offset}..{} (the job's spool no longer \
         held them)",
        offset.saturating_add(bytes)
    );
}

/// What the run loop follows: an exec's events, or an attached job's.
trait Follow {
    fn agent(&self) -> &AgentInfo;
    fn controller(&self) -> Controller;
    fn take_stdin(&mut self) -> Option<StdinWriter>;
    fn next_step(&mut self) -> Result<Option<Step<'_>>, Error>;
    /// Bytes of `stream` dropped under the request's output cap so far (see
    /// [`ferry_host::Execution::dropped`]).
    fn capped(&self, stream: Stream) -> u64;
}

/// One thing a followed command did.
enum Step<'a> {
    Output(Stream, &'a [u8]),
    Lost {
        stream: Stream,
        offset: u64,
        bytes: u64,
    },
    Exited(Termination),
    /// An attachment without follow ended, and the job runs on.
    StillRunning,
}

impl Follow for Execution {
    fn agent(&self) -> &AgentInfo {
        Execution::agent(self)
    }
    fn controller(&self) -> Controller {
        Execution::controller(self)
    }
    fn take_stdin(&mut self) -> Option<StdinWriter> {
        Execution::take_stdin(self)
    }
    fn next_step(&mut self) -> Result<Option<Step<'_>>, Error> {
        Ok(self.next_event()?.map(|event| match event {
            Event::Stdout(data) => Step::Output(Stream::Stdout, data),
            Event::Stderr(data) => Step::Output(Stream::Stderr, data),
            Event::Exited(end) => Step::Exited(end),
        }))
    }
    fn capped(&self, stream: Stream) -> u64 {
        self.dropped(stream)
    }
}

impl Follow for Attachment {
    fn agent(&self) -> &AgentInfo {
        Attachment::agent(self)
    }
    fn controller(&self) -> Controller {
        Attachment::controller(self)
    }
    fn take_stdin(&mut self) -> Option<StdinWriter> {
        Attachment::take_stdin(self)
    }
    fn next_step(&mut self) -> Result<Option<Step<'_>>, Error> {
        Ok(self.next_event()?.map(|event| match event {
            AttachEvent::Stdout { data, .. } => Step::Output(Stream::Stdout, data),
            AttachEvent::Stderr { data, .. } => Step::Output(Stream::Stderr, data),
            AttachEvent::Lost {
                stream,
                offset,
                bytes,
            } => Step::Lost {
                stream,
                offset,
                bytes,
            },
            AttachEvent::Exited(end) => Step::Exited(end),
            AttachEvent::StillRunning => Step::StillRunning,
        }))
    }
    fn capped(&self, _stream: Stream) -> u64 {
        // The spool keeps what the runner received: an output cap's drops show only in the
        // record.
        0
    }
}

/// What the CLI does with a signal it caught while the command runs (`tty`: it has a terminal).
fn forward(controller: &Controller, tty: bool, caught: Caught) {
    // Errors are the reader's to report (a broken connection), or moot (the command ended).
    let _ = match caught {
        // A command on a terminal is often an interactive shell, which ignores SIGTERM: ending
        // the CLI ends the command's tree instead (SIGTERM, then SIGKILL after the grace).
        Caught::Signal(signal) if signal == libc::SIGTERM && tty => controller.cancel(None),
        Caught::Signal(signal) => controller.signal(signal),
        Caught::Resize(size) => controller.resize(size),
    };
}

fn stream_index(stream: Stream) -> usize {
    match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

fn raw_handle(fd: BorrowedFd<'_>) -> io::Result<File> {
    Ok(File::from(fd.try_clone_to_owned()?))
}

/// Reports why the program did not start, with the shells' exit codes.
fn start_failure(program: &OsString, err: &Error) -> ExitCode {
    let name = String::from_utf8_lossy(program.as_bytes());
    let Error::Remote(remote) = err else {
        return fail(err);
    };
    let code = match remote.code {
        ErrorCode::NotFound => EXIT_NOT_FOUND,
        ErrorCode::PermissionDenied
        | ErrorCode::ExecFormat
        | ErrorCode::BadCwd
        | ErrorCode::SpawnFailed
        | ErrorCode::ArgumentsTooLong
        | ErrorCode::ResourceExhausted => EXIT_CANNOT_EXECUTE,
        _ => return fail(err),
    };
    let errno = remote
        .errno
        .map(|errno| format!(" ({})", errno_name(errno)))
        .unwrap_or_default();
    let message = if remote.message.is_empty() || remote.message == remote.code.as_str() {
        String::new()
    } else {
        format!(": {}", remote.message)
    };
    eprintln!("ferry: {name}: {}{message}{errno}", remote.code);
    ExitCode::from(code)
}
