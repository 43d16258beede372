//! Interactive and bounded exec (issue 10) against the shipped agent on a Unix socket: the CLI on
//! a real pseudo-terminal (raw mode, the guest's terminal, resizes, ^C as a byte, the terminal's
//! settings restored bit-identically on every way out), signals to the CLI, timeouts, output caps,
//! large argument lists, and the library's controls and record.
//!
//! Without a cgroup (this agent is not a guest's init) a tree kill reaches the process group
//! only: what `setsid`s escapes it here, the record says so, and the test cleans up after it.
//! `cargo xtask e2e` checks the cgroup kill in a guest.
// openpty, termios, the pty's size and a controlling terminal for the CLI have no safe std API.
#![allow(unsafe_code)]
#![allow(clippy::unwrap_used)] // a test reports failure by panicking

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{ferry, Agent};
use ferry_host::{Ending, Event, Stream, TreeKill, WindowSize};

fn run(agent: &Agent, args: &[&str]) -> Output {
    ferry(agent)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn kill(pid: u32, signal: i32) {
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(libc::pid_t::try_from(pid).unwrap(), signal) };
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Waits for `child`, failing (and killing it) if it runs past `within`: a CLI that hangs fails
/// its test instead of hanging the run.
fn wait_within(child: &mut Child, within: Duration) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the CLI did not end within {within:?}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn wait_gone(pid: u32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if !alive(pid) {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

// ---------------------------------------------------------------------------------------------
// A pseudo-terminal for the CLI.

fn termios(fd: BorrowedFd<'_>) -> libc::termios {
    // SAFETY: a zeroed termios is a valid value; tcgetattr writes through a valid pointer.
    let mut termios: libc::termios = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut termios) }, 0);
    termios
}

fn same(a: &libc::termios, b: &libc::termios) -> bool {
    (
        a.c_iflag, a.c_oflag, a.c_cflag, a.c_lflag, a.c_line, a.c_cc, a.c_ispeed, a.c_ospeed,
    ) == (
        b.c_iflag, b.c_oflag, b.c_cflag, b.c_lflag, b.c_line, b.c_cc, b.c_ispeed, b.c_ospeed,
    )
}

/// The CLI on a pseudo-terminal of its own: its controlling terminal and its stdin, stdout and
/// stderr, as in a terminal emulator. Everything it writes is collected.
struct Pty {
    child: Child,
    controller: OwnedFd,
    terminal: OwnedFd,
    /// The settings the terminal had before the CLI started (unusual ones, so a restore to any
    /// default would show).
    before: libc::termios,
    output: Arc<Mutex<Vec<u8>>>,
}

impl Pty {
    fn spawn(agent: &Agent, args: &[&str], size: WindowSize) -> Pty {
        let (mut controller, mut terminal) = (-1, -1);
        let winsize = libc::winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: valid out-pointers, a null name and termios, a size that is only read.
        let rc = unsafe {
            libc::openpty(
                &mut controller,
                &mut terminal,
                std::ptr::null_mut(),
                std::ptr::null(),
                &winsize,
            )
        };
        assert_eq!(rc, 0);
        // SAFETY: fresh descriptors from openpty, owned by nothing else.
        let (controller, terminal) = unsafe {
            (
                OwnedFd::from_raw_fd(controller),
                OwnedFd::from_raw_fd(terminal),
            )
        };
        let mut unusual = termios(terminal.as_fd());
        unusual.c_cc[libc::VKILL] = 0x02;
        unusual.c_lflag &= !libc::ECHOK;
        unusual.c_iflag |= libc::IXANY;
        // SAFETY: a valid termios, only read.
        assert_eq!(
            unsafe { libc::tcsetattr(terminal.as_raw_fd(), libc::TCSANOW, &unusual) },
            0
        );
        let before = termios(terminal.as_fd());
        let mut command = ferry(agent);
        command
            .args(args)
            .stdin(terminal.try_clone().unwrap())
            .stdout(terminal.try_clone().unwrap())
            .stderr(terminal.try_clone().unwrap());
        // SAFETY: between fork and exec only async-signal-safe calls: setsid and an ioctl.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&output);
        let mut reader = std::fs::File::from(controller.try_clone().unwrap());
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with EIO once every holder of the terminal side is gone.
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Pty {
            child,
            controller,
            terminal,
            before,
            output,
        }
    }

    fn output(&self) -> String {
        text(&self.output.lock().unwrap())
    }

    /// Waits until the CLI printed `what`.
    fn expect(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.output().contains(what) {
            assert!(
                Instant::now() < deadline,
                "no {what:?} in {:?}",
                self.output()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the CLI put the terminal in raw mode.
    fn expect_raw(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while termios(self.terminal.as_fd()).c_lflag & libc::ISIG != 0 {
            assert!(Instant::now() < deadline, "never raw: {:?}", self.output());
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn type_in(&self, bytes: &[u8]) {
        std::fs::File::from(self.controller.try_clone().unwrap())
            .write_all(bytes)
            .unwrap();
    }

    fn resize(&self, size: WindowSize) {
        let winsize = libc::winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize through a valid pointer. The kernel signals the
        // terminal's foreground group (the CLI) with SIGWINCH.
        let rc = unsafe { libc::ioctl(self.controller.as_raw_fd(), libc::TIOCSWINSZ, &winsize) };
        assert_eq!(rc, 0);
    }

    /// Waits for the CLI's end (10 s at most) and checks the terminal's settings are exactly
    /// those it found.
    fn finish(mut self) -> (ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the CLI did not end: {:?}", self.output());
            }
            thread::sleep(Duration::from_millis(10));
        };
        // What was still on its way through the terminal.
        thread::sleep(Duration::from_millis(50));
        let after = termios(self.terminal.as_fd());
        assert!(
            same(&self.before, &after),
            "the terminal's settings changed ({status}): {:?}",
            self.output()
        );
        (status, self.output())
    }
}

const SIZE: WindowSize = WindowSize {
    rows: 37,
    cols: 121,
};

// ---------------------------------------------------------------------------------------------
// The guest's terminal.

/// `-t` gives the command a terminal even when the CLI has none (its size then 24×80, its TERM
/// ours or xterm-256color); on a terminal, the size is ours.
#[test]
fn the_command_gets_a_terminal_of_our_size_and_type() {
    let agent = Agent::start();
    let output = run(&agent, &["exec", "-t", "--", "tty"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let tty = text(&output.stdout);
    let number = tty
        .strip_prefix("/dev/pts/")
        .and_then(|rest| rest.strip_suffix("\r\n"))
        .unwrap_or_else(|| panic!("{tty:?}"));
    assert!(number.parse::<u32>().is_ok(), "{tty:?}");
    // One stream: what the command writes to stderr arrives on stdout.
    let output = run(&agent, &["exec", "-t", "--", "sh", "-c", "stty size >&2"]);
    assert_eq!(text(&output.stdout), "24 80\r\n");
    assert!(output.stderr.is_empty(), "{}", text(&output.stderr));

    let term = |value: Option<&str>| {
        let mut command = ferry(&agent);
        match value {
            Some(value) => command.env("TERM", value),
            None => command.env_remove("TERM"),
        };
        let output = command
            .args(["exec", "-t", "--", "sh", "-c", "echo $TERM"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        text(&output.stdout)
    };
    assert_eq!(term(None), "xterm-256color\r\n");
    assert_eq!(term(Some("")), "xterm-256color\r\n");
    assert_eq!(term(Some("vt220")), "vt220\r\n");

    let pty = Pty::spawn(&agent, &["exec", "-t", "--", "stty", "size"], SIZE);
    let (status, printed) = pty.finish();
    assert!(status.success(), "{printed}");
    assert!(printed.contains("37 121"), "{printed:?}");
}

/// `-it` on a terminal: raw while the command runs (a line typed reaches it as typed), the
/// settings bit-identical afterwards.
#[test]
fn an_interactive_session_is_raw_and_restored() {
    let agent = Agent::start();
    let pty = Pty::spawn(
        &agent,
        &[
            "exec",
            "-it",
            "--",
            "sh",
            "-c",
            "echo ready; read line; echo \"got $line\"; exit 3",
        ],
        SIZE,
    );
    pty.expect("ready");
    pty.expect_raw();
    pty.type_in(b"hello\r");
    pty.expect("got hello");
    let (status, printed) = pty.finish();
    assert_eq!(status.code(), Some(3), "{printed}");
}

/// A resize of our terminal reaches the command as SIGWINCH and the new size.
#[test]
fn a_resize_reaches_the_command() {
    let agent = Agent::start();
    let script = "trap 'stty size; exit 7' WINCH; echo ready; while :; do sleep 0.05; done";
    let pty = Pty::spawn(&agent, &["exec", "-it", "--", "sh", "-c", script], SIZE);
    pty.expect("ready");
    pty.expect_raw();
    pty.resize(WindowSize {
        rows: 50,
        cols: 132,
    });
    pty.expect("50 132");
    let (status, printed) = pty.finish();
    assert_eq!(status.code(), Some(7), "{printed}");
}

/// ^C is a byte for the guest's terminal, which interrupts its foreground command.
#[test]
fn ctrl_c_travels_as_a_byte_and_interrupts() {
    let agent = Agent::start();
    let pty = Pty::spawn(&agent, &["exec", "-it", "--", "sleep", "100"], SIZE);
    pty.expect_raw();
    // The command has started once the terminal is raw; give sleep its exec.
    thread::sleep(Duration::from_millis(200));
    pty.type_in(&[0x03]);
    let (status, printed) = pty.finish();
    assert_eq!(status.code(), Some(130), "{printed}");
}

/// Signals to an interactive CLI: SIGTERM ends the command's tree (an interactive shell would
/// ignore it), SIGHUP is forwarded, SIGINT (which no key sends in raw mode) ends the CLI; the
/// terminal comes back each time.
#[test]
fn signals_to_an_interactive_cli_restore_the_terminal() {
    let agent = Agent::start();
    for (signal, code, died) in [
        (libc::SIGTERM, 143, false),
        (libc::SIGHUP, 129, false),
        (libc::SIGINT, 0, true),
    ] {
        let pty = Pty::spawn(
            &agent,
            &[
                "exec",
                "-it",
                "--",
                "sh",
                "-c",
                "echo ready; exec sleep 100",
            ],
            SIZE,
        );
        pty.expect("ready");
        pty.expect_raw();
        kill(pty.child.id(), signal);
        let (status, printed) = pty.finish();
        if died {
            assert_eq!(status.signal(), Some(signal), "{printed}");
        } else {
            assert_eq!(status.code(), Some(code), "{signal}: {printed}");
        }
    }
}

/// `ferry shell`: the user's login shell on a terminal.
#[test]
fn shell_runs_the_users_login_shell() {
    let agent = Agent::start();
    let pty = Pty::spawn(&agent, &["shell"], SIZE);
    pty.expect_raw();
    pty.type_in(b"echo \"tty=$(tty) size=$(stty size)\"; exit 5\r");
    pty.expect("size=37 121");
    let (status, printed) = pty.finish();
    assert_eq!(status.code(), Some(5), "{printed}");
    assert!(printed.contains("tty=/dev/pts/"), "{printed}");
}

// ---------------------------------------------------------------------------------------------
// Signals, timeouts, caps.

/// Without a terminal, the signals the CLI gets are the command's: `kill` of the CLI ends the
/// command as it would a local one, and the CLI exits as it did (SIGTERM: 143).
#[test]
fn signals_to_the_cli_are_forwarded() {
    let agent = Agent::start();
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGUSR1] {
        let mut child = ferry(&agent)
            .args(["exec", "--", "sh", "-c", "echo $$; exec sleep 100"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let pid: u32 = line.trim().parse().unwrap();
        kill(child.id(), signal);
        let status = wait_within(&mut child, Duration::from_secs(10));
        assert_eq!(status.code(), Some(128 + signal), "{signal}");
        assert!(
            wait_gone(pid, Duration::from_secs(2)),
            "the command outlived its signal"
        );
    }
}

/// With a terminal in the guest, SIGTERM to the CLI ends the command's tree (SIGTERM, then
/// SIGKILL after the grace): a command that ignores SIGTERM, as an interactive shell does, still
/// ends.
#[test]
fn sigterm_to_the_cli_ends_a_terminals_tree() {
    let agent = Agent::start();
    let script = "trap '' TERM; echo ready; while :; do sleep 0.05; done";
    let mut child = ferry(&agent)
        .args([
            "exec",
            "-t",
            "--kill-after",
            "300ms",
            "--",
            "sh",
            "-c",
            script,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "ready\r\n");
    let started = Instant::now();
    kill(child.id(), libc::SIGTERM);
    let status = wait_within(&mut child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(137));
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// The end of our stdin is the end of the command's (a half-close): it runs on to its end, and
/// its output and record still come.
#[test]
fn the_end_of_stdin_is_not_the_end_of_the_command() {
    let agent = Agent::start();
    let mut child = ferry(&agent)
        .args([
            "exec",
            "-i",
            "--",
            "sh",
            "-c",
            "cat; sleep 0.3; echo after; exit 6",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"input ").unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(6));
    assert_eq!(output.stdout, b"input after\n");
}

/// On a terminal the end of stdin is typed as `^D`, as a user would end their input: a shell
/// fed a script through a pipe ends with it (twice after a last line without its newline).
#[test]
fn the_end_of_stdin_on_a_terminal_is_end_of_file() {
    let agent = Agent::start();
    for (input, expected) in [
        (&b"echo hi\nexit 3\n"[..], 3),
        (&b"echo hi; exit 4"[..], 4),
        (&b"echo hi\n"[..], 0),
    ] {
        let mut child = ferry(&agent)
            .args(["exec", "-t", "-i", "--", "sh"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let status = wait_within(&mut child, Duration::from_secs(10));
        assert_eq!(status.code(), Some(expected), "{:?}", text(input));
        let mut out = Vec::new();
        child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
        assert!(text(&out).contains("hi"), "{:?}", text(&out));
    }
}

/// `--timeout`: the tree gets SIGTERM, then SIGKILL after the grace; the CLI exits 124. Every
/// process of the tree is gone; here, without a cgroup, the one that left the group is not, and
/// the record says how the tree was killed.
#[test]
fn a_timeout_ends_the_tree_and_exits_124() {
    let agent = Agent::start();
    let script = "trap '' TERM; sleep 100 & echo $!; setsid sleep 100 & echo $!; echo $$; \
                  while :; do sleep 0.05; done";
    let started = Instant::now();
    let output = run(
        &agent,
        &[
            "exec",
            "--timeout",
            "1s",
            "--kill-after",
            "500ms",
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    let took = started.elapsed();
    assert_eq!(output.status.code(), Some(124), "{}", text(&output.stderr));
    assert!(took < Duration::from_secs(3), "{took:?}");
    let stderr = text(&output.stderr);
    assert!(stderr.contains("timed out"), "{stderr}");
    let pids: Vec<u32> = text(&output.stdout)
        .lines()
        .map(|line| line.parse().unwrap())
        .collect();
    let [background, escaped, shell] = pids[..] else {
        panic!("{pids:?}");
    };
    assert!(wait_gone(shell, Duration::from_secs(1)));
    assert!(wait_gone(background, Duration::from_secs(1)));
    if stderr.contains("its whole tree was killed") {
        assert!(wait_gone(escaped, Duration::from_secs(1)));
    } else {
        assert!(stderr.contains("process group"), "{stderr}");
        kill(escaped, libc::SIGKILL);
    }

    // 0 is no timeout.
    let output = run(
        &agent,
        &[
            "exec",
            "--timeout",
            "0",
            "--",
            "sh",
            "-c",
            "sleep 0.3; exit 3",
        ],
    );
    assert_eq!(output.status.code(), Some(3));
}

/// Bad durations and sizes are usage errors that name the option; a cap of 0 is refused until
/// the protocol can say "keep nothing".
#[test]
fn garbage_durations_and_sizes_are_usage_errors() {
    let agent = Agent::start();
    for (option, value) in [
        ("--timeout", "-1"),
        ("--timeout", "1x"),
        ("--timeout", ""),
        ("--timeout", "1e3"),
        ("--timeout", "99999999999999999999"),
        ("--kill-after", "50d"),
        ("--kill-after", "soon"),
        ("--max-output", "1.5M"),
        ("--max-output", "1KB"),
        ("--max-output", "-1"),
    ] {
        let output = run(&agent, &["exec", option, value, "--", "true"]);
        assert_eq!(output.status.code(), Some(255), "{option} {value}");
        assert!(
            text(&output.stderr).contains(option),
            "{option} {value}: {}",
            text(&output.stderr)
        );
    }
    let output = run(&agent, &["exec", "--max-output", "0", "--", "true"]);
    assert_eq!(output.status.code(), Some(255));
    assert!(text(&output.stderr).contains("output cap of 0"));
}

/// `--max-output`: the first bytes and the last are kept exactly, the count of what was
/// dropped between them is exact, and the command runs at pipe speed to its end.
#[test]
fn an_output_cap_keeps_the_head_and_the_tail_exactly() {
    let agent = Agent::start();
    let expected = Command::new("seq")
        .args(["1", "100000"])
        .output()
        .unwrap()
        .stdout;
    for (stream, redirect) in [("stdout", ""), ("stderr", " >&2")] {
        let output = run(
            &agent,
            &[
                "exec",
                "--max-output",
                "64K",
                "--",
                "sh",
                "-c",
                &format!("seq 1 100000{redirect}"),
            ],
        );
        assert!(output.status.success());
        let stderr = text(&output.stderr);
        let line = stderr
            .lines()
            .find(|line| line.starts_with(&format!("ferry: {stream}: ")))
            .unwrap_or_else(|| panic!("{stderr}"));
        let numbers: Vec<u64> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|word| word.parse().ok())
            .collect();
        let [dropped, head, tail] = numbers[..] else {
            panic!("{line}");
        };
        let kept = if stream == "stdout" {
            output.stdout.clone()
        } else {
            stderr.as_bytes()[..stderr.len() - line.len() - 1].to_vec()
        };
        assert_eq!(head + tail, 64 * 1024, "{line}");
        assert_eq!(dropped, expected.len() as u64 - 64 * 1024, "{line}");
        assert_eq!(kept.len() as u64, head + tail, "{line}");
        let (head, tail) = (head as usize, tail as usize);
        assert!(
            kept[..head] == expected[..head],
            "{stream}: the head differs"
        );
        assert!(
            kept[head..] == expected[expected.len() - tail..],
            "{stream}: the tail differs"
        );
    }

    let started = Instant::now();
    let output = run(
        &agent,
        &[
            "exec",
            "--max-output",
            "1M",
            "--",
            "head",
            "-c",
            "1G",
            "/dev/zero",
        ],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(output.stdout.len(), 1 << 20);
    assert!(output.stdout.iter().all(|b| *b == 0));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "ferry: stdout: {} bytes dropped",
            (1u64 << 30) - (1 << 20)
        )),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
}

/// 20000 arguments of 20 bytes, and one of 100 KiB: what `execve` takes, exactly.
#[test]
fn large_argument_lists_round_trip() {
    let agent = Agent::start();
    let many: Vec<String> = (0..20_000).map(|i| format!("{i:019}")).collect();
    let big = "b".repeat(100 * 1024);
    for args in [many, vec![big]] {
        let output = ferry(&agent)
            .args(["exec", "--", "printf", "%s\\n"])
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", text(&output.stderr));
        let expected: String = args.iter().map(|arg| format!("{arg}\n")).collect();
        assert!(output.stdout == expected.as_bytes(), "the output differs");
    }
}

/// An agent that stops answering (its connection process stopped) ends the CLI after three
/// keepalive intervals: "agent stopped answering", exit 255.
#[test]
fn a_frozen_agent_is_agent_silent() {
    let agent = Agent::start();
    let mut child = ferry(&agent)
        .args(["exec", "--", "sh", "-c", "echo $PPID; exec sleep 100"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let connection: u32 = line.trim().parse().unwrap();
    kill(connection, libc::SIGSTOP);
    let started = Instant::now();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    kill(connection, libc::SIGCONT);
    assert_eq!(status.code(), Some(255), "{stderr}");
    assert!(stderr.contains("agent stopped answering"), "{stderr}");
    // Three intervals of 5 s, give or take the last keepalive.
    assert!(started.elapsed() < Duration::from_secs(20));
}

// ---------------------------------------------------------------------------------------------
// The library.

/// Edges of the controls on a real command: a second cancel brings the SIGKILL closer; signals,
/// resizes and cancels after the end do nothing; a timeout reports itself; chunks carry their
/// time; the record counts what each stream produced.
#[test]
fn controls_timestamps_and_the_record() {
    let agent = Agent::start();
    let client = agent.client();

    // A command that ignores SIGTERM: the first cancel's grace is long, the second's is none.
    let mut command = ferry_host::Command::new("sh");
    command
        .arg("-c")
        .arg("trap '' TERM; echo up; while :; do sleep 0.05; done");
    let mut execution = client.spawn(&command).unwrap();
    assert_eq!(
        execution.next_event().unwrap(),
        Some(Event::Stdout(b"up\n"))
    );
    // No terminal to resize: refused, and the command runs on.
    let size = WindowSize { rows: 2, cols: 2 };
    assert!(matches!(
        execution.resize(size),
        Err(ferry_host::Error::InvalidRequest(_))
    ));
    execution.cancel(Some(Duration::from_secs(60))).unwrap();
    thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    execution.cancel(Some(Duration::ZERO)).unwrap();
    let end = loop {
        match execution.next_event().unwrap() {
            Some(Event::Exited(end)) => break end,
            Some(_) => {}
            None => panic!("no record"),
        }
    };
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(end.ending, Ending::Cancelled);
    assert_ne!(end.tree_kill, TreeKill::None);
    assert_eq!(
        end.status,
        ferry_host::ExitStatus::Signal {
            number: 9,
            core_dumped: false
        }
    );
    // After the end: nothing to do, and no error.
    execution.signal(libc::SIGTERM).unwrap();
    execution.cancel(None).unwrap();
    execution.resize(size).unwrap();

    // A timeout, through the library.
    let mut command = ferry_host::Command::new("sleep");
    command.arg("100").timeout(Duration::from_millis(300));
    let output = client.output(&command).unwrap();
    assert_eq!(output.termination.ending, Ending::TimedOut);

    // Timestamps, and the record's counts.
    let mut command = ferry_host::Command::new("sh");
    command.arg("-c").arg("printf a; sleep 0.3; printf bc >&2");
    let mut execution = client.spawn(&command).unwrap();
    assert_eq!(execution.next_event().unwrap(), Some(Event::Stdout(b"a")));
    let first = execution.last_output_at();
    assert_eq!(execution.next_event().unwrap(), Some(Event::Stderr(b"bc")));
    let second = execution.last_output_at();
    assert!(
        second >= first + Duration::from_millis(250),
        "{first:?} {second:?}"
    );
    let Some(Event::Exited(end)) = execution.next_event().unwrap() else {
        panic!("no record");
    };
    assert_eq!((end.stdout.bytes, end.stderr.bytes), (1, 2));
    assert_eq!((end.stdout.dropped, end.stderr.dropped), (0, 0));
    assert_eq!(execution.dropped(Stream::Stdout), 0);
    assert_eq!(end.ending, Ending::Exited);
}
