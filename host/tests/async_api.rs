//! The async API (`--features tokio`) against the shipped agent binary on a Unix socket: what
//! only async has (borrowed events and a `Stream`, an `AsyncRead`, an `AsyncWrite` that waits for
//! credit, stdin from another task, cancellation by dropping a future, many execs on one thread,
//! connect, handshake and authentication failures, kill-all). The exec cases every driver passes (byte-exact output,
//! stdin, exit codes, signal deaths, start failures, local refusals) run through the async API
//! in the shared suite: `host/tests/agent.rs` here, `cargo xtask e2e` in QEMU.
#![allow(clippy::unwrap_used)] // a test reports failure by panicking

mod common;

use std::future::poll_fn;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::time::{Duration, Instant};

use common::{group_members, wait_group_gone, Agent};
use ferry_host::tokio::{Client, Execution, OutputStreams, OwnedEvent};
use ferry_host::{Command, ConnectOptions, Error, Event, ExitStatus, Stdin, Target};
use ferry_wire::limits::STDIN_WINDOW;
use futures_core::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

fn sh(script: &str) -> Command {
    let mut command = Command::new("/bin/sh");
    command.arg("-c").arg(script);
    command
}

fn pattern(len: usize) -> Vec<u8> {
    // Every byte value, NUL and invalid UTF-8 included, in a sequence that exposes reordering.
    (0..len).map(|i| (i ^ (i >> 8) ^ (i >> 16)) as u8).collect()
}

async fn client(agent: &Agent) -> Client {
    Client::connect_with(&agent.target(), agent.connect_options())
        .await
        .unwrap()
}

async fn next_owned(execution: &mut Execution) -> Option<Result<OwnedEvent, Error>> {
    poll_fn(|cx| Pin::new(&mut *execution).poll_next(cx)).await
}

#[tokio::test]
async fn health_reports_versions_and_limits() {
    let agent = Agent::start();
    let health = client(&agent).await.health().await.unwrap();
    assert_eq!(health.info.protocol_version, ferry_wire::PROTOCOL_VERSION);
    assert!(!health.info.agent_version.is_empty());
    assert_eq!(
        health.info.limits.stdin_window as usize,
        ferry_wire::limits::STDIN_WINDOW
    );
}

#[tokio::test]
async fn events_borrowed_and_as_a_stream() {
    let agent = Agent::start();
    let client = client(&agent).await;
    let script = "printf 'out\\000\\377'; printf err >&2; exit 3";

    // Borrowed from the receive buffer, zero-copy.
    let mut execution = client.spawn(&sh(script)).await.unwrap();
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let end = loop {
        match execution.next_event().await.unwrap() {
            Some(Event::Stdout(data)) => stdout.extend_from_slice(data),
            Some(Event::Stderr(data)) => stderr.extend_from_slice(data),
            Some(Event::Exited(end)) => break end,
            None => panic!("no termination record"),
        }
    };
    assert_eq!(
        (stdout.as_slice(), stderr.as_slice()),
        (&b"out\0\xff"[..], &b"err"[..])
    );
    assert_eq!(end.status, ExitStatus::Code(3));
    assert!(execution.next_event().await.unwrap().is_none());

    // Owned, through `Stream`.
    let mut execution = client.spawn(&sh(script)).await.unwrap();
    let mut events = Vec::new();
    while let Some(event) = next_owned(&mut execution).await {
        events.push(event.unwrap());
    }
    let stdout: Vec<u8> = events
        .iter()
        .filter_map(|e| match e {
            OwnedEvent::Stdout(data) => Some(data.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(stdout, b"out\0\xff");
    match events.last() {
        Some(OwnedEvent::Exited(end)) => assert_eq!(end.status, ExitStatus::Code(3)),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn output_as_async_read() {
    let agent = Agent::start();
    let client = client(&agent).await;
    let data = pattern(5 << 20);
    let mut command = sh("cat; echo noise >&2; exit 7");
    command.stdin(Stdin::Bytes(data.clone()));
    let mut reader = client
        .spawn(&command)
        .await
        .unwrap()
        .into_reader(OutputStreams::Stdout);
    let mut read = Vec::new();
    // Small reads: chunks are handed out in pieces.
    let mut buf = [0u8; 1000];
    loop {
        let n = reader.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        read.extend_from_slice(&buf[..n]);
    }
    assert!(read == data, "stdout differs");
    assert_eq!(reader.termination().unwrap().status, ExitStatus::Code(7));

    let mut reader = client
        .spawn(&sh("echo out; echo err >&2"))
        .await
        .unwrap()
        .into_reader(OutputStreams::Stderr);
    let mut read = Vec::new();
    reader.read_to_end(&mut read).await.unwrap();
    assert_eq!(read, b"err\n");
    assert!(reader.termination().unwrap().success());
}

#[tokio::test]
async fn a_write_after_the_end_is_a_broken_pipe() {
    let agent = Agent::start();
    let client = client(&agent).await;
    let mut command = Command::new("head");
    command.args(["-c", "3"]).stdin(Stdin::Pipe);
    let mut execution = client.spawn(&command).await.unwrap();
    let mut writer = execution.take_stdin().unwrap();
    writer.write_all(b"abc").await.unwrap();
    // Not closed: the command ends by itself.
    let output = execution.collect().await.unwrap();
    assert!(output.success());
    assert_eq!(output.stdout, b"abc");
    let err = writer.write_all(b"late").await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_from_another_task() {
    let agent = Agent::start();
    let client = client(&agent).await;
    let data = pattern(3 << 20);
    let mut command = sh("wc -c; cat >/dev/null");
    command.stdin(Stdin::Pipe);
    let mut execution = client.spawn(&command).await.unwrap();
    let mut writer = execution.take_stdin().unwrap();
    let sent = data.clone();
    let feeder = tokio::spawn(async move {
        writer.write_all(&sent).await.unwrap();
        // Dropped without shutdown: dropping sends EOF too.
    });
    let output = execution.collect().await.unwrap();
    feeder.await.unwrap();
    assert!(output.success());
    assert_eq!(output.stdout, format!("{}\n", data.len()).as_bytes());
}

#[tokio::test]
async fn stdin_waits_for_credit() {
    let agent = Agent::start();
    let client = client(&agent).await;
    // It never reads stdin: only the agent's window and the pipe can take bytes.
    let mut command = Command::new("sleep");
    command.arg("30").stdin(Stdin::Pipe);
    let mut execution = client.spawn(&command).await.unwrap();
    let pgid = execution.pid();
    let mut writer = execution.take_stdin().unwrap();
    let chunk = vec![7u8; 16 * 1024];
    let mut accepted = 0usize;
    let write = async {
        loop {
            accepted += writer.write(&chunk).await.unwrap();
        }
    };
    tokio::select! {
        _ = write => unreachable!(),
        event = execution.next_event() => panic!("{:?}", event.map(|e| e.map(OwnedEvent::from))),
        _ = tokio::time::sleep(Duration::from_millis(700)) => {}
    }
    // Credit bounds what is in flight: the agent's window plus what its pipe to the command
    // holds (64 KiB by default, at most 1 MiB with a raised pipe size).
    assert!(accepted >= STDIN_WINDOW, "only {accepted} bytes accepted");
    assert!(
        accepted <= STDIN_WINDOW + (1 << 20),
        "{accepted} bytes accepted"
    );
    drop(writer);
    drop(execution);
    wait_group_gone(pgid, Duration::from_secs(5)).unwrap();
}

#[tokio::test]
async fn dropping_an_execution_kills_the_whole_group() {
    let agent = Agent::start();
    let client = client(&agent).await;
    let mut execution = client
        .spawn(&sh(
            "trap '' TERM HUP; sleep 1000 & (sleep 1000 &); echo up; wait",
        ))
        .await
        .unwrap();
    let pgid = execution.pid();
    match execution.next_event().await.unwrap() {
        Some(Event::Stdout(b"up\n")) => {}
        other => panic!("{other:?}"),
    }
    assert!(group_members(pgid).len() >= 3);
    drop(execution);
    if let Err(left) = wait_group_gone(pgid, Duration::from_secs(5)) {
        panic!("processes left in group {pgid}: {left:?}");
    }
}

#[tokio::test]
async fn cancelling_a_future_cancels_the_command() {
    let agent = Agent::start();
    let client = client(&agent).await;
    let marker = agent.socket.parent().unwrap().join("pgid");
    let script = format!("echo $$ > {}; exec sleep 1000", marker.display());
    let started = Instant::now();
    let command = sh(&script);
    let cancelled = tokio::time::timeout(Duration::from_millis(500), client.output(&command));
    assert!(cancelled.await.is_err(), "the command finished?");
    assert!(started.elapsed() < Duration::from_secs(5));
    let pgid: u32 = std::fs::read_to_string(&marker)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    if let Err(left) = wait_group_gone(pgid, Duration::from_secs(5)) {
        panic!("processes left in group {pgid}: {left:?}");
    }
    // A dropped stdin writer does not keep the command alive either.
    let mut command = Command::new("cat");
    command.stdin(Stdin::Pipe);
    let mut execution = client.spawn(&command).await.unwrap();
    let pgid = execution.pid();
    let _writer = execution.take_stdin().unwrap();
    drop(execution);
    wait_group_gone(pgid, Duration::from_secs(5)).unwrap();
}

#[tokio::test]
async fn many_concurrent_execs_on_one_thread() {
    let agent = Agent::start();
    let client = client(&agent).await;
    let started = Instant::now();
    let runs = (0..32).map(|i| {
        let client = client.clone();
        async move {
            let script = format!("sleep 0.5; echo {i}; echo e{i} >&2; exit {}", i % 7);
            (i, client.output(&sh(&script)).await.unwrap())
        }
    });
    let mut handles = Vec::new();
    for run in runs {
        handles.push(tokio::spawn(run));
    }
    for handle in handles {
        let (i, output) = handle.await.unwrap();
        assert_eq!(output.stdout, format!("{i}\n").as_bytes());
        assert_eq!(output.stderr, format!("e{i}\n").as_bytes());
        assert_eq!(output.status, ExitStatus::Code((i % 7) as u8));
    }
    // Side by side on a current-thread runtime, not one after another (32 × 0.5 s).
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn a_silent_peer_times_out_at_the_hello() {
    let dir = scratch_dir("silent");
    let path = dir.join("silent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let target = Target::Unix(path);
    let options = ConnectOptions {
        connect_timeout: Duration::from_millis(300),
        ..ConnectOptions::default()
    };
    let accept = tokio::spawn(async move {
        // Accept and say nothing.
        let (stream, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        drop(stream);
    });
    let started = Instant::now();
    match Client::new(&target, options)
        .spawn(&Command::new("true"))
        .await
    {
        Err(Error::Io(err)) => assert_eq!(err.kind(), io::ErrorKind::TimedOut),
        other => panic!("{other:?}"),
    }
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(250), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    accept.abort();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn health_checks_the_agents_proof() {
    let agent = Agent::start();
    let health = client(&agent).await.health().await.unwrap();
    assert_eq!(health.info.security, ferry_host::Security::Authenticated);
}

#[tokio::test]
async fn authentication_failures_are_typed() {
    let agent = Agent::start();
    // No secret for an agent that requires one: nothing is sent.
    match Client::connect(&agent.target()).await {
        Err(Error::SecretRequired) => {}
        other => panic!("{other:?}"),
    }
    // Another secret: the agent refuses our proof.
    let other = ConnectOptions {
        secret: Some(ferry_host::Secret::new(b"not the agent's secret at all").unwrap()),
        ..ConnectOptions::default()
    };
    let client = Client::new(&agent.target(), other);
    for result in [
        client.health().await.map(drop),
        client.spawn(&Command::new("true")).await.map(drop),
        client.kill_all().await.map(drop),
    ] {
        match result {
            Err(Error::Unauthenticated(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    // An insecure agent cannot prove who it is: a client with a secret will not talk to it.
    let insecure = Agent::start_with(&["--insecure"]);
    match Client::connect_with(&insecure.target(), agent.connect_options()).await {
        Err(Error::AgentInsecure) => {}
        other => panic!("{other:?}"),
    }
    // Without a secret it will.
    let client = Client::connect(&insecure.target()).await.unwrap();
    let health = client.health().await.unwrap();
    assert_eq!(health.info.security, ferry_host::Security::Insecure);
    assert!(client
        .output(&Command::new("true"))
        .await
        .unwrap()
        .success());
}

#[tokio::test]
async fn kill_all_ends_or_is_unsupported() {
    let agent = Agent::start();
    let client = client(&agent).await;
    // An agent run as a service without a cgroup of its own refuses; one with signals all.
    match client.kill_all().await {
        Ok(_) => {}
        Err(err) => assert_eq!(
            err.remote_code(),
            Some(ferry_host::ErrorCode::Unsupported),
            "{err:?}"
        ),
    }
    // The agent still serves.
    assert!(client
        .output(&Command::new("true"))
        .await
        .unwrap()
        .success());
}

#[tokio::test]
async fn missing_socket_is_a_connect_error() {
    let target = Target::Unix("/nonexistent/ferry.sock".into());
    match Client::connect(&target).await {
        Err(Error::Connect { source, .. }) => assert_eq!(source.kind(), io::ErrorKind::NotFound),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn hybrid_vsock_handshake_then_the_agent() {
    let agent = Agent::start();
    let dir = scratch_dir("hvsock");
    let path = dir.join("vm.vsock");
    let listener = UnixListener::bind(&path).unwrap();
    let agent_socket = agent.socket.clone();
    // A fake VMM: refuses port 9, closes the first connection to port 1024 without a word (to
    // be retried), then answers `OK` and splices the rest to the agent.
    let vmm = tokio::spawn(async move {
        let mut first = true;
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let line = read_line(&mut stream).await;
            if line == "CONNECT 9" {
                stream.write_all(b"ERR no listener\n").await.unwrap();
                continue;
            }
            assert_eq!(line, "CONNECT 1024");
            if std::mem::take(&mut first) {
                continue;
            }
            stream.write_all(b"OK 1073741824\n").await.unwrap();
            let mut agent = UnixStream::connect(&agent_socket).await.unwrap();
            tokio::spawn(async move {
                let _ = tokio::io::copy_bidirectional(&mut stream, &mut agent).await;
            });
        }
    });
    let target: Target = format!("hvsock://{}:1024", path.display()).parse().unwrap();
    let client = Client::connect_with(&target, agent.connect_options())
        .await
        .unwrap();
    let output = client.output(&sh("echo via hvsock")).await.unwrap();
    assert_eq!(output.stdout, b"via hvsock\n");

    let refused: Target = format!("hvsock://{}:9", path.display()).parse().unwrap();
    match Client::connect(&refused).await {
        Err(Error::HvsockRefused { reply, .. }) => assert_eq!(reply, "ERR no listener"),
        other => panic!("{other:?}"),
    }
    vmm.abort();
    let _ = std::fs::remove_dir_all(dir);
}

async fn read_line(stream: &mut UnixStream) -> String {
    let mut line = Vec::new();
    loop {
        let byte = stream.read_u8().await.unwrap();
        if byte == b'\n' {
            return String::from_utf8(line).unwrap();
        }
        line.push(byte);
    }
}

fn scratch_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-async-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    assert!(Path::new(&dir).is_dir());
    dir
}

/// Protocol 3's controls from another task while this one reads the events: a cancel whose
/// grace is long, then one that brings the SIGKILL to now; the record says it was cancelled.
/// A timeout, and each chunk's time.
#[tokio::test]
async fn controls_from_another_task_timeouts_and_times() {
    let agent = Agent::start();
    let client = client(&agent).await;
    let mut execution = client
        .spawn(&sh("trap '' TERM; echo up; while :; do sleep 0.05; done"))
        .await
        .unwrap();
    assert_eq!(
        execution.next_event().await.unwrap(),
        Some(Event::Stdout(b"up\n"))
    );
    let controller = execution.controller();
    let canceller = tokio::spawn(async move {
        controller
            .cancel(Some(Duration::from_secs(60)))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        controller.cancel(Some(Duration::ZERO)).await.unwrap();
    });
    let started = Instant::now();
    let end = loop {
        match execution.next_event().await.unwrap() {
            Some(Event::Exited(end)) => break end,
            Some(_) => {}
            None => panic!("no record"),
        }
    };
    canceller.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(end.ending, ferry_host::Ending::Cancelled);
    assert_eq!(
        end.status,
        ExitStatus::Signal {
            number: 9,
            core_dumped: false
        }
    );
    // After the end: nothing to do, no error.
    execution.signal(15).await.unwrap();

    let mut command = Command::new("sleep");
    command.arg("100").timeout(Duration::from_millis(300));
    let output = client.output(&command).await.unwrap();
    assert_eq!(output.termination.ending, ferry_host::Ending::TimedOut);

    let mut execution = client
        .spawn(&sh("printf a; sleep 0.3; printf b"))
        .await
        .unwrap();
    assert_eq!(
        execution.next_event().await.unwrap(),
        Some(Event::Stdout(b"a"))
    );
    let first = execution.last_output_at();
    assert_eq!(
        execution.next_event().await.unwrap(),
        Some(Event::Stdout(b"b"))
    );
    assert!(execution.last_output_at() >= first + Duration::from_millis(250));
}
