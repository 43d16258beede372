//! The `ferry` CLI as a program: found or built once per test binary, pointed at the fixture's
//! agent, and run either with pipes or on a terminal of the test's own (a pseudo-terminal
//! pair), for the scenarios whose contract is the CLI's: exit codes, signals, the terminal.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use super::Fixture;

/// The environment variable that names a prebuilt CLI (`cargo xtask e2e` sets it).
pub const BINARY_VAR: &str = "FERRY_CLI_BIN";

/// The CLI: `FERRY_CLI_BIN`, the one cargo built for this test (in `ferry-host`'s own tests), or
/// built here once per test binary into a target dir of its own (the outer `cargo test` holds
/// the workspace's lock).
pub fn binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        if let Some(path) = std::env::var_os(BINARY_VAR) {
            return PathBuf::from(path);
        }
        if let Some(path) = option_env!("CARGO_BIN_EXE_ferry") {
            return PathBuf::from(path);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let target_dir = root.join("target").join("test-cli");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(root)
            .args([
                "build",
                "--quiet",
                "--package",
                "ferry-host",
                "--bin",
                "ferry",
            ])
            .arg("--target-dir")
            .arg(&target_dir)
            .status()
            .expect("running cargo to build the CLI");
        assert!(status.success(), "building the CLI failed");
        target_dir.join("debug/ferry")
    })
}

/// `ferry ARGS…` aimed at the fixture's agent, with its secret.
pub fn ferry<S: AsRef<OsStr>>(fixture: &Fixture, args: &[S]) -> Command {
    let mut command = Command::new(binary());
    command.env("FERRY_CONNECT", fixture.target.to_string());
    match &fixture.secret_file {
        Some(path) => command.env("FERRY_SECRET_FILE", path),
        None => command.env_remove("FERRY_SECRET_FILE"),
    };
    command.args(args);
    command
}

/// A terminal for the CLI: the controlling side (the test's) and the terminal itself, which
/// the CLI gets as stdin, stdout and stderr and as its controlling terminal.
pub struct Terminal {
    /// The test's side: what the CLI writes is read here, what is written here is typed.
    pub controller: File,
    /// The terminal, kept open by the test to read its settings.
    pub terminal: OwnedFd,
}

/// A terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    pub rows: u16,
    pub cols: u16,
}

impl Terminal {
    /// A new pseudo-terminal pair of `size`.
    pub fn open(size: Size) -> Terminal {
        let mut controller = -1;
        let mut terminal = -1;
        let winsize = winsize(size);
        // SAFETY: openpty writes two descriptors into the integers given; the name pointer may
        // be null, the termios pointer is null (defaults) and the winsize pointer is valid.
        #[allow(unsafe_code)]
        let rc = unsafe {
            libc::openpty(
                &mut controller,
                &mut terminal,
                std::ptr::null_mut(),
                std::ptr::null(),
                &winsize,
            )
        };
        assert_eq!(rc, 0, "openpty: {}", io::Error::last_os_error());
        // SAFETY: openpty returned two fresh descriptors that nothing else owns.
        #[allow(unsafe_code)]
        let (controller, terminal) = unsafe {
            (
                File::from_raw_fd(controller),
                OwnedFd::from_raw_fd(terminal),
            )
        };
        Terminal {
            controller,
            terminal,
        }
    }

    /// Starts `command` on this terminal: in a session of its own, with the terminal as its
    /// controlling terminal and its stdio.
    pub fn spawn(&self, command: &mut Command) -> Child {
        let stdio = || Stdio::from(self.terminal.try_clone().unwrap());
        command.stdin(stdio()).stdout(stdio()).stderr(stdio());
        // SAFETY: between fork and exec the closure calls only async-signal-safe functions
        // (setsid, ioctl) on a descriptor the child inherited as its stdin.
        #[allow(unsafe_code)]
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command.spawn().unwrap()
    }

    /// Sets the terminal's size, as a terminal emulator does when its window changes: the
    /// kernel sends SIGWINCH to its foreground process group.
    pub fn resize(&self, size: Size) {
        let winsize = winsize(size);
        // SAFETY: TIOCSWINSZ reads one valid winsize from the pointer.
        #[allow(unsafe_code)]
        let rc = unsafe {
            libc::ioctl(
                self.controller.as_raw_fd(),
                libc::TIOCSWINSZ,
                &winsize as *const libc::winsize,
            )
        };
        assert_eq!(rc, 0, "TIOCSWINSZ: {}", io::Error::last_os_error());
    }

    /// The terminal's settings, as bytes to compare.
    pub fn settings(&self) -> Vec<u8> {
        // SAFETY: termios is plain data; all zeroes is a valid value to be overwritten.
        #[allow(unsafe_code)]
        let mut termios: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes one termios into the valid pointer.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::tcgetattr(self.terminal.as_raw_fd(), &mut termios) };
        assert_eq!(rc, 0, "tcgetattr: {}", io::Error::last_os_error());
        format!(
            "{:o} {:o} {:o} {:o} {:?}",
            termios.c_iflag, termios.c_oflag, termios.c_cflag, termios.c_lflag, termios.c_cc
        )
        .into_bytes()
    }
}

fn winsize(size: Size) -> libc::winsize {
    libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Everything the CLI writes to its terminal, read by a thread of its own, so a scenario can
/// wait for text with a deadline.
pub struct Screen {
    seen: std::sync::Arc<(std::sync::Mutex<Vec<u8>>, std::sync::Condvar)>,
}

impl Screen {
    /// Starts reading `controller` (until the terminal is closed).
    pub fn read(controller: &File) -> Screen {
        use std::io::Read;
        let seen =
            std::sync::Arc::new((std::sync::Mutex::new(Vec::new()), std::sync::Condvar::new()));
        let mut controller = controller.try_clone().unwrap();
        let shared = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = controller.read(&mut buf) {
                let (lock, ready) = &*shared;
                lock.lock().unwrap().extend_from_slice(&buf[..n]);
                ready.notify_all();
            }
        });
        Screen { seen }
    }

    /// Waits until the screen holds `text`; everything seen so far.
    #[track_caller]
    pub fn wait_for(&self, text: &str, within: std::time::Duration) -> String {
        let (lock, ready) = &*self.seen;
        let deadline = std::time::Instant::now() + within;
        let mut seen = lock.lock().unwrap();
        loop {
            let screen = String::from_utf8_lossy(&seen).into_owned();
            if screen.contains(text) {
                return screen;
            }
            let now = std::time::Instant::now();
            assert!(
                now < deadline,
                "no {text:?} on the terminal within {within:?}: {screen:?}"
            );
            seen = ready.wait_timeout(seen, deadline - now).unwrap().0;
        }
    }

    /// Everything seen so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen.0.lock().unwrap()).into_owned()
    }
}
