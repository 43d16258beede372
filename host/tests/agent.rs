//! The shipped agent binary, driven through the library over its Unix-socket transport.
#![allow(clippy::unwrap_used)] // a test reports failure by panicking

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{children, status_kib, wait_group_gone, Agent};
use ferry_host::{Command, Error, ErrorCode, Event, ExitStatus, Stdin};
use ferry_wire::limits::{MAX_FRAME, MAX_FRAME_BODY};
use ferry_wire::{
    decode_agent_frame, encode_client_frame, split_frame, AgentFrame, ClientFrame, ClientHello,
};

fn sh(script: &str) -> Command {
    let mut command = Command::new("/bin/sh");
    command.arg("-c").arg(script);
    command
}

fn pattern(len: usize) -> Vec<u8> {
    // Every byte value, NUL and invalid UTF-8 included, in a sequence that exposes reordering.
    (0..len).map(|i| (i ^ (i >> 8) ^ (i >> 16)) as u8).collect()
}

#[test]
fn binary_output_is_byte_exact_on_both_streams() {
    let agent = Agent::start();
    let client = agent.client();
    let data = pattern(3 << 20);
    let mut command = sh("tee /dev/stderr");
    command.stdin(Stdin::Bytes(data.clone()));
    let output = client.output(&command).unwrap();
    assert_eq!(output.status, ExitStatus::Code(0));
    assert!(output.stdout == data, "stdout differs");
    assert!(output.stderr == data, "stderr differs");
    assert!(!output.output_dropped);
}

#[test]
fn streams_512_mib_with_bounded_agent_memory() {
    const TOTAL: u64 = 512 << 20;
    let agent = Agent::start();
    let client = agent.client();
    let agent_pid = agent.pid();
    let done = Arc::new(AtomicBool::new(false));
    let peak_kib = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (done, peak_kib) = (done.clone(), peak_kib.clone());
        thread::spawn(move || {
            // The connection process is a child of the listener; its high-water mark is what a
            // stream costs the guest.
            while !done.load(Ordering::Relaxed) {
                for pid in children(agent_pid) {
                    if let Some(hwm) = status_kib(pid, "VmHWM") {
                        peak_kib.fetch_max(hwm, Ordering::Relaxed);
                    }
                }
                thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let mut execution = client
        .spawn(Command::new("head").args(["-c", &TOTAL.to_string(), "/dev/zero"]))
        .unwrap();
    let mut received = 0u64;
    let end = loop {
        match execution.next_event().unwrap() {
            Some(Event::Stdout(data)) => {
                assert!(data.iter().all(|b| *b == 0));
                received += data.len() as u64;
            }
            Some(Event::Stderr(data)) => panic!("stderr: {:?}", String::from_utf8_lossy(data)),
            Some(Event::Exited(end)) => break end,
            None => panic!("no termination record"),
        }
    };
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    assert_eq!(received, TOTAL);
    assert!(end.success());
    let peak = peak_kib.load(Ordering::Relaxed);
    assert!(peak > 0, "never sampled the connection process");
    // 512 MiB went through; the agent's side held at most a few frames and pipe buffers.
    assert!(peak <= 2048, "connection process peaked at {peak} KiB");
    assert!(status_kib(agent_pid, "VmHWM").unwrap() <= 1024);
}

#[test]
fn stdin_streams_concurrently_with_output() {
    let agent = Agent::start();
    let client = agent.client();
    let data = pattern(16 << 20);
    let mut command = Command::new("cat");
    command.stdin(Stdin::Pipe);
    let mut execution = client.spawn(&command).unwrap();
    let mut writer = execution.take_stdin().unwrap();
    let sent = data.clone();
    let feeder = thread::spawn(move || {
        // Odd-sized writes, so frames and credit never line up with anything.
        for chunk in sent.chunks(7919) {
            writer.write_all(chunk).unwrap();
        }
        writer.close().unwrap();
    });
    let mut echoed = Vec::with_capacity(data.len());
    let end = loop {
        match execution.next_event().unwrap() {
            Some(Event::Stdout(chunk)) => echoed.extend_from_slice(chunk),
            Some(Event::Stderr(chunk)) => panic!("{:?}", String::from_utf8_lossy(chunk)),
            Some(Event::Exited(end)) => break end,
            None => unreachable!(),
        }
    };
    feeder.join().unwrap();
    assert!(end.success());
    assert!(echoed == data, "echo differs");
}

#[test]
fn stdin_is_null_unless_asked_and_eof_is_delivered() {
    let agent = Agent::start();
    let client = agent.client();
    let output = client.output(&Command::new("cat")).unwrap();
    assert!(output.success() && output.stdout.is_empty());

    let mut command = Command::new("wc");
    command.arg("-c").stdin(Stdin::Bytes(Vec::new()));
    assert_eq!(client.output(&command).unwrap().stdout, b"0\n");

    // A command that never reads stdin still finishes, and the writer learns it ended.
    let mut command = Command::new("true");
    command.stdin(Stdin::Bytes(vec![0; 1 << 20]));
    assert!(client.output(&command).unwrap().success());
}

#[test]
fn exit_codes_and_signal_deaths_are_exact() {
    let agent = Agent::start();
    let client = agent.client();
    for code in [0u8, 1, 2, 126, 127, 128, 255] {
        let output = client.output(&sh(&format!("exit {code}"))).unwrap();
        assert_eq!(output.status, ExitStatus::Code(code));
        assert_eq!(output.status.shell_code(), code);
    }
    for (signal, number) in [("TERM", 15u8), ("KILL", 9), ("INT", 2), ("USR1", 10)] {
        let output = client.output(&sh(&format!("kill -{signal} $$"))).unwrap();
        assert_eq!(
            output.status,
            ExitStatus::Signal {
                number,
                core_dumped: false
            },
            "{signal}"
        );
        assert_eq!(output.status.shell_code(), 128 + number);
    }
    // A core dump is reported as such when the kernel writes one (core_pattern permitting).
    // In a scratch directory: a core file must not land in the source tree.
    let mut segv = sh("ulimit -c unlimited 2>/dev/null; kill -SEGV $$");
    segv.current_dir(agent.socket.parent().unwrap());
    let output = client.output(&segv).unwrap();
    assert!(matches!(
        output.status,
        ExitStatus::Signal { number: 11, .. }
    ));
    // Duration is measured by the guest's monotonic clock.
    let output = client.output(&sh("sleep 0.3")).unwrap();
    assert!(
        output.duration >= Duration::from_millis(290),
        "{:?}",
        output.duration
    );
    assert!(
        output.duration < Duration::from_secs(5),
        "{:?}",
        output.duration
    );
}

#[test]
fn env_and_cwd() {
    let agent = Agent::start();
    let client = agent.client();
    let mut command = Command::new("env");
    command
        .env("FERRY_TEST", "a b=c\u{e9}")
        .env("PATH", "/usr/bin:/bin");
    let output = client.output(&command).unwrap();
    let env = String::from_utf8(output.stdout).unwrap();
    assert!(env.lines().any(|l| l == "FERRY_TEST=a b=c\u{e9}"), "{env}");
    assert!(env.lines().any(|l| l == "PATH=/usr/bin:/bin"), "{env}");
    // Inherited: the agent's own environment is there too.
    assert!(env.lines().count() > 2, "{env}");

    let mut command = Command::new("/usr/bin/env");
    command.env_clear().env("ONLY", "1");
    let output = client.output(&command).unwrap();
    assert_eq!(output.stdout, b"ONLY=1\n");

    let dir = std::env::temp_dir().canonicalize().unwrap();
    let mut command = Command::new("pwd");
    command.current_dir(&dir);
    let output = client.output(&command).unwrap();
    assert_eq!(output.stdout, format!("{}\n", dir.display()).as_bytes());
}

#[test]
fn start_failures_name_their_cause() {
    let agent = Agent::start();
    let client = agent.client();
    let scratch = agent.socket.parent().unwrap().to_path_buf();
    let not_exec = scratch.join("not-executable");
    std::fs::write(&not_exec, "#!/bin/sh\necho hi\n").unwrap();
    let bad_format = scratch.join("bad-format");
    std::fs::write(&bad_format, [0x7f, b'E', b'L', b'F', 0, 0, 0, 0]).unwrap();
    std::fs::set_permissions(&bad_format, std::fs::Permissions::from_mode(0o755)).unwrap();

    let cases = [
        (
            Command::new("no-such-program-ferry"),
            ErrorCode::NotFound,
            2,
        ),
        (Command::new("/no/such/path"), ErrorCode::NotFound, 2),
        (Command::new(&not_exec), ErrorCode::PermissionDenied, 13),
        (Command::new(&scratch), ErrorCode::PermissionDenied, 13),
        (Command::new(&bad_format), ErrorCode::ExecFormat, 8),
        (
            {
                let mut c = Command::new("true");
                c.current_dir("/no/such/dir");
                c
            },
            ErrorCode::BadCwd,
            2,
        ),
    ];
    for (command, code, errno) in cases {
        match client.output(&command) {
            Err(Error::Remote(remote)) => {
                assert_eq!(remote.code, code, "{command:?}");
                assert_eq!(remote.errno, Some(errno), "{command:?}");
            }
            other => panic!("{command:?}: {other:?}"),
        }
    }
    // Refused locally, before anything is sent.
    assert!(matches!(
        client.output(&Command::new("a\0b")),
        Err(Error::InvalidRequest(_))
    ));
}

#[test]
fn disconnect_kills_the_whole_group_and_leaves_no_zombie() {
    let agent = Agent::start();
    let client = agent.client();
    // Children, a grandchild in the background, and a shell that ignores SIGTERM/SIGHUP.
    let mut execution = client
        .spawn(&sh(
            "trap '' TERM HUP; sleep 1000 & (sleep 1000 &); echo up; wait",
        ))
        .unwrap();
    let pgid = execution.pid();
    match execution.next_event().unwrap() {
        Some(Event::Stdout(b"up\n")) => {}
        other => panic!("{other:?}"),
    }
    let members = common::group_members(pgid);
    assert!(members.len() >= 3, "{members:?}");
    drop(execution);
    if let Err(left) = wait_group_gone(pgid, Duration::from_secs(5)) {
        panic!("processes left in group {pgid}: {left:?}");
    }
}

#[test]
fn a_daemonized_child_holding_stdout_does_not_hang_the_exec() {
    let agent = Agent::start();
    let client = agent.client();
    let started = Instant::now();
    let output = client.output(&sh("(sleep 30 &); echo main done")).unwrap();
    let elapsed = started.elapsed();
    assert!(output.success());
    assert_eq!(output.stdout, b"main done\n");
    assert!(elapsed < Duration::from_secs(5), "exec took {elapsed:?}");
    // Clean up the sleeper, still in the command's group.
    let _ = std::process::Command::new("kill")
        .args(["-9", "--", &format!("-{}", output.pid)])
        .status();
}

#[test]
fn a_daemon_that_keeps_writing_is_cut_off() {
    let agent = Agent::start();
    let client = agent.client();
    let started = Instant::now();
    let output = client.output(&sh("(yes &); echo main done")).unwrap();
    assert!(output.success());
    assert!(started.elapsed() < Duration::from_secs(20));
    // Cut off once 4 MiB has been forwarded after the shell exited (plus one chunk, and what
    // arrived before the exit was seen).
    let len = output.stdout.len();
    assert!(
        len < 16 << 20,
        "{len} bytes: the daemon was not cut off at 4 MiB"
    );
    // `yes` never stops, so the cut reaches the drain limit and says so.
    assert!(output.output_dropped, "{len} bytes, none reported dropped");
    assert!(len > 4 << 20, "cut off after only {len} bytes");
    let _ = std::process::Command::new("kill")
        .args(["-9", "--", &format!("-{}", output.pid)])
        .status();
}

#[test]
fn sixty_four_concurrent_execs() {
    let agent = Agent::start();
    let client = agent.client();
    let started = Instant::now();
    let results: Vec<_> = (0..64)
        .map(|i| {
            let client = client.clone();
            thread::spawn(move || {
                // Each one lives long enough that all 64 overlap.
                let output = client
                    .output(&sh(&format!(
                        "sleep 0.5; echo {i}; echo e{i} >&2; exit {}",
                        i % 7
                    )))
                    .unwrap();
                (i, output)
            })
        })
        .collect();
    for handle in results {
        let (i, output) = handle.join().unwrap();
        assert_eq!(output.stdout, format!("{i}\n").as_bytes());
        assert_eq!(output.stderr, format!("e{i}\n").as_bytes());
        assert_eq!(output.status, ExitStatus::Code((i % 7) as u8));
    }
    // Run side by side, not one after another (64 × 0.5 s).
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

/// Raw bytes to a fresh connection; returns the agent's first frame (if any) before it closed.
fn raw_exchange(agent: &Agent, bytes: &[u8], hello_first: bool) -> Option<AgentFrame<'static>> {
    let mut stream = UnixStream::connect(&agent.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = vec![0u8; MAX_FRAME];
    if hello_first {
        let n = encode_client_frame(&ClientFrame::Hello(ClientHello::CURRENT), &mut buf).unwrap();
        stream.write_all(&buf[..n]).unwrap();
    }
    // The agent may close before reading everything: a failed write is an answer too.
    let _ = stream.write_all(bytes);
    let mut received = Vec::new();
    // Read to EOF: the agent must close after refusing (a timeout here fails the test).
    read_until_closed(&mut stream, &mut received);
    let mut frames = Vec::new();
    let mut rest = &received[..];
    while let Ok(Some((body, used))) = split_frame(rest, MAX_FRAME_BODY) {
        let body: &'static [u8] = Box::leak(body.to_vec().into_boxed_slice());
        frames.push(decode_agent_frame(body).expect("agent sent an undecodable frame"));
        rest = &rest[used..];
    }
    assert!(rest.is_empty(), "trailing partial frame");
    let skip = usize::from(hello_first);
    frames.into_iter().nth(skip)
}

/// Reads until the agent closes. A reset counts as closed: the agent hung up with our unread
/// bytes in its buffer, and what it sent before that is still delivered first.
fn read_until_closed(stream: &mut UnixStream, into: &mut Vec<u8>) {
    match stream.read_to_end(into) {
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(err) => panic!("agent neither answered nor closed: {err}"),
    }
}

fn error_code(frame: Option<AgentFrame<'_>>) -> Option<ErrorCode> {
    match frame {
        Some(AgentFrame::Error(err)) => Some(err.code),
        None => None,
        Some(other) => panic!("expected an error frame, got {other:?}"),
    }
}

#[test]
fn garbage_and_oversized_frames_are_refused_and_the_agent_keeps_serving() {
    let mut agent = Agent::start();
    let oversized = ((MAX_FRAME_BODY + 1) as u32).to_le_bytes();
    let mut exec_before_hello = vec![0u8; 256];
    let n = encode_client_frame(
        &ClientFrame::Exec(ferry_wire::ExecRequest {
            argv: ferry_wire::StrList::new(b"true\0"),
            env: ferry_wire::StrList::default(),
            clean_env: false,
            cwd: None,
            stdin: ferry_wire::StdinMode::Null,
        }),
        &mut exec_before_hello,
    )
    .unwrap();
    exec_before_hello.truncate(n);
    let bad_magic = {
        let mut buf = vec![0u8; 64];
        let hello = ClientHello {
            magic: *b"SSH-",
            ..ClientHello::CURRENT
        };
        let n = encode_client_frame(&ClientFrame::Hello(hello), &mut buf).unwrap();
        buf.truncate(n);
        buf
    };
    let future = {
        let mut buf = vec![0u8; 64];
        let hello = ClientHello {
            min_version: 50,
            max_version: 60,
            ..ClientHello::CURRENT
        };
        let n = encode_client_frame(&ClientFrame::Hello(hello), &mut buf).unwrap();
        buf.truncate(n);
        buf
    };
    let cases: Vec<(&str, Vec<u8>, bool, ErrorCode)> = vec![
        (
            "http request",
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            false,
            ErrorCode::FrameTooLarge,
        ),
        (
            "garbage hello",
            vec![3, 0, 0, 0, 0, 0xff, 0xff],
            false,
            ErrorCode::Malformed,
        ),
        (
            "oversized hello",
            oversized.to_vec(),
            false,
            ErrorCode::FrameTooLarge,
        ),
        (
            "huge length",
            vec![0xff; 4],
            false,
            ErrorCode::FrameTooLarge,
        ),
        (
            "exec before hello",
            exec_before_hello,
            false,
            ErrorCode::ProtocolViolation,
        ),
        (
            "wrong magic",
            bad_magic,
            false,
            ErrorCode::UnsupportedVersion,
        ),
        (
            "future version",
            future,
            false,
            ErrorCode::UnsupportedVersion,
        ),
        (
            "garbage request",
            vec![3, 0, 0, 0, 1, 0xff, 0xff],
            true,
            ErrorCode::Malformed,
        ),
        (
            "oversized request",
            oversized.to_vec(),
            true,
            ErrorCode::FrameTooLarge,
        ),
        (
            "stdin as request",
            vec![2, 0, 0, 0, 2, 0],
            true,
            ErrorCode::ProtocolViolation,
        ),
        (
            "empty argv",
            vec![6, 0, 0, 0, 1, 0, 0, 0, 0, 1],
            true,
            ErrorCode::InvalidRequest,
        ),
    ];
    for (name, bytes, hello_first, expected) in cases {
        let answer = error_code(raw_exchange(&agent, &bytes, hello_first));
        assert_eq!(answer, Some(expected), "{name}");
        assert!(agent.is_alive(), "{name} killed the agent");
    }
    // Random noise of many sizes: an error frame or a close, never a hang or a crash.
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for len in [1usize, 3, 4, 5, 17, 100, 4096, 70_000] {
        let noise: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        for hello_first in [false, true] {
            let mut stream = UnixStream::connect(&agent.socket).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(40)))
                .unwrap();
            if hello_first {
                let mut buf = [0u8; 64];
                let n = encode_client_frame(&ClientFrame::Hello(ClientHello::CURRENT), &mut buf)
                    .unwrap();
                stream.write_all(&buf[..n]).unwrap();
            }
            let _ = stream.write_all(&noise);
            // Short noise leaves the agent waiting for the rest of a frame: hang up, as a
            // client would, and the agent must notice.
            let _ = stream.shutdown(std::net::Shutdown::Write);
            read_until_closed(&mut stream, &mut Vec::new());
        }
        assert!(agent.is_alive());
    }
    // And it still serves.
    let output = agent.client().output(&Command::new("true")).unwrap();
    assert!(output.success());
}

#[test]
fn a_silent_client_delays_nobody() {
    let agent = Agent::start();
    // Connected, said nothing; another half-way through its hello.
    let _silent = UnixStream::connect(&agent.socket).unwrap();
    let mut partial = UnixStream::connect(&agent.socket).unwrap();
    partial.write_all(&[9, 0]).unwrap();
    // Answered hello, no request: its process waits for the request frame.
    let mut hello_only = UnixStream::connect(&agent.socket).unwrap();
    let mut buf = [0u8; 64];
    let n = encode_client_frame(&ClientFrame::Hello(ClientHello::CURRENT), &mut buf).unwrap();
    hello_only.write_all(&buf[..n]).unwrap();
    // A command that runs for a while, started by a connection that never reads.
    let client = agent.client();
    let _running = client.spawn(Command::new("sleep").arg("30")).unwrap();
    let started = Instant::now();
    for _ in 0..10 {
        assert!(client.output(&Command::new("true")).unwrap().success());
    }
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn health_reports_versions_and_limits() {
    let agent = Agent::start();
    let health = agent.client().health().unwrap();
    assert_eq!(health.info.protocol_version, ferry_wire::PROTOCOL_VERSION);
    assert_eq!(health.info.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(health.info.limits, ferry_wire::Limits::CURRENT);
}

#[test]
fn stopping_the_agent_leaves_no_spare_behind() {
    let agent = Agent::start();
    let deadline = Instant::now() + Duration::from_secs(10);
    let spares = loop {
        let spares = children(agent.pid());
        if spares.len() >= 2 {
            break spares;
        }
        assert!(
            Instant::now() < deadline,
            "spares: {spares:?}, expected two"
        );
        thread::sleep(Duration::from_millis(5));
    };
    // A connection in progress is served to its end; an idle spare dies with the listener.
    drop(agent);
    let deadline = Instant::now() + Duration::from_secs(5);
    for spare in spares {
        loop {
            match std::fs::read_to_string(format!("/proc/{spare}/stat")) {
                Err(_) => break,
                Ok(stat) if stat.contains(") Z") => break,
                Ok(_) => assert!(
                    Instant::now() < deadline,
                    "spare {spare} outlived the agent"
                ),
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}
