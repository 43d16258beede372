//! Keep-alive connections (protocol 5) against the shipped agent: a `Client`'s pool reuses a
//! connection (the connection process is the command's parent, `$PPID`), copes with the agent's
//! idle close and a killed connection process, never reuses an exec dropped midway, and many
//! operations on one connection leave its process's descriptors and memory flat.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::time::Duration;

use common::Agent;
use ferry_host::{Client, Command};

/// The pid of the connection process that ran this command (its parent).
fn connection_pid(client: &Client) -> u32 {
    let output = client
        .output(Command::new("sh").args(["-c", "echo $PPID"]))
        .expect("exec");
    assert_eq!(output.status, ferry_host::ExitStatus::Code(0), "{output:?}");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("a pid")
}

fn status_field(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let line = status
        .lines()
        .find(|line| line.starts_with(field))
        .expect("the field");
    line.split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("a number")
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .count()
}

#[test]
fn output_in_a_loop_pays_the_handshake_once() {
    let agent = Agent::start();
    let client = agent.client();
    let first = connection_pid(&client);
    for _ in 0..20 {
        assert_eq!(connection_pid(&client), first, "one connection for all");
    }
    // Other operations go through it too.
    client.kill_all().ok();
    client.info().expect("info");
    assert_eq!(connection_pid(&client), first);
}

/// 1000 execs on one connection: the connection process's descriptors and resident memory
/// stay flat (each operation releases what it held).
#[test]
fn a_thousand_execs_leave_the_connection_process_flat() {
    let agent = Agent::start();
    let client = agent.client();
    let pid = connection_pid(&client);
    for _ in 0..50 {
        client.output(&Command::new("true")).expect("exec");
    }
    // Measured while it waits for a request (it prepares the next one after the last answer).
    std::thread::sleep(Duration::from_millis(100));
    let (fds, rss) = (fd_count(pid), status_field(pid, "VmRSS:"));
    for i in 0..1000 {
        let mut command = match i % 4 {
            0 => Command::new("true"),
            1 => Command::new("sh"),
            2 => Command::new("cat"),
            _ => Command::new("no-such-program-here"),
        };
        match i % 4 {
            1 => {
                command.args(["-c", "echo out; echo err >&2"]);
            }
            2 => {
                command.stdin(ferry_host::Stdin::Bytes(b"some stdin".to_vec()));
            }
            _ => {}
        }
        let _ = client.output(&command);
    }
    assert_eq!(connection_pid(&client), pid, "still the same connection");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(fd_count(pid), fds, "descriptors");
    let grown = status_field(pid, "VmRSS:").saturating_sub(rss);
    assert!(grown < 256, "RSS grew by {grown} kB");
}

#[test]
fn the_agents_idle_close_is_no_error() {
    let agent = Agent::start_with(&["--set", "idle_timeout=1s"]);
    let client = agent.client();
    let first = connection_pid(&client);
    std::thread::sleep(Duration::from_millis(1300));
    // The agent closed the idle connection, silently: the next operation connects afresh.
    assert!(!common::children(agent.pid()).contains(&first));
    let second = connection_pid(&client);
    assert_ne!(first, second);
    // Within the deadline, reused.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(connection_pid(&client), second);
}

#[test]
fn idle_timeout_zero_is_a_connection_per_operation() {
    let agent = Agent::start_with(&["--set", "idle_timeout=0s"]);
    let client = agent.client();
    let pids: HashSet<u32> = (0..5).map(|_| connection_pid(&client)).collect();
    assert_eq!(pids.len(), 5);
}

#[test]
fn a_killed_connection_process_is_not_reused() {
    let agent = Agent::start();
    let client = agent.client();
    let first = connection_pid(&client);
    let killed = std::process::Command::new("kill")
        .args(["-9", &first.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    std::thread::sleep(Duration::from_millis(50));
    let second = connection_pid(&client);
    assert_ne!(first, second);
}

#[test]
fn an_exec_dropped_midway_is_not_reused() {
    let agent = Agent::start();
    let client = agent.client();
    let first = connection_pid(&client);
    let mut execution = client
        .spawn(Command::new("sh").args(["-c", "echo $PPID; sleep 10"]))
        .unwrap();
    let ppid = loop {
        if let Some(ferry_host::Event::Stdout(data)) = execution.next_event().unwrap() {
            break String::from_utf8_lossy(data).trim().parse::<u32>().unwrap();
        }
    };
    assert_eq!(ppid, first, "the idle connection carried the spawn");
    drop(execution);
    let next = connection_pid(&client);
    assert_ne!(next, first, "a connection dropped midway is closed");
}

#[test]
fn threads_share_the_pool() {
    let agent = Agent::start();
    let client = agent.client();
    let pids: Vec<u32> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..6)
            .map(|_| {
                let client = client.clone();
                scope.spawn(move || (0..30).map(|_| connection_pid(&client)).collect::<Vec<_>>())
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(pids.len(), 180);
    let distinct: HashSet<u32> = pids.into_iter().collect();
    // At most one connection per thread at a time, plus those the pool could not keep.
    assert!(distinct.len() < 60, "{} connections", distinct.len());
}

/// A client that sends garbage after a good operation gets the breach error, and the
/// connection closes.
#[test]
fn garbage_after_a_good_operation_is_a_breach() {
    use ferry_wire::session::{ClientAuth, ClientSession};
    use ferry_wire::{ErrorCode, ExecRequest, StdinMode, StrList};
    let agent = Agent::start();
    let mut stream = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let secret = common::secret_options().secret;
    let mut session = ClientSession::new(
        0,
        None,
        ClientAuth {
            nonce: [3; 32],
            secret,
        },
    );
    let mut inbox = Vec::new();
    let mut out = vec![0u8; 1 << 17];
    let mut read_event =
        |stream: &mut std::os::unix::net::UnixStream, session: &mut ClientSession| -> String {
            loop {
                let step = session
                    .handle_input(&inbox)
                    .map(|input| (input.consumed, format!("{:?}", input.event)));
                match step {
                    Ok((0, _)) => {}
                    Ok((consumed, text)) => {
                        inbox.drain(..consumed);
                        if text != "None" {
                            return text;
                        }
                        continue;
                    }
                    Err(_) => return "session error".into(),
                }
                let mut buf = [0u8; 4096];
                let n = stream.read(&mut buf).unwrap();
                if n == 0 {
                    return "eof".into();
                }
                inbox.extend_from_slice(&buf[..n]);
            }
        };
    assert!(read_event(&mut stream, &mut session).starts_with("Some(HelloAccepted"));
    let request = ExecRequest {
        argv: StrList::new(b"true\0"),
        env: StrList::new(b""),
        clean_env: false,
        cwd: None,
        stdin: StdinMode::Null,
        user: None,
        pty: None,
        timeout_ms: 0,
        kill_grace_ms: None,
        kill_tree_on_exit: false,
        max_output: 0,
    };
    let n = session.start_exec(&request, &mut out).unwrap();
    stream.write_all(&out[..n]).unwrap();
    let mut events = Vec::new();
    while !session.is_finished() {
        events.push(read_event(&mut stream, &mut session));
    }
    assert!(events.last().unwrap().contains("Exited"), "{events:?}");
    assert!(session.is_reusable());
    // A second operation on the same connection works.
    let n = session.start_exec(&request, &mut out).unwrap();
    stream.write_all(&out[..n]).unwrap();
    let mut events = Vec::new();
    while !session.is_finished() {
        events.push(read_event(&mut stream, &mut session));
    }
    assert!(events.last().unwrap().contains("Exited"), "{events:?}");
    // Then garbage: a frame that does not decode.
    stream.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    let (body, _) = ferry_wire::split_frame(&rest, ferry_wire::limits::MAX_FRAME_BODY)
        .unwrap()
        .expect("an error frame");
    match ferry_wire::decode_agent_frame(body).unwrap() {
        ferry_wire::AgentFrame::Error(err) => assert_eq!(err.code, ErrorCode::Malformed),
        other => panic!("{other:?}"),
    }
}

/// Job operations ride the pooled connection like the rest: a start, a listing, a wait, a
/// removal, a kill refused (the job ended) and an attachment, then an exec on the same
/// connection process.
#[test]
fn job_operations_keep_the_connection() {
    let agent = Agent::start();
    let client = agent.client();
    let first = connection_pid(&client);
    let started = client
        .start_job(
            Command::new("sh").args(["-c", "echo out; exit 4"]),
            Some("kept"),
        )
        .expect("start");
    assert_eq!(connection_pid(&client), first, "after a job's start");
    let end = client.job("kept").wait().expect("wait");
    assert_eq!(end.status, ferry_host::ExitStatus::Code(4));
    let listed = client.jobs(None).expect("jobs");
    assert!(listed.iter().any(|job| job.id == started.id), "{listed:?}");
    assert_eq!(connection_pid(&client), first, "after a wait and a listing");
    // Refused operations keep it too.
    assert!(
        client.job("kept").kill(None, None).is_err(),
        "the job ended"
    );
    assert_eq!(connection_pid(&client), first, "after a refused kill");
    assert!(client.job("no-such-job").wait().is_err());
    assert_eq!(connection_pid(&client), first, "after a refused wait");
    let attached = client
        .job(started.id.to_string())
        .attach(Default::default())
        .expect("attach")
        .collect()
        .expect("the replay");
    assert_eq!(attached.stdout, b"out\n");
    assert_eq!(connection_pid(&client), first, "after an attachment");
    client.job("kept").remove().expect("remove");
    assert_eq!(
        connection_pid(&client),
        first,
        "after refusals, an attachment, a removal"
    );
}
