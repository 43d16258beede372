//! `ferry`: run commands in a microVM through its ferry agent.
//!
//! Exit status: the remote command's code; 128+N when it died of signal N; 127 when the program
//! was not found; 126 when it could not be executed; 255 for ferry's own errors.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

mod signals;
mod term;
mod units;

use clap::{Parser, Subcommand};
use ferry_host::{
    errno_name, read_secret_file, AgentInfo, Client, Command, ConnectOptions, Error, ErrorCode,
    ExitStatus, PumpError, Security, Stdin, Target,
};

/// Exit status for ferry's own failures (transport, protocol, usage), as ssh does.
const EXIT_FERRY: u8 = 255;
const EXIT_NOT_FOUND: u8 = 127;
const EXIT_CANNOT_EXECUTE: u8 = 126;
/// Our own stdout was closed under us: the shell's status for death by SIGPIPE.
const EXIT_BROKEN_PIPE: u8 = 128 + 13;

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
    Exec(ExecArgs),
    /// Check that the agent answers and proves the secret; print its version, protocol, security
    /// mode and limits
    Health,
    /// End every command the agent runs (everything in its commands' cgroup), whoever started
    /// them: the way back from a fork bomb or a runaway daemon
    KillAll,
}

#[derive(clap::Args)]
struct ExecArgs {
    /// Forward this process's stdin to the command (default: /dev/null)
    #[arg(short = 'i', long = "stdin")]
    interactive: bool,

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

    /// The program and its arguments (a bare name is looked up in the guest's PATH)
    // NOTE: no `allow_hyphen_values`: an unknown option before the program is a usage error
    // that names it (`ferry exec -t -- tty` must not run a program called `-t`). Everything after
    // the program, or after `--`, is the command's own.
    #[arg(required = true, trailing_var_arg = true, value_name = "PROG")]
    argv: Vec<OsString>,
}

fn parse_env(text: &str) -> Result<(OsString, OsString), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.into(), value.into())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

fn main() -> ExitCode {
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
        Cmd::Health => health(&client),
        Cmd::KillAll => kill_all(&client),
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
    for (key, value) in &args.env {
        command.env(key, value);
    }
    if let Some(dir) = &args.workdir {
        command.current_dir(dir);
    }
    if let Some(user) = &args.user {
        command.user(user);
    }
    command.stdin(if args.interactive {
        Stdin::Pipe
    } else {
        Stdin::Null
    });

    let mut execution = match client.spawn(&command) {
        Ok(execution) => execution,
        Err(err) => return start_failure(&args.argv[0], &err),
    };
    warn_if_insecure(execution.agent());
    if let Some(mut writer) = execution.take_stdin() {
        // Detached: it may sit in read(0) after the command ended; exiting ends it.
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
            return fail(&format_args!("cannot use stdout/stderr: {err}"))
        }
    };
    let end = execution
        .pump(|is_stderr, data| if is_stderr { &mut stderr } else { &mut stdout }.write_all(data));
    match end {
        Ok(end) => {
            if end.output_dropped {
                eprintln!("ferry: warning: the agent dropped some of the command's output (processes it left behind kept writing)");
            }
            if let ExitStatus::Signal {
                core_dumped: true, ..
            } = end.status
            {
                eprintln!("ferry: the remote command dumped core");
            }
            ExitCode::from(end.status.shell_code())
        }
        Err(PumpError::Sink(err)) if err.kind() == io::ErrorKind::BrokenPipe => {
            ExitCode::from(EXIT_BROKEN_PIPE)
        }
        Err(err) => fail(&err),
    }
}

fn raw_handle(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<File> {
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
