//! Scenarios against the agent running as PID 1 in QEMU, over real virtio-vsock. Run by
//! `cargo xtask e2e`, which boots the guest once and passes its address in `FERRY_CONNECT`.
#![allow(clippy::unwrap_used)] // a test reports failure by panicking

use std::io::{Read, Write};
use std::thread;
use std::time::{Duration, Instant};

use ferry_host::{Command, ConnectOptions, Error, ErrorCode, Event, ExitStatus, Stdin};
use ferry_wire::limits::{MAX_FRAME, MAX_FRAME_BODY};
use ferry_wire::{
    decode_agent_frame, encode_client_frame, split_frame, AgentFrame, ClientFrame, ClientHello,
};
use qemu_tests::{
    client, guest_processes, guest_status_kib, pattern, sh, target, wait_guest_group_gone,
};

#[test]
fn exec_basics() {
    let client = client().unwrap();
    let health = client.health().unwrap();
    assert_eq!(health.info.protocol_version, ferry_wire::PROTOCOL_VERSION);

    let output = client.output(Command::new("uname").arg("-a")).unwrap();
    assert_eq!(output.status, ExitStatus::Code(0));
    let uname = String::from_utf8(output.stdout).unwrap();
    assert!(uname.starts_with("Linux "), "{uname}");
    assert!(output.stderr.is_empty());
    assert!(!output.output_dropped);

    // The agent is PID 1, and the command runs in a session of its own.
    let output = client
        .output(&sh(
            "cat /proc/1/cmdline | tr '\\0' ' '; echo; echo $$ $PPID",
        ))
        .unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    let mut lines = text.lines();
    assert!(lines.next().unwrap().starts_with("/init"), "{text}");
    let ids: Vec<u32> = lines
        .next()
        .unwrap()
        .split(' ')
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(ids[0], output.pid, "{text}");
    let processes = guest_processes(&client).unwrap();
    assert_eq!(processes[&1].pid, 1);

    // Environment and working directory.
    let mut command = Command::new("sh");
    command
        .args(["-c", "echo \"$FERRY_E2E\"; pwd"])
        .env("FERRY_E2E", "a b=c\u{e9}")
        .current_dir("/tmp");
    let output = client.output(&command).unwrap();
    assert_eq!(output.stdout, "a b=c\u{e9}\n/tmp\n".as_bytes());
    let mut command = Command::new("env");
    command.env_clear().env("ONLY", "1");
    assert_eq!(client.output(&command).unwrap().stdout, b"ONLY=1\n");

    // Start failures are typed, never a fake exit code.
    match client.output(&Command::new("no-such-program-ferry")) {
        Err(Error::Remote(remote)) => assert_eq!(remote.code, ErrorCode::NotFound),
        other => panic!("{other:?}"),
    }
    let mut command = Command::new("true");
    command.current_dir("/no/such/dir");
    match client.output(&command) {
        Err(Error::Remote(remote)) => assert_eq!(remote.code, ErrorCode::BadCwd),
        other => panic!("{other:?}"),
    }
}

#[test]
fn streams_256_mib_byte_exact_with_bounded_agent_memory() {
    const TOTAL: u64 = 256 << 20;
    let client = client().unwrap();
    let started = Instant::now();
    // dd with 64 KiB blocks: busybox `head -c` reads in small pieces and, under TCG, is itself
    // slower than the path being measured.
    let mut execution = client
        .spawn(Command::new("dd").args([
            "if=/dev/zero",
            "bs=65536",
            &format!("count={}", TOTAL / 65536),
            "status=none",
        ]))
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
    let elapsed = started.elapsed();
    assert_eq!(received, TOTAL);
    assert!(end.success(), "{end:?}");
    eprintln!(
        "256 MiB over virtio-vsock in {:.2} s ({:.0} MB/s)",
        elapsed.as_secs_f64(),
        TOTAL as f64 / elapsed.as_secs_f64() / 1e6
    );

    // Binary data, both streams, byte for byte.
    let data = pattern(2 << 20);
    let mut command = sh("tee /dev/stderr");
    command.stdin(Stdin::Bytes(data.clone()));
    let output = client.output(&command).unwrap();
    assert!(output.success());
    assert!(output.stdout == data, "stdout differs");
    assert!(output.stderr == data, "stderr differs");

    // PID 1 never held the stream: its high-water mark stays that of an idle agent.
    let hwm = guest_status_kib(&client, 1, "VmHWM").unwrap();
    assert!(hwm <= 1024, "PID 1 peaked at {hwm} KiB");
}

#[test]
fn stdin_round_trip() {
    let client = client().unwrap();
    let data = pattern(8 << 20);
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
            None => panic!("no termination record"),
        }
    };
    feeder.join().unwrap();
    assert!(end.success());
    assert!(echoed == data, "echo differs");

    // No stdin unless asked: /dev/null, so `cat` ends at once.
    let output = client.output(&Command::new("cat")).unwrap();
    assert!(output.success() && output.stdout.is_empty());
    // An empty stdin is an EOF.
    let mut command = Command::new("wc");
    command.arg("-c").stdin(Stdin::Bytes(Vec::new()));
    assert_eq!(
        String::from_utf8(client.output(&command).unwrap().stdout)
            .unwrap()
            .trim(),
        "0"
    );
}

#[test]
fn exit_codes_and_signal_deaths() {
    let client = client().unwrap();
    for code in [0u8, 1, 2, 126, 127, 128, 255] {
        let output = client.output(&sh(&format!("exit {code}"))).unwrap();
        assert_eq!(output.status, ExitStatus::Code(code));
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
    // Duration comes from the guest's monotonic clock.
    let output = client.output(&sh("sleep 0.3")).unwrap();
    assert!(
        output.duration >= Duration::from_millis(290),
        "{:?}",
        output.duration
    );
}

#[test]
fn disconnect_kills_the_whole_group() {
    let client = client().unwrap();
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
    let members: Vec<_> = guest_processes(&client)
        .unwrap()
        .into_values()
        .filter(|p| p.pgid == pgid)
        .collect();
    assert!(members.len() >= 3, "{members:?}");
    drop(execution);
    // Killed and reaped by PID 1: no survivor and no zombie.
    wait_guest_group_gone(&client, pgid, Duration::from_secs(10)).unwrap();
}

#[test]
fn sixteen_concurrent_execs() {
    let client = client().unwrap();
    let started = Instant::now();
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let client = client.clone();
            thread::spawn(move || {
                let output = client
                    .output(&sh(&format!(
                        "sleep 1; echo {i}; echo e{i} >&2; exit {}",
                        i % 7
                    )))
                    .unwrap();
                (i, output)
            })
        })
        .collect();
    for handle in handles {
        let (i, output) = handle.join().unwrap();
        assert_eq!(output.stdout, format!("{i}\n").as_bytes());
        assert_eq!(output.stderr, format!("e{i}\n").as_bytes());
        assert_eq!(output.status, ExitStatus::Code((i % 7) as u8));
    }
    // Side by side, not one after another (16 × 1 s).
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "{:?}",
        started.elapsed()
    );
}

/// Sends raw bytes on a fresh connection (after a hello if asked), hangs up if asked, and
/// returns the agent's first frame after its hello, if any, once it has closed the connection.
fn raw_exchange(
    name: &str,
    bytes: &[u8],
    hello_first: bool,
    hang_up: bool,
) -> Option<AgentFrame<'static>> {
    let mut stream = target()
        .unwrap()
        .open_stream(&ConnectOptions::default())
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.set_write_timeout(None).unwrap();
    let mut buf = vec![0u8; MAX_FRAME];
    if hello_first {
        let n = encode_client_frame(&ClientFrame::Hello(ClientHello::CURRENT), &mut buf).unwrap();
        stream.write_all(&buf[..n]).unwrap();
    }
    // The agent may close before reading everything: a failed write is an answer too.
    let _ = stream.write_all(bytes);
    if hang_up {
        // Short input leaves the agent waiting for the rest of a frame: hang up, as a client
        // would, and the agent must notice through the VMM's socket and the guest's vsock.
        // (vhost-device-vsock turns a half-close into a full one, so an answer may be lost.)
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
    let mut received = Vec::new();
    match stream.read_to_end(&mut received) {
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(err) => panic!("{name}: the agent neither answered nor closed: {err}"),
    }
    let mut frames = Vec::new();
    let mut rest = &received[..];
    while let Ok(Some((body, used))) = split_frame(rest, MAX_FRAME_BODY) {
        let body: &'static [u8] = Box::leak(body.to_vec().into_boxed_slice());
        frames.push(decode_agent_frame(body).expect("the agent sent an undecodable frame"));
        rest = &rest[used..];
    }
    frames.into_iter().nth(usize::from(hello_first))
}

#[test]
fn garbage_input_is_survived() {
    let client = client().unwrap();
    let before = client.health().unwrap();
    let cases: [(&str, Vec<u8>, bool, Option<ErrorCode>); 5] = [
        (
            "http request",
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            false,
            Some(ErrorCode::FrameTooLarge),
        ),
        (
            "garbage hello",
            vec![3, 0, 0, 0, 0, 0xff, 0xff],
            false,
            Some(ErrorCode::Malformed),
        ),
        (
            "huge length",
            vec![0xff; 4],
            false,
            Some(ErrorCode::FrameTooLarge),
        ),
        (
            "garbage request",
            vec![3, 0, 0, 0, 1, 0xff, 0xff],
            true,
            Some(ErrorCode::Malformed),
        ),
        (
            "oversized request",
            ((MAX_FRAME_BODY + 1) as u32).to_le_bytes().to_vec(),
            true,
            Some(ErrorCode::FrameTooLarge),
        ),
    ];
    for (name, bytes, hello_first, expected) in cases {
        let answer = match raw_exchange(name, &bytes, hello_first, false) {
            Some(AgentFrame::Error(err)) => Some(err.code),
            None => None,
            Some(other) => panic!("{name}: expected an error frame, got {other:?}"),
        };
        assert_eq!(answer, expected, "{name}");
    }
    // Noise of many sizes: an error frame or a close, never a hang.
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for len in [1usize, 5, 100, 4096, 70_000] {
        let noise: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let _ = raw_exchange(&format!("{len} bytes of noise"), &noise, len % 2 == 0, true);
    }
    // A client that connects and goes silent delays nobody.
    let silent = target()
        .unwrap()
        .open_stream(&ConnectOptions::default())
        .unwrap();
    let output = client
        .output(Command::new("echo").arg("still here"))
        .unwrap();
    assert_eq!(output.stdout, b"still here\n");
    drop(silent);
    // The same agent, still PID 1, still serving.
    let after = client.health().unwrap();
    assert_eq!(before.info, after.info);
    let processes = guest_processes(&client).unwrap();
    assert!(processes[&1].state != 'Z');
}
