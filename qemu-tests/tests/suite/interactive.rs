//! Interactive and bounded exec through the `ferry` CLI (issue 10's contract): a terminal in
//! the guest that knows its size and follows the host's, ^C as a byte, the host terminal left
//! as it was; a timeout that ends the whole tree and exits 124; a CLI that forwards SIGTERM
//! (143); output caps that keep the exact head and tail and say how much was dropped; argv as
//! large as Linux takes.

use std::io::Write;
use std::process::{Command as Process, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use ferry_host::Command;

use super::bombs::say;
use super::cli::{ferry, Screen, Size, Terminal};
use super::trees::with_marker_as;
use super::Fixture;

/// Waits for `child` with a deadline; its exit code (a CLI that hangs fails the scenario).
fn exit_code(child: &mut std::process::Child, within: Duration) -> i32 {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status
                .code()
                .unwrap_or_else(|| panic!("the CLI died: {status:?}"));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the CLI did not end within {within:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The pids carrying `marker` (as root in the guest, where commands run as nobody).
fn marked(fixture: &Fixture, marker: &str) -> Vec<u32> {
    let user = (fixture.listener_pid == 1).then_some("root");
    with_marker_as(&fixture.client(), marker, user)
}

/// Waits until `count` processes carry `marker`.
fn until_running(fixture: &Fixture, marker: &str, count: usize) {
    let started = Instant::now();
    while marked(fixture, marker).len() < count {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not {count} of {marker}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until no process carries `marker`; the ones left at the deadline otherwise.
fn until_gone(fixture: &Fixture, marker: &str, within: Duration) -> Result<(), Vec<u32>> {
    let started = Instant::now();
    loop {
        let left = marked(fixture, marker);
        if left.is_empty() {
            return Ok(());
        }
        if started.elapsed() > within {
            return Err(left);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Kills what is left with `marker` (processes that escaped a tree kill where no cgroup
/// holds them, over the Unix socket), so nothing outlives the scenario.
fn sweep(fixture: &Fixture, marker: &str) {
    let client = fixture.client();
    for pid in marked(fixture, marker) {
        let _ = client.output(Command::new("kill").arg("-9").arg(pid.to_string()));
    }
}

pub fn a_terminal_knows_its_name_and_size(fixture: &Fixture) {
    let size = Size {
        rows: 33,
        cols: 111,
    };
    let terminal = Terminal::open(size);
    let screen = Screen::read(&terminal.controller);
    let before = terminal.settings();
    let mut cli = terminal.spawn(&mut ferry(
        fixture,
        &[
            "exec",
            "-t",
            "--",
            "sh",
            "-c",
            "tty; stty size; echo TERM=$TERM",
        ],
    ));
    assert_eq!(
        exit_code(&mut cli, Duration::from_secs(30)),
        0,
        "{}",
        screen.text()
    );
    let text = screen.wait_for("TERM=", Duration::from_secs(5));
    assert!(text.contains("/dev/pts/"), "{text:?}");
    assert!(text.contains("33 111"), "{text:?}");
    assert!(
        !text.contains("TERM=\r") && !text.contains("TERM=\n"),
        "{text:?}"
    );
    assert_eq!(
        terminal.settings(),
        before,
        "the host terminal's settings changed"
    );
}

pub fn a_resize_reaches_the_command(fixture: &Fixture) {
    let terminal = Terminal::open(Size { rows: 24, cols: 80 });
    let screen = Screen::read(&terminal.controller);
    let before = terminal.settings();
    let script = "trap 'stty size; exit 0' WINCH; echo ready; sleep 100 & wait";
    let mut cli = terminal.spawn(&mut ferry(
        fixture,
        &["exec", "-t", "--", "sh", "-c", script],
    ));
    screen.wait_for("ready", Duration::from_secs(30));
    terminal.resize(Size {
        rows: 40,
        cols: 120,
    });
    screen.wait_for("40 120", Duration::from_secs(10));
    assert_eq!(
        exit_code(&mut cli, Duration::from_secs(10)),
        0,
        "{}",
        screen.text()
    );
    assert_eq!(
        terminal.settings(),
        before,
        "the host terminal's settings changed"
    );
}

pub fn control_c_interrupts_the_command(fixture: &Fixture) {
    let terminal = Terminal::open(Size { rows: 24, cols: 80 });
    let screen = Screen::read(&terminal.controller);
    let before = terminal.settings();
    let mut cli = terminal.spawn(&mut ferry(
        fixture,
        &["exec", "-t", "--", "sh", "-c", "echo ready; exec sleep 100"],
    ));
    screen.wait_for("ready", Duration::from_secs(30));
    // Give the shell time to become `sleep`, then type ^C.
    thread::sleep(Duration::from_millis(300));
    (&terminal.controller).write_all(b"\x03").unwrap();
    assert_eq!(
        exit_code(&mut cli, Duration::from_secs(10)),
        130,
        "{}",
        screen.text()
    );
    assert_eq!(
        terminal.settings(),
        before,
        "the host terminal's settings changed"
    );
}

pub fn a_timeout_ends_the_whole_tree_and_exits_124(fixture: &Fixture) {
    const MARKER: &str = "100124";
    let started = Instant::now();
    let output = ferry(
        fixture,
        &[
            "exec",
            "--timeout",
            "1s",
            "--",
            "sh",
            "-c",
            &format!("sleep {MARKER} & setsid sleep {MARKER} & exec sleep {MARKER}"),
        ],
    )
    .stdin(Stdio::null())
    .output()
    .unwrap();
    let took = started.elapsed();
    assert_eq!(output.status.code(), Some(124), "{output:?}");
    // SIGTERM at 1 s ends `sleep`: no grace needed, well within timeout + grace + 1 s.
    assert!(took < Duration::from_secs(4), "took {took:?}");
    if fixture.listener_pid == 1 {
        // The guest's agent kills the exec's cgroup: the setsid escapee too.
        if let Err(left) = until_gone(fixture, MARKER, Duration::from_secs(3)) {
            panic!("left after the timeout: {left:?}");
        }
    } else {
        // No cgroup here: the process group dies, the setsid escapee is swept.
        let started = Instant::now();
        while marked(fixture, MARKER).len() > 1 {
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "the group survived"
            );
            thread::sleep(Duration::from_millis(20));
        }
        say("a_timeout_ends_the_whole_tree_and_exits_124: no cgroup here, the setsid escapee is swept");
        sweep(fixture, MARKER);
    }
}

pub fn sigterm_to_the_cli_is_forwarded_and_exits_143(fixture: &Fixture) {
    const MARKER: &str = "100143";
    let mut cli = ferry(fixture, &["exec", "--", "sleep", MARKER])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    until_running(fixture, MARKER, 1);
    let status = Process::new("kill")
        .args(["-TERM", &cli.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(exit_code(&mut cli, Duration::from_secs(10)), 143);
    if let Err(left) = until_gone(fixture, MARKER, Duration::from_secs(3)) {
        panic!("left after SIGTERM: {left:?}");
    }
}

/// What the CLI kept of a stream capped at `cap`: the head, then the tail window.
fn kept(full: &[u8], cap: usize) -> Vec<u8> {
    if full.len() <= cap {
        return full.to_vec();
    }
    let tail = (cap / 2).min(64 * 1024);
    [&full[..cap - tail], &full[full.len() - tail..]].concat()
}

pub fn output_caps_keep_the_exact_head_and_tail(fixture: &Fixture) {
    // A gigabyte of zeros, capped at 1 MiB: drained at pipe speed, exactly the cap kept. In the
    // guest `dd` writes it in 64 KiB blocks: busybox's `head -c` writes 4 KiB at a time, which
    // under TCG measures syscalls, not the cap (about 10 MB/s either way).
    const GIB: &str = "1073741824";
    let producer: Vec<&str> = if fixture.listener_pid == 1 {
        vec![
            "dd",
            "if=/dev/zero",
            "bs=65536",
            "count=16384",
            "status=none",
        ]
    } else {
        vec!["head", "-c", GIB, "/dev/zero"]
    };
    let mut args = vec!["exec", "--max-output", "1M", "--"];
    args.extend(&producer);
    let started = Instant::now();
    let output = ferry(fixture, &args).stdin(Stdio::null()).output().unwrap();
    let took = started.elapsed();
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(output.stdout.len(), 1 << 20);
    assert!(output.stdout.iter().all(|b| *b == 0));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let dropped = (1u64 << 30) - (1 << 20);
    assert!(
        stderr.contains(&format!("ferry: stdout: {dropped} bytes dropped")),
        "{stderr}"
    );
    // What the same producer takes into a pipe on the agent's machine, for comparison.
    let alone = fixture
        .client()
        .output(&super::sh(&format!(
            "{} | cat > /dev/null",
            producer.join(" ")
        )))
        .unwrap();
    say(&format!(
        "1 GiB capped at 1 MiB in {took:?}; the producer into a pipe alone: {:?}",
        alone.duration
    ));
    // A pattern, capped on both streams: the head and the tail are the right bytes.
    let script = "seq 1 200000; seq 1 100000 >&2";
    let output = ferry(
        fixture,
        &["exec", "--max-output", "64K", "--", "sh", "-c", script],
    )
    .stdin(Stdio::null())
    .output()
    .unwrap();
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let seq = |n: u32| {
        (1..=n)
            .map(|i| format!("{i}\n"))
            .collect::<String>()
            .into_bytes()
    };
    let (out, err) = (seq(200000), seq(100000));
    assert_eq!(output.stdout, kept(&out, 64 * 1024), "stdout");
    let stderr = output.stderr.clone();
    let line_end = stderr
        .windows(6)
        .position(|w| w == b"ferry:")
        .unwrap_or(stderr.len());
    let text = String::from_utf8_lossy(&stderr);
    for (name, full) in [("stdout", &out), ("stderr", &err)] {
        let dropped = full.len() - 64 * 1024;
        assert!(
            text.contains(&format!("ferry: {name}: {dropped} bytes dropped")),
            "{name}: {text}"
        );
    }
    assert_eq!(&stderr[..line_end], &kept(&err, 64 * 1024)[..], "stderr");
}

pub fn argv_as_large_as_linux_takes(fixture: &Fixture) {
    let client = fixture.client();
    let many: Vec<String> = (0..20_000).map(|i| format!("{i:020}")).collect();
    let mut command = Command::new("printf");
    command.arg("%s\\n").args(&many);
    let output = client.output(&command).unwrap();
    assert!(output.success(), "{:?}", output.status);
    let expected: String = many.iter().map(|a| format!("{a}\n")).collect();
    assert!(
        output.stdout == expected.as_bytes(),
        "20000 arguments differ"
    );
    let big = "x".repeat(100 * 1024);
    let output = client
        .output(Command::new("printf").arg("%s\\n").arg(&big))
        .unwrap();
    assert!(output.success(), "{:?}", output.status);
    assert_eq!(output.stdout.len(), big.len() + 1);
    assert!(output.stdout.starts_with(big.as_bytes()));
}
