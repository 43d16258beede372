//! Signals that reach the CLI while an exec runs: forwarded to the command, turned into resizes,
//! or, for those it does not forward while the terminal is raw, ending the CLI with the terminal
//! restored first.
//!
//! The handling runs on a thread of its own (signal-hook's iterator: the handler itself only
//! writes to a pipe), which hands each signal to a callback. That fits the blocking
//! [`ferry_host::Execution`]: the thread reading the command's events stays blocked in its read,
//! and the callback sends its frame through the execution's control handle from this thread, the
//! way a stdin writer does from another. Nothing has to interrupt the reader's wait.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::thread;

use signal_hook::consts::signal::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGWINCH};
use signal_hook::iterator::{Handle, Signals};

use crate::term::{self, WindowSize};

/// What a signal to the CLI asks of the running command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caught {
    /// Send it this signal.
    Signal(i32),
    /// The local terminal has this new size.
    Resize(WindowSize),
}

/// Forwarded to the command when the local terminal is not raw: ^C and ^\ at the terminal reach
/// the CLI as signals, and so does a `kill` of it.
pub const FORWARDED: [i32; 6] = [SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2];

/// Forwarded while the local terminal is raw: keys travel as bytes (^C and ^\ are the guest
/// terminal's to turn into signals, as over ssh -t), so only what no key can say is forwarded:
/// someone ending the CLI, or its terminal hanging up.
pub const FORWARDED_RAW: [i32; 2] = [SIGTERM, SIGHUP];

/// Signals that ask a process to end. The first one the CLI gets is forwarded; a second one
/// ends the CLI itself at once (the agent then ends the command's tree): a remote command that
/// ignores them, or an agent that no longer acts on them, does not keep the CLI alive.
const ENDING: [i32; 4] = [SIGINT, SIGTERM, SIGHUP, SIGQUIT];

/// How a run handles signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keys {
    /// The local terminal (if any) is not raw: [`FORWARDED`].
    AsSignals,
    /// The local terminal is raw and its keys are the command's stdin: [`FORWARDED_RAW`]; the
    /// rest of [`FORWARDED`] ends the CLI after restoring the terminal (as they would end it
    /// without a handler, leaving the terminal raw).
    AsBytes,
}

type Callback = Box<dyn FnMut(Caught) + Send>;

/// Signal handling for one exec, from [`Forwarding::start`] until dropped.
pub struct Forwarding {
    handle: Handle,
    thread: Option<thread::JoinHandle<()>>,
    /// Shared with the thread; emptied on drop, so no callback runs once the exec is over.
    callback: Arc<Mutex<Option<Callback>>>,
}

impl std::fmt::Debug for Forwarding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarding").finish_non_exhaustive()
    }
}

impl Forwarding {
    /// Starts handling [`FORWARDED`]'s signals as `keys` says, and SIGWINCH when `terminal` is
    /// given (a resize reports that terminal's new size). `on_signal` runs on the handling
    /// thread, one signal at a time.
    pub fn start(
        keys: Keys,
        terminal: Option<BorrowedFd<'_>>,
        on_signal: impl FnMut(Caught) + Send + 'static,
    ) -> io::Result<Forwarding> {
        // A descriptor of our own: the thread may outlive the caller's borrow.
        let terminal: Option<OwnedFd> = terminal.map(|fd| fd.try_clone_to_owned()).transpose()?;
        let mut handled = FORWARDED.to_vec();
        if terminal.is_some() {
            handled.push(SIGWINCH);
        }
        let mut signals = Signals::new(&handled)?;
        let handle = signals.handle();
        let callback: Arc<Mutex<Option<Callback>>> =
            Arc::new(Mutex::new(Some(Box::new(on_signal))));
        let forwarded: &'static [i32] = match keys {
            Keys::AsSignals => &FORWARDED,
            Keys::AsBytes => &FORWARDED_RAW,
        };
        let shared = Arc::clone(&callback);
        let thread = thread::Builder::new()
            .name("ferry-signals".into())
            .spawn(move || {
                let mut asked_to_end = false;
                for signal in signals.forever() {
                    let mut slot = shared.lock().unwrap_or_else(|poison| poison.into_inner());
                    let Some(on_signal) = slot.as_mut() else {
                        // Over: the drop is closing the iterator.
                        continue;
                    };
                    if signal == SIGWINCH {
                        // No size (the terminal went away): nothing to tell.
                        if let Some(size) = terminal.as_ref().and_then(|fd| {
                            use std::os::fd::AsFd;
                            term::window_size(fd.as_fd())
                        }) {
                            on_signal(Caught::Resize(size));
                        }
                    } else if forwarded.contains(&signal)
                        && !(asked_to_end && ENDING.contains(&signal))
                    {
                        asked_to_end |= ENDING.contains(&signal);
                        on_signal(Caught::Signal(signal));
                    } else {
                        drop(slot);
                        die_of(signal);
                    }
                }
            })?;
        Ok(Forwarding {
            handle,
            thread: Some(thread),
            callback,
        })
    }
}

impl Drop for Forwarding {
    /// Stops forwarding. NOTE: signal-hook cannot put the default actions back, so until the
    /// process exits these signals are ignored; the CLI drops this only on its way out.
    fn drop(&mut self) {
        self.callback
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .take();
        self.handle.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Ends the CLI as `signal` would have without a handler, after restoring any raw terminal.
fn die_of(signal: i32) -> ! {
    term::restore_all();
    // Dies of the signal itself (a shell sees 128+N and knows it was a signal, which matters to
    // one that stops a script on ^C); falls back to the same code if that fails.
    let _ = signal_hook::low_level::emulate_default_handler(signal);
    std::process::exit(128 + signal);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;
    use crate::term::tests::{openpty, same_settings, unusual_settings};
    use crate::term::{get_attr, RawMode};

    /// Waits for `want` on `rx`, skipping whatever else arrives (other tests' signals).
    fn expect(rx: &mpsc::Receiver<Caught>, want: Caught) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(caught) if caught == want => return,
                Ok(_) => {}
                Err(err) => panic!("waiting for {want:?}: {err}"),
            }
        }
    }

    /// In this process: forwarded signals and resizes reach the callback; nothing after drop.
    #[test]
    fn signals_and_resizes_reach_the_callback() {
        let (controller, terminal) = openpty(crate::term::DEFAULT_SIZE);
        let (tx, rx) = mpsc::channel();
        let forwarding = Forwarding::start(Keys::AsSignals, Some(terminal.as_fd()), move |c| {
            let _ = tx.send(c);
        })
        .unwrap();
        for signal in [SIGUSR1, SIGUSR2, SIGQUIT] {
            signal_hook::low_level::raise(signal).unwrap();
            expect(&rx, Caught::Signal(signal));
        }
        let size = WindowSize {
            rows: 50,
            cols: 132,
        };
        set_size(controller.as_fd(), size);
        signal_hook::low_level::raise(SIGWINCH).unwrap();
        expect(&rx, Caught::Resize(size));
        drop(forwarding);
        // The callback is gone with it (and the sender it held).
        assert!(matches!(
            rx.recv_timeout(Duration::from_secs(5)),
            Err(mpsc::RecvTimeoutError::Disconnected)
        ));
    }

    fn set_size(fd: BorrowedFd<'_>, size: WindowSize) {
        use std::os::fd::AsRawFd;
        let winsize = libc::winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize through a valid pointer.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &winsize) };
        assert_eq!(rc, 0);
    }

    /// The environment variable that turns [`terminal_child`] into the child of
    /// [`the_terminal_comes_back_on_every_way_out`].
    const CHILD: &str = "FERRY_TEST_TERMINAL_CHILD";

    /// A child process with a pty as its stdin, the way `ferry exec -it` holds it: handlers,
    /// then raw mode; it prints `ready`, reads one byte and reports it, then ends as its mode
    /// says. Does nothing in an ordinary test run.
    #[test]
    fn terminal_child() {
        let Some(mode) = std::env::var_os(CHILD) else {
            return;
        };
        term::install_panic_hook();
        let stdin = io::stdin();
        let forwarded = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&forwarded);
        let _forwarding = Forwarding::start(Keys::AsBytes, Some(stdin.as_fd()), move |caught| {
            println!("caught {caught:?}");
            flag.store(true, Ordering::SeqCst);
        })
        .unwrap();
        let raw = RawMode::enter(stdin.as_fd()).unwrap();
        println!("ready");
        let mut byte = [0u8; 1];
        // Unbuffered: one read of the terminal.
        std::fs::File::from(stdin.as_fd().try_clone_to_owned().unwrap())
            .read_exact(&mut byte)
            .unwrap();
        println!("read {:#04x}", byte[0]);
        match mode.to_str().unwrap() {
            "end" => drop(raw),
            // Without the guard's drop, as under `panic = "abort"`: only the hook restores.
            "panic" => {
                std::mem::forget(raw);
                panic!("on purpose")
            }
            // Waits for a signal: forwarded ones end the wait, the others end the process.
            // "twice": waits on after a forwarded one, for a second to end the process.
            "twice" => thread::sleep(Duration::from_secs(10)),
            "signal" => {
                for _ in 0..1000 {
                    if forwarded.load(Ordering::SeqCst) {
                        break;
                    }
                    thread::sleep(Duration::from_millis(10));
                }
            }
            other => panic!("unknown mode {other}"),
        }
    }

    /// Runs [`terminal_child`] in `mode` on a fresh pty with unusual settings: once it is raw,
    /// types `byte`, then sends it `signal`, if any. Returns the child's status and what it
    /// printed, after asserting that the terminal's settings are bit-identical to before.
    fn run_child(mode: &str, byte: u8, signals: &[i32]) -> (std::process::ExitStatus, String) {
        let (controller, terminal) = openpty(crate::term::DEFAULT_SIZE);
        let before = unusual_settings(terminal.as_fd());
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "signals::tests::terminal_child", "--nocapture"])
            .env(CHILD, mode)
            .stdin(terminal.try_clone().unwrap())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut printed = String::new();
        loop {
            let mut line = String::new();
            assert!(out.read_line(&mut line).unwrap() > 0, "no ready: {printed}");
            printed.push_str(&line);
            if line == "ready\n" {
                break;
            }
        }
        let raw = get_attr(terminal.as_fd()).unwrap();
        assert_eq!(raw.c_lflag & libc::ISIG, 0, "raw while the child runs");
        std::fs::File::from(controller.try_clone().unwrap())
            .write_all(&[byte])
            .unwrap();
        // After the byte was read: the child is then past its read, in its wait.
        let mut wait_for = |prefix: &str, printed: &mut String| loop {
            let mut line = String::new();
            assert!(
                out.read_line(&mut line).unwrap() > 0,
                "no {prefix}: {printed}"
            );
            printed.push_str(&line);
            if line.starts_with(prefix) {
                break;
            }
        };
        if !signals.is_empty() {
            wait_for("read ", &mut printed);
        }
        let pid = libc::pid_t::try_from(child.id()).unwrap();
        for (n, signal) in signals.iter().enumerate() {
            if n > 0 {
                // The one before was forwarded: the next finds the CLI past it.
                wait_for("caught ", &mut printed);
            }
            // SAFETY: kill has no memory effects; the pid is our unreaped child's.
            #[allow(unsafe_code)]
            let rc = unsafe { libc::kill(pid, *signal) };
            assert_eq!(rc, 0);
        }
        let status = child.wait().unwrap();
        out.read_to_string(&mut printed).unwrap();
        let after = get_attr(terminal.as_fd()).unwrap();
        assert!(
            same_settings(&before, &after),
            "{mode}: settings differ after the child ({status}): {printed}"
        );
        (status, printed)
    }

    /// Under a real pty: the settings are bit-identical after a normal end, a panic, a
    /// forwarded SIGTERM or SIGHUP, a SIGINT or SIGUSR1 that ends the CLI, and a second ending
    /// signal; ^C is a byte.
    #[test]
    fn the_terminal_comes_back_on_every_way_out() {
        let (status, printed) = run_child("end", 0x03, &[]);
        assert!(status.success(), "{printed}");
        assert!(
            printed.contains("read 0x03"),
            "^C travels as a byte: {printed}"
        );

        let (status, printed) = run_child("panic", b'x', &[]);
        assert!(!status.success(), "{printed}");

        for signal in FORWARDED_RAW {
            let (status, printed) = run_child("signal", b'x', &[signal]);
            assert!(status.success(), "{signal}: {status}: {printed}");
            assert!(
                printed.contains(&format!("caught Signal({signal})")),
                "{printed}"
            );
        }
        // Not SIGQUIT: its death would dump core; the path is SIGINT's.
        for signal in [SIGINT, SIGUSR1, SIGUSR2] {
            let (status, printed) = run_child("signal", b'x', &[signal]);
            assert_eq!(status.signal(), Some(signal), "{status}: {printed}");
            assert!(!printed.contains("caught"), "{printed}");
        }
        // A second ending signal ends the CLI, whatever became of the first.
        let (status, printed) = run_child("twice", b'x', &[SIGTERM, SIGHUP]);
        assert_eq!(status.signal(), Some(SIGHUP), "{status}: {printed}");
        assert_eq!(printed.matches("caught").count(), 1, "{printed}");
    }
}
