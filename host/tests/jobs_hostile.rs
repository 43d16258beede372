//! Detached jobs and keep-alive connections attacked as a hostile user would, against the
//! shipped agent on its Unix socket (the harness is `jobs_agent.rs`'s).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::Agent;
use ferry_wire::{AttachRequest, Bytes, ErrorCode, ExecRequest, ExitStatus, StdinMode};

use common::jobs::*;

fn piped(argv: &[u8]) -> ExecRequest<'_> {
    ExecRequest {
        stdin: StdinMode::Pipe,
        ..exec(argv)
    }
}

/// Sends all the stdin credit the session has, in frames; how many bytes.
fn send_all_credit(c: &mut Conversation, byte: u8) -> usize {
    let mut sent = 0;
    loop {
        let credit = c.session.stdin_credit().min(16 * 1024);
        if credit == 0 {
            return sent;
        }
        c.send_stdin(&vec![byte; credit]);
        sent += credit;
    }
}

/// Attaches with `-i`: the conversation and whether stdin was granted.
fn attach_stdin(agent: &Agent, job: &str) -> (Conversation, bool) {
    let mut c = attach_with(agent, job, (0, 0), true, true);
    match c.next() {
        Some(Said::Attached(header)) => (c, header.stdin),
        other => panic!("no header: {other:?}"),
    }
}

/// Sends stdin as credit comes back until `total` bytes went; then closes it and returns the
/// rest of the conversation and the bytes sent.
fn feed(c: &mut Conversation, mut sent: usize, total: usize) -> (Vec<Said>, usize) {
    let mut said = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while sent < total && Instant::now() < deadline {
        match c.next() {
            Some(Said::Credit) => sent += send_all_credit(c, b'c'),
            Some(other) => {
                let end = matches!(other, Said::Exited(_) | Said::Refused(..));
                said.push(other);
                if end {
                    return (said, sent);
                }
            }
            None => return (said, sent),
        }
    }
    c.close_stdin();
    said.extend(c.all());
    (said, sent)
}

/// An attacher that held stdin filled its whole window and left; a next attacher given stdin
/// at once would fill its own whole window too, beyond the runner's (a breach: the job lost,
/// its tree killed). Stdin is granted anew only once the job consumed the bytes in flight.
#[test]
fn stdin_is_handed_over_only_once_the_bytes_in_flight_are_consumed() {
    let agent = insecure(&[]);
    let id = start_job(&agent, None, &piped(&sh("sleep 2; wc -c"))).unwrap();
    let job = id.to_string();
    let (mut first, granted) = attach_stdin(&agent, &job);
    assert!(granted);
    let a = send_all_credit(&mut first, b'a');
    assert!(a > 64 * 1024, "{a}: more than a pipe holds");
    std::thread::sleep(Duration::from_millis(300));
    drop(first);
    std::thread::sleep(Duration::from_millis(200));
    // The job has not read them yet: no stdin for the next one (it is told), and its window
    // could not overflow the runner's.
    let (second, granted) = attach_stdin(&agent, &job);
    assert!(
        !granted,
        "stdin granted while the last owner's bytes are in flight"
    );
    assert!(second.session.stdin_credit() == 0);
    drop(second);
    // Once the job consumed them, stdin is free again: all of it reaches the job.
    std::thread::sleep(Duration::from_millis(2500));
    let (mut third, granted) = attach_stdin(&agent, &job);
    assert!(granted, "stdin free again once consumed");
    let c = send_all_credit(&mut third, b'c');
    let (said, c) = feed(&mut third, c, 512 * 1024);
    let t = exited(&said);
    assert_eq!(t.status, ExitStatus::Code(0), "{said:?}");
    let count: usize = String::from_utf8(stream(&said, 0))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(count, a + c, "{said:?}");
}

/// An owner closed the job's stdin and left: a next owner's stdin would follow the EOF (a
/// breach of the runner's session: the job lost). Nobody is granted it again.
#[test]
fn stdin_closed_by_one_attacher_is_not_granted_again() {
    let agent = insecure(&[]);
    let id = start_job(&agent, None, &piped(&sh("cat; sleep 1; echo done"))).unwrap();
    let job = id.to_string();
    let (mut first, granted) = attach_stdin(&agent, &job);
    assert!(granted);
    first.send_stdin(b"hello\n");
    first.close_stdin();
    std::thread::sleep(Duration::from_millis(200));
    drop(first);
    std::thread::sleep(Duration::from_millis(200));
    let (mut second, granted) = attach_stdin(&agent, &job);
    assert!(!granted, "stdin granted after its EOF");
    let said = second.all();
    assert_eq!(exited(&said).status, ExitStatus::Code(0), "{said:?}");
    assert_eq!(stream(&said, 0), b"hello\ndone\n");
}

/// Sends `signal` to `pid`.
fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// The CLI with a bound: its output, and whether it ended within `within`.
fn ferry_within(agent: &Agent, args: &[&str], within: Duration) -> Option<std::process::Output> {
    let mut child = common::ferry(agent)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// A stopped supervisor: what does not need it is served; what does fails cleanly in a bound.
#[test]
fn a_stopped_supervisor_holds_up_nothing_but_job_operations() {
    let agent = Agent::start();
    let out = ferry_within(
        &agent,
        &["exec", "--detach", "--", "sleep", "30"],
        Duration::from_secs(10),
    )
    .unwrap();
    let id = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let sup = supervisor(&agent);
    signal(sup, "-STOP");
    let within = Duration::from_secs(5);
    let out = ferry_within(&agent, &["exec", "--", "/bin/echo", "hi"], within).expect("exec hung");
    assert_eq!(out.stdout, b"hi\n", "{out:?}");
    let out = ferry_within(&agent, &["info"], within).expect("info hung");
    assert!(out.status.success());
    // Each job operation fails, within the agent's answer bound (10 s) or the client's
    // liveness check (15 s), all at once.
    let job = id.as_str();
    let operations = [
        vec!["jobs"],
        vec!["kill", job],
        vec!["attach", job],
        vec!["exec", "--detach", "--", "/bin/true"],
    ];
    std::thread::scope(|scope| {
        let agent = &agent;
        let handles: Vec<_> = operations
            .iter()
            .map(|args| {
                scope.spawn(move || {
                    let out = ferry_within(agent, args, Duration::from_secs(20));
                    let out = out.unwrap_or_else(|| panic!("{args:?} hung"));
                    assert!(!out.status.success(), "{args:?}: {out:?}");
                })
            })
            .collect();
        for handle in handles {
            handle.join().unwrap();
        }
    });
    // Continued, it serves again.
    signal(sup, "-CONT");
    let out = ferry_within(&agent, &["jobs", "--json"], within).expect("jobs hung");
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"sleep\""),
        "{out:?}"
    );
}

/// More attachers at once than the supervisor keeps lines for (256): the ones past it are
/// refused `Busy` at once, not left waiting for a header that never comes.
#[test]
fn attachers_past_the_supervisors_bound_are_refused_busy() {
    let agent = insecure(&[
        "--set",
        "max_connections=400",
        "--set",
        "handshake_timeout=60s",
    ]);
    let id = start_job(&agent, None, &exec(&sh("sleep 60"))).unwrap();
    let job = id.to_string();
    let mut attached = Vec::new();
    let mut busy = 0;
    for _ in 0..270 {
        let started = Instant::now();
        let mut c = attach_with(&agent, &job, (0, 0), true, false);
        let said = c.next();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "attacher {}: {said:?} after {:?}",
            attached.len() + busy,
            started.elapsed()
        );
        match said {
            Some(Said::Attached(_)) => attached.push(c),
            Some(Said::Refused(ErrorCode::Busy, _)) => busy += 1,
            other => panic!(
                "after {} attachers: {other:?} after {:?}",
                attached.len(),
                started.elapsed()
            ),
        }
    }
    assert_eq!(attached.len(), 256);
    assert_eq!(busy, 270 - 256);
    // One leaves: room for the next.
    drop(attached.pop());
    std::thread::sleep(Duration::from_millis(200));
    let mut c = attach_with(&agent, &job, (0, 0), true, false);
    assert!(matches!(c.next(), Some(Said::Attached(_))));
    drop(c);
    // The attachers leave; their lines free as their connection processes notice (under load
    // that takes a while: until then a kill is one more request past the bound, `Busy`).
    drop(attached);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match kill(&agent, &job).as_slice() {
            [Said::Done(0)] => break,
            [Said::Refused(ErrorCode::Busy, _)] if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            other => panic!("kill: {other:?}"),
        }
    }
    assert!(matches!(
        exited(&wait(&agent, &job)).status,
        ExitStatus::Signal { number: 15, .. }
    ));
}

fn kill_and_wait(agent: &Agent, job: &str) -> Vec<Said> {
    assert_eq!(kill(agent, job), [Said::Done(0)]);
    wait(agent, job)
}

/// A connection process serving an attachment (or a wait) lasts as long as the job: it must
/// have told the listener it took its connection before, or no spare replaces it and the next
/// client waits for the job to end. A client that sends its hello and its request before the
/// agent's hello arrives (they are not answers to it without a secret) reaches that point
/// before anything released the spare.
#[test]
fn attachments_do_not_hold_up_the_next_client() {
    let agent = insecure(&[]);
    let id = start_job(&agent, None, &exec(&sh("sleep 60"))).unwrap();
    let job = id.to_string();
    // The bytes a client sends for an attachment: its hello and the request.
    let request = AttachRequest {
        job: Bytes(job.as_bytes()),
        user: None,
        since_stdout: 0,
        since_stderr: 0,
        follow: true,
        stdin: false,
    };
    let mut probe = Conversation::open(&agent);
    let mut out = vec![0u8; 4096];
    let n = probe.session.start_attach(&request, &mut out).unwrap();
    out.truncate(n);
    drop(probe);
    let mut held = Vec::new();
    for n in 0..8 {
        let started = Instant::now();
        let mut sock = UnixStream::connect(&agent.socket).unwrap();
        sock.write_all(&out).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = [0u8; 256];
        let read = sock.read(&mut got).unwrap_or(0);
        assert!(
            read > 0 && started.elapsed() < Duration::from_secs(3),
            "client {n} waited {:?}",
            started.elapsed()
        );
        held.push(sock);
    }
    let started = Instant::now();
    let said = simple(&agent, |s, out| {
        s.start_exec(&exec(b"/bin/true\0"), out).unwrap()
    });
    assert_eq!(exited(&said).status, ExitStatus::Code(0));
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(matches!(
        exited(&kill_and_wait(&agent, &job)).status,
        ExitStatus::Signal { number: 15, .. }
    ));
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A flood (one huge line of NULs), an attacher that stops reading, another that reads: the
/// reader gets everything the spool holds, the supervisor stays small and keeps serving.
#[test]
fn a_stalled_attacher_holds_up_neither_the_flood_nor_the_others() {
    let agent = insecure(&["--set", "job_spool_head=64K", "--set", "job_spool_ring=1M"]);
    let script = "head -c 200000000 /dev/zero";
    let id = start_job(&agent, Some("flood"), &exec(&sh(script))).unwrap();
    let sup = supervisor(&agent);
    let before = rss_kib(sup);
    // Attached and never read.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut c = attach_with(&agent, "flood", (0, 0), true, false);
        assert!(matches!(c.next(), Some(Said::Attached(_))));
        stalled.push(c);
    }
    let started = Instant::now();
    let said = wait(&agent, "flood");
    assert_eq!(exited(&said).status, ExitStatus::Code(0), "{said:?}");
    assert!(started.elapsed() < Duration::from_secs(30));
    // A reader from past the end, and one from u64::MAX: told where the streams are.
    let tail = attach_with(&agent, &id.to_string(), (u64::MAX, u64::MAX), true, false).all();
    let Said::Attached(header) = tail[0] else {
        panic!("{tail:?}")
    };
    assert_eq!(header.stdout.from, 200_000_000, "{header:?}");
    assert!(stream(&tail, 0).is_empty());
    // A full reader: the head, the loss, the ring; exactly.
    let all = attach_with(&agent, "flood", (0, 0), true, false).all();
    let out = stream(&all, 0);
    let Said::Attached(header) = all[0] else {
        panic!("{all:?}")
    };
    let dropped: u64 = all
        .iter()
        .filter_map(|s| match s {
            Said::Dropped(0, n) => Some(*n),
            _ => None,
        })
        .sum();
    assert_eq!(out.len() as u64 + dropped + header.stdout.lost, 200_000_000);
    assert!(out.iter().all(|b| *b == 0));
    let after = rss_kib(sup);
    assert!(
        after < before + 8 * 1024,
        "supervisor RSS {before} KiB → {after} KiB"
    );
    drop(stalled);
}

/// Names at the 64-byte edge and just past it; a name that reads as an id (the wire's checks,
/// the same in the agent's session).
#[test]
fn names_at_the_edge() {
    let agent = insecure(&[]);
    let name = "n".repeat(64);
    let id = start_job(&agent, Some(&name), &exec(b"/bin/true\0")).unwrap();
    assert_eq!(exited(&wait(&agent, &name)).status, ExitStatus::Code(0));
    assert_eq!(
        exited(&wait(&agent, &id.to_string())).status,
        ExitStatus::Code(0)
    );
    // The client's session refuses to send a name past it; a hand-made request is refused.
    let long = "n".repeat(65);
    let mut c = Conversation::open(&agent);
    let mut out = vec![0u8; 4096];
    let refused_locally = c
        .session
        .start_job(Some(long.as_bytes()), &exec(b"/bin/true\0"), &mut out)
        .is_err();
    assert!(refused_locally);
    // A name that is a number would shadow ids: refused before it is sent.
    let numeric = c
        .session
        .start_job(Some(b"12"), &exec(b"/bin/true\0"), &mut out)
        .is_err();
    assert!(numeric);
    // Nothing was sent: the connection still takes a request.
    c.start(|s, out| s.start_exec(&exec(b"/bin/true\0"), out).unwrap());
    assert_eq!(exited(&c.all()).status, ExitStatus::Code(0));
}

/// The idle deadline is for a connection between operations: an attachment quieter than it
/// runs on to the job's end; after it, on the same connection, garbage is a breach that closes
/// the connection, and the agent serves the next client.
#[test]
fn idle_timeout_spares_a_quiet_attachment_and_garbage_after_a_job_op_closes() {
    let agent = insecure(&["--set", "idle_timeout=1s"]);
    let id = start_job(&agent, None, &exec(&sh("sleep 2.5; echo late"))).unwrap();
    let mut c = attach_with(&agent, &id.to_string(), (0, 0), true, false);
    let said = c.all();
    assert_eq!(exited(&said).status, ExitStatus::Code(0), "{said:?}");
    assert_eq!(stream(&said, 0), b"late\n");
    // Kept: garbage now.
    c.sock.write_all(&[0xff; 64]).unwrap();
    let mut rest = Vec::new();
    let _ = c.sock.read_to_end(&mut rest);
    let said = simple(&agent, |s, out| {
        s.start_exec(&exec(b"/bin/true\0"), out).unwrap()
    });
    assert_eq!(exited(&said).status, ExitStatus::Code(0));
}
