//! `ferry-agent`: the guest side of ferry, as PID 1 or as a service, serving exec over
//! virtio-vsock (or a Unix socket for tests).
//!
//! Panic contract: the build is `panic = "abort"`, and a panic in PID 1 would be a kernel panic.
//! The request path therefore has no `unwrap`, no unchecked indexing that input can reach, and
//! runs in a per-connection process, so a crash there ends one connection, never the listener.
//! If the listener itself ever panics as PID 1, the panic handler re-executes the agent.
#![cfg_attr(not(test), no_std)]
#![cfg_attr(not(test), no_main)]
#![deny(unsafe_code)]
// Unit tests build this crate with std and without the entry point that uses everything.
#![cfg_attr(test, allow(dead_code, unused_imports))]

mod clock;
mod conn;
mod init;
mod listen;
mod log;
mod spawn;
mod sys;

use core::sync::atomic::{AtomicI32, Ordering};

use rustix::process::{Pid, Signal};

/// The agent's version, announced in every hello.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The port `--listen` defaults to, in vsock's namespace.
pub const DEFAULT_VSOCK_PORT: u32 = 1024;

/// The process group of the command this process is running, so a crash kills it too.
static CURRENT_COMMAND: AtomicI32 = AtomicI32::new(0);

/// Records (or clears) the command whose group a crash of this process must kill.
pub fn set_current_command(pid: Option<Pid>) {
    let raw = pid.map_or(0, |p| p.as_raw_nonzero().get());
    CURRENT_COMMAND.store(raw, Ordering::Relaxed);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    if let Some(pid) = Pid::from_raw(CURRENT_COMMAND.load(Ordering::Relaxed)) {
        let _ = rustix::process::kill_process_group(pid, Signal::KILL);
    }
    log::Line::new().push(b"panic").emit();
    if rustix::process::getpid().is_init() {
        // PID 1 must not die: start over as a fresh agent (mounts and modules are kept).
        init::reexec_self();
    }
    sys::exit(101)
}

/// What the command line asked for.
struct Options {
    listen: listen::ListenAddr,
    ready_port: Option<u32>,
}

const USAGE: &[u8] =
    b"usage: ferry-agent [--listen vsock:PORT | --listen unix:PATH] [--ready-port PORT]\n\
  defaults: --listen vsock:1024; as PID 1 also reads ferry.listen=, ferry.ready= and\n\
  ferry.modules= from the kernel command line\n";

fn parse_args(is_init: bool, options: &mut Options) -> Result<(), &'static [u8]> {
    let mut i = 1;
    while let Some(arg) = sys::arg(i) {
        let arg = arg.to_bytes();
        i += 1;
        match arg {
            b"--listen" | b"--ready-port" => {
                let value = sys::arg(i).ok_or(b"missing value".as_slice())?.to_bytes();
                i += 1;
                if arg == b"--listen" {
                    options.listen =
                        listen::ListenAddr::parse(value).ok_or(b"bad --listen".as_slice())?;
                } else {
                    options.ready_port =
                        Some(init::parse_u32(value).ok_or(b"bad --ready-port".as_slice())?);
                }
            }
            b"--version" => {
                let _ = rustix::io::write(crate::sys::stdout(), AGENT_VERSION.as_bytes());
                let _ = rustix::io::write(crate::sys::stdout(), b"\n");
                sys::exit(0)
            }
            b"--help" | b"-h" => {
                let _ = rustix::io::write(crate::sys::stdout(), USAGE);
                sys::exit(0)
            }
            // The kernel hands init whatever it did not recognise: ignore it as PID 1.
            _ if is_init => {}
            _ => return Err(b"unknown argument"),
        }
    }
    Ok(())
}

/// The agent proper, called from the C runtime's `main` with argv/envp recorded.
pub fn run() -> ! {
    let init_started_us = clock::boottime_us();
    let is_init = rustix::process::getpid().is_init();
    init::ensure_std_fds();
    let mut options = Options {
        listen: listen::ListenAddr::Vsock(DEFAULT_VSOCK_PORT),
        ready_port: None,
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
    if let Err(message) = parse_args(is_init, &mut options) {
        log::Line::new().push(message).emit();
        let _ = rustix::io::write(crate::sys::stderr(), USAGE);
        sys::exit(2)
    }
    let listener = loop {
        match listen::bind(&options.listen) {
            Ok(listener) => break listener,
            Err(errno) if is_init => {
                // PID 1 keeps trying: the vsock transport may still be coming up.
                log::error(b"cannot listen", errno);
                clock::sleep_ms(500);
            }
            Err(errno) => {
                log::error(b"cannot listen", errno);
                sys::exit(1)
            }
        }
    };
    if let Some(port) = options.ready_port {
        init::announce_ready(port, &options.listen, init_started_us, modules_us);
    }
    listen::serve_forever(listener, is_init)
}
