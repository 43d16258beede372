//! The local terminal of `ferry exec -t`: raw mode that always comes back, the window size, and
//! `$TERM`.
//!
//! Raw mode is left by the guard's drop on every ordinary path (the end, an error, the agent
//! gone), and by [`restore_all`] on the others: the panic hook ([`install_panic_hook`]: the
//! release profile aborts on panic, so no drop runs) and a signal that ends the CLI
//! (`signals.rs`). Every terminal put in raw mode is registered here with the settings it had, so
//! those paths need nothing but this module.
// NOTE: termios and ioctl have no safe std API, and rustix's safe one needs its "std" feature
// for std's fds, which the workspace cannot enable (see host/Cargo.toml). Each call below states
// why it is sound.
#![allow(unsafe_code)]

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::{Mutex, MutexGuard, Once};

pub use ferry_host::WindowSize;

/// What a command's terminal gets when the CLI has none to measure: the VT100's size.
pub const DEFAULT_SIZE: WindowSize = WindowSize { rows: 24, cols: 80 };

/// `TERM` for the guest's terminal when ours does not say (unset or empty).
pub const DEFAULT_TERM: &str = "xterm-256color";

/// `$TERM`, or [`DEFAULT_TERM`] when it is unset or empty.
pub fn term_name() -> OsString {
    term_or_default(std::env::var_os("TERM"))
}

fn term_or_default(term: Option<OsString>) -> OsString {
    match term {
        Some(term) if !term.is_empty() => term,
        _ => DEFAULT_TERM.into(),
    }
}

/// The size of the terminal `fd` is, or `None` when it is not a terminal or reports no size
/// (0×0, as a pty nobody sized does).
pub fn window_size(fd: BorrowedFd<'_>) -> Option<WindowSize> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which is valid and exclusive
    // for the call; `fd` is open for its duration (borrowed).
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
    (rc == 0 && size.ws_row > 0 && size.ws_col > 0).then_some(WindowSize {
        rows: size.ws_row,
        cols: size.ws_col,
    })
}

/// A terminal's settings, as `tcgetattr` gives them.
pub fn get_attr(fd: BorrowedFd<'_>) -> io::Result<libc::termios> {
    // SAFETY: an all-zero `termios` is a valid value of this plain C struct (integers and an
    // array of them); `tcgetattr` only writes through the pointer.
    let mut termios: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer is valid and exclusive for the call; `fd` is open (borrowed).
    if unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut termios) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(termios)
}

/// Applies `termios` to the terminal `fd` at once.
// NOTE: TCSANOW, not TCSADRAIN: draining waits for whoever reads the terminal, forever if that
// is a frozen emulator, and a restore on the way out must not hang. Nothing is lost: the tty
// processes output (OPOST) when it is written, not when it drains.
fn set_attr(fd: RawFd, termios: &libc::termios) -> io::Result<()> {
    loop {
        // SAFETY: the pointer is valid for the call and only read. A stale `fd` (closed after
        // registration) fails with EBADF or, reused, is not a terminal (ENOTTY); it is never
        // memory-unsafe.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, termios) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Terminals in raw mode and the settings each had before: what [`restore_all`] puts back.
static SAVED: Mutex<Vec<(RawFd, libc::termios)>> = Mutex::new(Vec::new());

fn saved() -> MutexGuard<'static, Vec<(RawFd, libc::termios)>> {
    // A list of plain values; a panic elsewhere cannot leave it torn.
    SAVED.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// A terminal in raw mode (every key reaches the command as a byte: ^C, ^D, ^Z, ^\ included;
/// nothing echoed locally; output passed through untranslated), until dropped.
#[derive(Debug)]
pub struct RawMode<'fd> {
    fd: BorrowedFd<'fd>,
}

impl<'fd> RawMode<'fd> {
    /// Puts the terminal `fd` in raw mode. Fails when it is not a terminal, or is already raw
    /// through another guard (restoring that one's settings on this one's drop would be wrong).
    pub fn enter(fd: BorrowedFd<'fd>) -> io::Result<RawMode<'fd>> {
        let before = get_attr(fd)?;
        let raw_fd = fd.as_raw_fd();
        {
            let mut saved = saved();
            if saved.iter().any(|(fd, _)| *fd == raw_fd) {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "the terminal is already in raw mode",
                ));
            }
            // Registered before it changes: a signal or a panic from here on restores it.
            saved.push((raw_fd, before));
        }
        let mut raw = before;
        // SAFETY: `raw` is a valid termios the call only modifies in place.
        unsafe { libc::cfmakeraw(&mut raw) };
        // One byte per read, no timer: keystrokes go out as they are typed.
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        if let Err(err) = set_attr(raw_fd, &raw) {
            saved().retain(|(fd, _)| *fd != raw_fd);
            return Err(err);
        }
        Ok(RawMode { fd })
    }
}

impl Drop for RawMode<'_> {
    fn drop(&mut self) {
        restore(self.fd.as_raw_fd());
    }
}

/// Puts `fd`'s settings back if it is still registered (another path may have done it first).
fn restore(fd: RawFd) {
    let mut saved = saved();
    if let Some(at) = saved.iter().position(|(saved_fd, _)| *saved_fd == fd) {
        let (fd, before) = saved.swap_remove(at);
        // A terminal that hung up (SIGHUP) cannot be restored and needs nothing: ignored.
        let _ = set_attr(fd, &before);
    }
}

/// Restores every terminal still in raw mode: for the ways out that run no destructor (a
/// panic under `panic = "abort"`, a signal that ends the process).
pub fn restore_all() {
    // NOTE: `try_lock`: this may run in a panic hook on the thread that holds the lock (a panic
    // inside this module); waiting would deadlock, skipping only loses that restore.
    let mut saved = match SAVED.try_lock() {
        Ok(saved) => saved,
        Err(std::sync::TryLockError::Poisoned(poison)) => poison.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return,
    };
    for (fd, before) in saved.drain(..) {
        let _ = set_attr(fd, &before);
    }
}

/// Makes a panic restore the terminal before its message is printed (so the message is readable,
/// and the shell is usable after an abort). Idempotent.
pub fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_all();
            previous(info);
        }));
    });
}

#[cfg(test)]
pub mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    use super::*;

    /// A pseudo-terminal pair: (controller, terminal), sized `size`.
    pub fn openpty(size: WindowSize) -> (OwnedFd, OwnedFd) {
        let (mut controller, mut terminal) = (-1, -1);
        let winsize = libc::winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: both out-pointers are valid; a null name and termios are allowed; the size is
        // only read.
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
        unsafe {
            (
                OwnedFd::from_raw_fd(controller),
                OwnedFd::from_raw_fd(terminal),
            )
        }
    }

    /// Whether two settings are identical in every field the kernel keeps.
    pub fn same_settings(a: &libc::termios, b: &libc::termios) -> bool {
        a.c_iflag == b.c_iflag
            && a.c_oflag == b.c_oflag
            && a.c_cflag == b.c_cflag
            && a.c_lflag == b.c_lflag
            && a.c_line == b.c_line
            && a.c_cc == b.c_cc
            && a.c_ispeed == b.c_ispeed
            && a.c_ospeed == b.c_ospeed
    }

    /// Settings no terminal starts with, so a restore to defaults would be caught.
    pub fn unusual_settings(fd: BorrowedFd<'_>) -> libc::termios {
        let mut termios = get_attr(fd).unwrap();
        termios.c_cc[libc::VINTR] = 0x07;
        termios.c_cc[libc::VEOF] = 0x01;
        termios.c_lflag &= !libc::ECHOK;
        termios.c_iflag |= libc::IXANY;
        set_attr(fd.as_raw_fd(), &termios).unwrap();
        get_attr(fd).unwrap()
    }

    /// Held by the tests that put terminals in raw mode: [`restore_all`] restores every one
    /// in the process, so those tests must not overlap.
    static REGISTRY: Mutex<()> = Mutex::new(());

    pub fn serial() -> MutexGuard<'static, ()> {
        REGISTRY.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    #[test]
    fn raw_mode_is_raw_and_the_settings_come_back_bit_identical() {
        let _serial = serial();
        let (_controller, terminal) = openpty(DEFAULT_SIZE);
        let before = unusual_settings(terminal.as_fd());
        {
            let _raw = RawMode::enter(terminal.as_fd()).unwrap();
            let raw = get_attr(terminal.as_fd()).unwrap();
            assert_eq!(
                raw.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN),
                0
            );
            assert_eq!(raw.c_iflag & (libc::ICRNL | libc::IXON), 0);
            assert_eq!(raw.c_oflag & libc::OPOST, 0);
            assert_eq!(raw.c_cc[libc::VMIN], 1);
            assert!(!same_settings(&before, &raw));
            // A second guard on the same terminal would restore raw settings: refused.
            let err = RawMode::enter(terminal.as_fd()).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        }
        assert!(same_settings(&before, &get_attr(terminal.as_fd()).unwrap()));
        // And again: nothing of the first guard is left behind.
        drop(RawMode::enter(terminal.as_fd()).unwrap());
        assert!(same_settings(&before, &get_attr(terminal.as_fd()).unwrap()));
    }

    #[test]
    fn restore_all_restores_and_the_guard_then_does_nothing() {
        let _serial = serial();
        let (_controller, terminal) = openpty(DEFAULT_SIZE);
        let before = unusual_settings(terminal.as_fd());
        let raw = RawMode::enter(terminal.as_fd()).unwrap();
        restore_all();
        assert!(same_settings(&before, &get_attr(terminal.as_fd()).unwrap()));
        // Changed after the restore (as a program run later might): the guard leaves it.
        let mut later = before;
        later.c_cc[libc::VKILL] = 0x02;
        set_attr(terminal.as_raw_fd(), &later).unwrap();
        drop(raw);
        assert!(same_settings(&later, &get_attr(terminal.as_fd()).unwrap()));
    }

    #[test]
    fn not_a_terminal_is_an_error_and_registers_nothing() {
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(RawMode::enter(file.as_fd()).is_err());
        assert!(!saved().iter().any(|(fd, _)| *fd == file.as_raw_fd()));
        assert_eq!(window_size(file.as_fd()), None);
    }

    #[test]
    fn the_window_size_is_the_terminals() {
        let size = WindowSize {
            rows: 37,
            cols: 121,
        };
        let (controller, terminal) = openpty(size);
        assert_eq!(window_size(terminal.as_fd()), Some(size));
        // A pty nobody sized reports 0×0: no size.
        let (_c, unsized_terminal) = openpty(WindowSize { rows: 0, cols: 0 });
        assert_eq!(window_size(unsized_terminal.as_fd()), None);
        drop(controller);
    }

    #[test]
    fn term_defaults_when_unset_or_empty() {
        assert_eq!(term_or_default(Some("vt220".into())), "vt220");
        assert_eq!(term_or_default(Some("".into())), DEFAULT_TERM);
        assert_eq!(term_or_default(None), DEFAULT_TERM);
    }
}
