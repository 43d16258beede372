//! Bytes in and out through the blocking API: volume, memory bounds, what stdin is when none is
//! asked for. Byte exactness and stdin within credit are exec cases (`cases.rs`), checked through
//! every driver.

use std::time::Instant;

use ferry_host::{Command, Event, Stdin};

use super::{parse_stat, sh, status_kib, stdout_of, Fixture};

pub fn bulk_output_streams_with_bounded_agent_memory(fixture: &Fixture) {
    let total = fixture.scale.bulk_bytes;
    let client = fixture.client();
    // dd with 64 KiB blocks (busybox `head -c` reads in small pieces and, under TCG, is itself
    // slower than the path being measured); then the command waits for the end of its stdin, so
    // the connection process is still there to be measured once everything has arrived.
    let mut command = sh(&format!(
        "dd if=/dev/zero bs=65536 count={} status=none && exec cat >/dev/null",
        total / 65536
    ));
    command.stdin(Stdin::Pipe);
    let started = Instant::now();
    let mut execution = client.spawn(&command).unwrap();
    let mut stdin = execution.take_stdin().unwrap();
    let pid = execution.pid();
    let mut received = 0u64;
    let mut peaks = None;
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
        if received == total && peaks.is_none() {
            // The high-water marks cover the whole stream: the connection process (the
            // command's parent) carried it, the listener must not have noticed it.
            let stat = stdout_of(
                &client,
                Command::new("cat").arg(format!("/proc/{pid}/stat")),
            );
            let connection = parse_stat(stat.trim_end()).unwrap().ppid;
            peaks = Some((
                status_kib(&client, connection, "VmHWM"),
                status_kib(&client, fixture.listener_pid, "VmHWM"),
            ));
            stdin.close().unwrap();
        }
    };
    let elapsed = started.elapsed();
    assert_eq!(received, total);
    assert!(end.success(), "{end:?}");
    eprintln!(
        "{} MiB in {:.2} s ({:.0} MB/s)",
        total >> 20,
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64() / 1e6
    );
    let (connection_kib, listener_kib) = peaks.unwrap();
    // The agent's side held at most a few frames and pipe buffers.
    assert!(
        connection_kib <= 2048,
        "connection process peaked at {connection_kib} KiB"
    );
    assert!(
        listener_kib <= 1024,
        "listener peaked at {listener_kib} KiB"
    );
}

pub fn stdin_is_null_unless_asked_and_eof_is_delivered(fixture: &Fixture) {
    let client = fixture.client();
    // No stdin unless asked: /dev/null, so `cat` ends at once.
    let output = client.output(&Command::new("cat")).unwrap();
    assert!(output.success() && output.stdout.is_empty());

    // An empty stdin is an EOF.
    let mut command = Command::new("wc");
    command.arg("-c").stdin(Stdin::Bytes(Vec::new()));
    assert_eq!(stdout_of(&client, &command).trim(), "0");

    // A command that never reads stdin still finishes, and the writer learns it ended.
    let mut command = Command::new("true");
    command.stdin(Stdin::Bytes(vec![0; 1 << 20]));
    assert!(client.output(&command).unwrap().success());
}
