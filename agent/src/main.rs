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
//! syscall wrapper), and the small helpers `clock`, `cstr` and `log`.
#![cfg_attr(not(test), no_std)]
#![cfg_attr(not(test), no_main)]
#![deny(unsafe_code)]
// Unit tests build this crate with std and without the entry point that uses everything.
#![cfg_attr(test, allow(dead_code, unused_imports))]

mod auth;
mod clock;
mod config;
mod conn;
mod crash;
mod cstr;
mod init;
mod listen;
mod log;
mod spawn;
mod successor;
mod sys;

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

/// What the command line asked for.
struct Options {
    listen: ListenAddr,
    ready_port: Option<u32>,
    // TODO(merge): from the policy.
    secret_file: Option<&'static [u8]>,
    insecure: bool,
}

const USAGE: &[u8] =
    b"usage: ferry-agent [--listen vsock:PORT | --listen unix:PATH] [--ready-port PORT]\n\
  defaults: --listen vsock:1024; as PID 1 also reads ferry.listen=, ferry.ready= and\n\
  ferry.modules= from the kernel command line\n";

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

/// Applies the arguments after the program's name to `options`.
fn parse_args(
    args: impl IntoIterator<Item = &'static [u8]>,
    is_init: bool,
    options: &mut Options,
) -> Result<Request, &'static [u8]> {
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg {
            b"--listen" => {
                let value = args.next().ok_or(b"missing value".as_slice())?;
                options.listen = ListenAddr::parse(value).ok_or(b"bad --listen".as_slice())?;
            }
            b"--ready-port" => {
                let value = args.next().ok_or(b"missing value".as_slice())?;
                let port = config::parse_u32(value).ok_or(b"bad --ready-port".as_slice())?;
                options.ready_port = Some(port);
            }
            b"--secret-file" => {
                options.secret_file = Some(args.next().ok_or(b"missing value".as_slice())?);
            }
            b"--insecure" => options.insecure = true,
            b"--version" => return Ok(Request::Version),
            b"--help" | b"-h" => return Ok(Request::Help),
            // The kernel hands init whatever it did not recognise: ignore it as PID 1.
            _ if is_init => {}
            _ => return Err(b"unknown argument"),
        }
    }
    Ok(Request::Serve)
}

/// The agent proper, called from the C runtime's `main` with argv/envp recorded.
pub fn run() -> ! {
    let init_started_us = clock::boottime_us();
    let is_init = rustix::process::getpid().is_init();
    init::ensure_std_fds();
    let mut options = Options {
        listen: ListenAddr::Vsock(DEFAULT_VSOCK_PORT),
        ready_port: None,
        secret_file: None,
        insecure: false,
    };
    let mut modules_us = 0;
    if is_init {
        init::mount_filesystems();
        init::link_standard_devices();
        let boot = init::read_kernel_cmdline();
        modules_us = boot.modules_us;
        if let Some(listen) = boot.listen {
            options.listen = listen;
        }
        options.ready_port = boot.ready_port;
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
            sys::exit(2)
        }
    }
    let mut path = [0u8; 256];
    let secret = match options.secret_file {
        Some(file) => match cstr::join(&mut path, &[file]) {
            Some(path) => match auth::load_secret(path) {
                Ok(secret) => Some(secret),
                Err(err) => {
                    log::Line::new().push(err.as_bytes()).emit();
                    sys::exit(2)
                }
            },
            None => sys::exit(2),
        },
        None if options.insecure => {
            log::Line::new()
                .push(b"running without authentication (--insecure)")
                .emit();
            None
        }
        None => {
            log::Line::new()
                .push(b"no secret: give --secret-file PATH, or --insecure")
                .emit();
            sys::exit(2)
        }
    };
    let serving = auth::Serving {
        config: ferry_wire::session::AgentConfig {
            agent_version: AGENT_VERSION,
            ..ferry_wire::session::AgentConfig::DEFAULT
        },
        secret,
    };
    let listener = loop {
        match listen::bind(&options.listen) {
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
        init::announce_ready(port, &options.listen, init_started_us, modules_us, &serving);
    }
    listen::serve_forever(listener, is_init, &serving)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str], is_init: bool) -> Result<(Request, Options), &'static [u8]> {
        let mut options = Options {
            listen: ListenAddr::Vsock(DEFAULT_VSOCK_PORT),
            ready_port: None,
        };
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
}
