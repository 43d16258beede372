//! `ferry-agent`: the guest side of ferry, as PID 1 or as a service, serving exec over
//! virtio-vsock (or a Unix socket for tests).
//!
//! Panic contract: the build is `panic = "abort"`, and a panic in PID 1 would be a kernel panic.
//! So nothing reachable may panic: no `unwrap`, no slicing or indexing that can fall outside its
//! slice, no arithmetic that can overflow, on anything from the environment, argv, the kernel
//! command line or the wire (`get`, `strip_prefix`, `checked_*` and `saturating_*` instead;
//! frames are parsed by `ferry_wire`, which is total on any bytes). As a second line, the
//! request path runs in a per-connection process, so a crash there ends one connection, never
//! the listener; and if the listener itself ever panics as PID 1, the panic handler
//! re-executes the agent.
//!
//! The parts: `init` (PID 1's duties), `config` (arguments and the kernel command line),
//! `listen` (bind, spares, accept), `successor` (a spare's promise to the listener), `conn`
//! (one connection: a driver over `ferry_wire`'s agent session), `spawn` (argv/envp and the
//! child's path to `execve`), `crash` (what a crash takes down), `sys` (every `unsafe`
//! syscall wrapper), and the small helpers `clock`, `cstr`, `file` and `log`.
#![cfg_attr(not(test), no_std)]
#![cfg_attr(not(test), no_main)]
#![deny(unsafe_code)]
// Unit tests build this crate with std and without the entry point that uses everything.
#![cfg_attr(test, allow(dead_code, unused_imports))]

mod auth;
mod bounds;
mod cgroup;
mod clock;
mod config;
mod conn;
mod crash;
mod cstr;
mod file;
mod init;
mod jobs;
mod listen;
mod log;
mod policy;
mod power;
mod pty;
mod sha;
mod spawn;
mod successor;
mod sys;
// Not wired to the connection yet (`ferry cp -r`): dead code in the agent until then.
mod tar;
mod users;

use config::ListenAddr;

/// The agent's version, announced in every hello.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The port `--listen` defaults to, in vsock's namespace.
pub const DEFAULT_VSOCK_PORT: u32 = 1024;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    crash::kill_current_command();
    log::Line::new().push(b"panic").emit();
    if rustix::process::getpid().is_init() {
        // PID 1 must not die: start over as a fresh agent (mounts and modules are kept).
        init::reexec_self();
    }
    sys::exit(101)
}

/// The most policy settings the flags may carry.
const MAX_POLICY_FLAGS: usize = 32;

/// What the command line asked for.
struct Options<'a> {
    listen: ListenAddr,
    ready_port: Option<u32>,
    /// `--policy PATH`: the policy file (default `/etc/ferry/policy`, which may be missing).
    policy_file: Option<&'a [u8]>,
    /// Policy settings from flags, (key, value) in order: applied over the file and the kernel
    /// command line.
    policy_flags: heapless::Vec<(&'a [u8], &'a [u8]), MAX_POLICY_FLAGS>,
}

impl Options<'_> {
    fn new() -> Self {
        Options {
            listen: ListenAddr::Vsock(DEFAULT_VSOCK_PORT),
            ready_port: None,
            policy_file: None,
            policy_flags: heapless::Vec::new(),
        }
    }
}

const USAGE: &[u8] =
    b"usage: ferry-agent [--listen vsock:PORT | --listen unix:PATH] [--ready-port PORT]\n\
  [--policy PATH] [--secret-file PATH] [--insecure] [--allow-cid CID[,CID]]\n\
  [--socket-mode MODE] [--socket-group GID] [--user USER[:GROUP]] [--allow-users LIST]\n\
  [--run-as-agent-user] [--set KEY=VALUE]...\n\
  defaults: --listen vsock:1024, --policy /etc/ferry/policy (if present); as PID 1 also\n\
  reads ferry.listen=, ferry.ready=, ferry.modules=, ferry.hostname= and ferry.KEY=VALUE for any policy key\n\
  from the kernel command line. Policy: file < kernel command line < flags (docs/policy.md)\n";

/// What an argument asked for beyond [`Options`].
#[derive(Debug, PartialEq, Eq)]
enum Request {
    /// Serve, with these options.
    Serve,
    /// Print the version and exit.
    Version,
    /// Print the usage and exit.
    Help,
}

/// What a command-line flag does.
#[derive(Clone, Copy)]
enum Flag {
    /// Sets this policy key to the next argument (checked with the policy's values).
    Key(&'static [u8]),
    /// Sets this policy key to `true`.
    True(&'static [u8]),
    /// `--set KEY=VALUE`.
    Set,
    Policy,
    Listen,
    ReadyPort,
    Version,
    Help,
}

/// Every flag, looked up in a table: a `match` on the strings compiles to byte-by-byte
/// comparisons, several times the code.
const FLAGS: [(&[u8], Flag); 15] = [
    (b"--secret-file", Flag::Key(b"secret_file")),
    (b"--allow-cid", Flag::Key(b"allow_cid")),
    (b"--socket-mode", Flag::Key(b"socket_mode")),
    (b"--socket-group", Flag::Key(b"socket_group")),
    (b"--user", Flag::Key(b"user")),
    (b"--allow-users", Flag::Key(b"allow_users")),
    (b"--insecure", Flag::True(b"insecure")),
    (b"--run-as-agent-user", Flag::True(b"run_as_agent_user")),
    (b"--set", Flag::Set),
    (b"--policy", Flag::Policy),
    (b"--listen", Flag::Listen),
    (b"--ready-port", Flag::ReadyPort),
    (b"--version", Flag::Version),
    (b"--help", Flag::Help),
    (b"-h", Flag::Help),
];

/// Applies the arguments after the program's name to `options`.
fn parse_args<'a>(
    args: impl IntoIterator<Item = &'a [u8]>,
    is_init: bool,
    options: &mut Options<'a>,
) -> Result<Request, &'static [u8]> {
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let Some((_, flag)) = FLAGS.iter().find(|(name, _)| *name == arg) else {
            // The kernel hands init whatever it did not recognise: ignore it as PID 1.
            if is_init {
                continue;
            }
            return Err(b"unknown argument");
        };
        let setting = match *flag {
            Flag::Key(key) => (key, args.next().ok_or(b"missing value".as_slice())?),
            Flag::True(key) => (key, b"true".as_slice()),
            Flag::Set => {
                let value = args.next().ok_or(b"missing value".as_slice())?;
                policy::split_setting(value).ok_or(b"--set wants KEY=VALUE".as_slice())?
            }
            Flag::Policy => {
                options.policy_file = Some(args.next().ok_or(b"missing value".as_slice())?);
                continue;
            }
            Flag::Listen => {
                let value = args.next().ok_or(b"missing value".as_slice())?;
                options.listen = ListenAddr::parse(value).ok_or(b"bad --listen".as_slice())?;
                continue;
            }
            Flag::ReadyPort => {
                let value = args.next().ok_or(b"missing value".as_slice())?;
                let port = config::parse_u32(value).ok_or(b"bad --ready-port".as_slice())?;
                options.ready_port = Some(port);
                continue;
            }
            Flag::Version => return Ok(Request::Version),
            Flag::Help => return Ok(Request::Help),
        };
        options
            .policy_flags
            .push(setting)
            .map_err(|_| b"too many policy flags".as_slice())?;
    }
    Ok(Request::Serve)
}

/// The agent proper, called from the C runtime's `main` with argv/envp recorded.
pub fn run() -> ! {
    let init_started_us = clock::boottime_us();
    let is_init = rustix::process::getpid().is_init();
    init::ensure_std_fds();
    // Before the agent ignores any signal itself.
    sys::note_inherited_ignored_signals();
    let mut options = Options::new();
    let mut boot = None;
    if is_init {
        init::mount_filesystems();
        init::link_standard_devices();
        let config = init::read_kernel_cmdline();
        if let Some(listen) = config.listen {
            options.listen = listen;
        }
        options.ready_port = config.ready_port;
        boot = Some(config);
    }
    // After the mounts: the descriptors are listed in /proc.
    sys::seal_inherited_fds();
    let args = sys::args().map(|arg| arg.to_bytes());
    match parse_args(args, is_init, &mut options) {
        Ok(Request::Serve) => {}
        Ok(Request::Version) => {
            let _ = rustix::io::write(sys::stdout(), AGENT_VERSION.as_bytes());
            let _ = rustix::io::write(sys::stdout(), b"\n");
            sys::exit(0)
        }
        Ok(Request::Help) => {
            let _ = rustix::io::write(sys::stdout(), USAGE);
            sys::exit(0)
        }
        Err(message) => {
            log::Line::new().push(message).emit();
            let _ = rustix::io::write(sys::stderr(), USAGE);
            refuse_to_start(is_init)
        }
    }
    let Some(policy) = policy::load(options.policy_file, is_init, &options.policy_flags) else {
        refuse_to_start(is_init)
    };
    // Set once, before anything is forked: every connection process reads it through
    // `policy::current()`.
    policy::install(policy);
    // Also before anything is forked: the agent's processes inherit its OOM protection and
    // its place outside the commands' cgroup (`cgroup::bounds()` says which bounds are in use).
    bounds::configure(policy::current(), is_init);
    let policy = policy::current();
    let Some(serving) = serving(policy, is_init) else {
        refuse_to_start(is_init)
    };
    let listener = loop {
        match listen::bind(&options.listen, policy::current()) {
            Ok(listener) => break listener,
            Err(errno) if is_init => {
                // PID 1 keeps trying: the vsock transport may still be coming up.
                log::error(b"cannot listen", errno);
                clock::sleep_ms(500);
            }
            Err(errno) => {
                let what: &[u8] = if errno == rustix::io::Errno::ADDRINUSE {
                    // For a Unix socket: another agent listens on that path.
                    b"cannot listen: the address is in use"
                } else {
                    b"cannot listen"
                };
                log::error(what, errno);
                sys::exit(1)
            }
        }
    };
    if let Some(port) = options.ready_port {
        let boot = boot.unwrap_or_else(init::BootConfig::empty);
        init::announce_ready(port, &options.listen, init_started_us, &boot, &serving);
    }
    listen::serve_forever(listener, is_init, policy::current(), &serving)
}

/// What every connection is served with: the secret (or `--insecure`, logged), and the
/// protocol configuration the hello announces, from the policy. `None` (logged) when the
/// secret cannot be used.
fn serving(policy: &policy::Policy, is_init: bool) -> Option<auth::Serving> {
    if let Err(err) = policy.check_auth() {
        log::Line::new()
            .push(b"policy: ")
            .push(err.as_str().as_bytes())
            .push(b": give --secret-file PATH (ferry.secret_file= as PID 1), or --insecure")
            .emit();
        return None;
    }
    let secret = match &policy.secret_file {
        Some(file) => {
            let mut path = [0u8; policy::MAX_POLICY_PATH + 1];
            let Some(path) = cstr::join(&mut path, &[file]) else {
                log::Line::new().push(b"secret file: bad path").emit();
                return None;
            };
            match auth::load_secret(path) {
                Ok(secret) => Some(secret),
                Err(err) => {
                    let mut line = log::Line::new();
                    line.push(err.as_bytes()).push(b": ").push(path.to_bytes());
                    if let auth::SecretFileError::Unreadable(errno) = err {
                        line.push(b" (errno ")
                            .num(u64::from(errno.raw_os_error().unsigned_abs()))
                            .push(b")");
                    }
                    line.emit();
                    return None;
                }
            }
        }
        None => {
            log::Line::new()
                .push(b"running WITHOUT authentication (--insecure): anyone who reaches the agent may run commands")
                .emit();
            None
        }
    };
    let is_root = rustix::process::geteuid().is_root();
    let default_user = users::authorize(policy, None, is_root).ok();
    let handshake_ms = u64::from(policy.handshake_timeout_ms);
    let config = ferry_wire::session::AgentConfig {
        agent_version: AGENT_VERSION,
        handshake_timeout: handshake_ms.saturating_mul(1000),
        limits: ferry_wire::Limits {
            idle_ms: policy.idle_timeout_ms,
            ..ferry_wire::Limits::CURRENT
        },
        bounds: ferry_wire::Bounds {
            max_runtime_s: policy.max_runtime_s,
            max_output: policy.max_output,
            max_file_size: policy.max_file_size,
            max_connections: policy.max_connections,
            handshake_timeout_ms: policy.handshake_timeout_ms,
            // What the commands' cgroup got; without one, the policy's (0: none).
            memory_max: cgroup::memory_max().unwrap_or(policy.memory_max),
            pids_max: policy.pids_max,
            cgroup: cgroup::bounds() == cgroup::Bounds::Cgroup,
            default_uid: default_user.as_ref().map_or(u32::MAX, |user| user.uid),
            default_gid: default_user.as_ref().map_or(u32::MAX, |user| user.gid),
        },
        ..ferry_wire::session::AgentConfig::DEFAULT
    };
    let _ = is_init;
    Some(auth::Serving { config, secret })
}

/// Ends an agent whose arguments or policy are wrong (the reason is logged): exit status 2.
/// PID 1 must not exit (the kernel would panic and the VM would vanish without a trace), and
/// retrying cannot help (the image and the kernel command line do not change while it runs),
/// so it serves nothing and keeps the VM up, repeating the reason's gist on the console every
/// minute.
fn refuse_to_start(is_init: bool) -> ! {
    if !is_init {
        sys::exit(2)
    }
    loop {
        clock::sleep_ms(60_000);
        log::Line::new()
            .push(b"not serving: bad arguments or policy (see above); fix them and reboot")
            .emit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(
        args: &[&'static str],
        is_init: bool,
    ) -> Result<(Request, Options<'static>), &'static [u8]> {
        let mut options = Options::new();
        let request = parse_args(args.iter().map(|a| a.as_bytes()), is_init, &mut options)?;
        Ok((request, options))
    }

    #[test]
    fn arguments() {
        let (request, options) =
            parse(&["--listen", "vsock:5", "--ready-port", "9"], false).unwrap();
        assert_eq!(request, Request::Serve);
        assert_eq!(options.listen, ListenAddr::Vsock(5));
        assert_eq!(options.ready_port, Some(9));
        assert_eq!(parse(&["--version"], false).unwrap().0, Request::Version);
        assert_eq!(parse(&["-h"], false).unwrap().0, Request::Help);
        assert!(parse(&["--listen"], false).is_err(), "a missing value");
        assert!(parse(&["--ready-port"], false).is_err());
        assert!(parse(&["--ready-port", "99999999999"], false).is_err());
        assert!(parse(&["--listen", "tcp:1"], false).is_err());
        assert!(parse(&["--bogus"], false).is_err());
        // As PID 1, the kernel's leftovers are ignored.
        let (request, options) = parse(&["splash", "--listen", "vsock:6"], true).unwrap();
        assert_eq!(request, Request::Serve);
        assert_eq!(options.listen, ListenAddr::Vsock(6));
    }

    #[test]
    fn policy_flags() {
        let args = [
            "--policy",
            "/p",
            "--secret-file",
            "/s",
            "--insecure",
            "--allow-cid",
            "3,4",
            "--socket-mode",
            "0660",
            "--socket-group",
            "5",
            "--user",
            "app",
            "--allow-users",
            "root",
            "--run-as-agent-user",
            "--set",
            "max_runtime=1m",
        ];
        let (_, options) = parse(&args, false).unwrap();
        assert_eq!(options.policy_file, Some(b"/p".as_slice()));
        let flags: Vec<(&str, &str)> = options
            .policy_flags
            .iter()
            .map(|(k, v)| {
                (
                    core::str::from_utf8(k).unwrap(),
                    core::str::from_utf8(v).unwrap(),
                )
            })
            .collect();
        assert_eq!(
            flags,
            [
                ("secret_file", "/s"),
                ("insecure", "true"),
                ("allow_cid", "3,4"),
                ("socket_mode", "0660"),
                ("socket_group", "5"),
                ("user", "app"),
                ("allow_users", "root"),
                ("run_as_agent_user", "true"),
                ("max_runtime", "1m"),
            ]
        );
        // Values are checked when the policy is loaded; the shape here.
        assert!(parse(&["--set", "novalue"], false).is_err());
        assert!(parse(&["--user"], false).is_err());
        assert!(parse(&["--policy"], false).is_err());
        let many = vec!["--insecure"; MAX_POLICY_FLAGS + 1];
        assert!(parse(&many, false).is_err());
        // Flags win over the file (and the kernel command line).
        let flags: [(&[u8], &[u8]); 1] = [(b"user", b"flag")];
        let policy = policy::load(Some(b"/nonexistent/policy"), false, &flags);
        assert!(policy.is_none(), "a missing --policy file is an error");
        let policy = policy::load(None, false, &flags).unwrap();
        assert_eq!(policy.user.as_slice(), b"flag");
    }
}
