//! The shipped agent binary's listener under pressure, on its Unix socket: the connection limit
//! (`max_connections`, `Busy` beyond it, at once), a thousand clients at once, running out of
//! descriptors, and the socket's mode. (The vsock peer check needs real vsock: its decision is
//! unit-tested in `agent/src/listen.rs` and exercised in the QEMU suite.)
#![allow(clippy::unwrap_used)] // a test reports failure by panicking

mod common;
#[allow(dead_code)] // only the receiving half is used here
#[path = "../../qemu-tests/tests/suite/frames.rs"]
mod frames;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{agent_binary, children, fresh_dir, is_listening, Agent};
use ferry_host::Client;
use ferry_wire::{AgentFrame, ErrorCode};

/// What the agent sent first on a connection, as far as these tests care.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Error(ErrorCode, String),
    /// Anything else: the connection is being served (a hello, once the agent speaks first).
    Other,
}

impl From<AgentFrame<'_>> for Seen {
    fn from(frame: AgentFrame<'_>) -> Seen {
        match frame {
            AgentFrame::Error(err) => Seen::Error(err.code, err.message.to_owned()),
            _ => Seen::Other,
        }
    }
}

type Raw = frames::Raw<Seen>;

/// How long any single read may wait: a test that waits this long has failed.
const PATIENCE: Duration = Duration::from_secs(15);

fn open(socket: &Path) -> Raw {
    Raw::new(UnixStream::connect(socket).unwrap(), PATIENCE)
}

/// How a connection stands after the agent had its chance to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// An error frame with code `Busy`, then the end of the stream.
    Busy,
    /// Served: nothing, or a frame that is not an error, and the connection stays open.
    Held,
    /// Anything else.
    Unexpected(String),
}

/// Looks at what `raw` has received within `wait`, without consuming a held connection.
fn answer(raw: &mut Raw, wait: Duration) -> Answer {
    match raw.next_frame_within(wait) {
        Err(()) | Ok(Some(Seen::Other)) => Answer::Held,
        Ok(Some(Seen::Error(ErrorCode::Busy, message))) => {
            assert!(message.starts_with("agent busy"), "{message}");
            match raw.next_frame_within(PATIENCE) {
                Ok(None) => Answer::Busy,
                other => Answer::Unexpected(format!("after Busy: {other:?}")),
            }
        }
        other => Answer::Unexpected(format!("{other:?}")),
    }
}

fn wait_until(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if done() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A client without the up-front check: one connection per command.
fn client(socket: &Path) -> Client {
    let target = ferry_host::Target::Unix(socket.to_owned());
    Client::new(&target, common::secret_options())
}

/// `echo hi` runs normally.
fn assert_serves(socket: &Path, after: &str) {
    let output = client(socket)
        .output(ferry_host::Command::new("/bin/echo").arg("hi"))
        .unwrap_or_else(|err| panic!("{after}: {err}"));
    assert!(output.success(), "{after}: {output:?}");
    assert_eq!(output.stdout, b"hi\n", "{after}");
}

/// Resident KiB of the agent: the listener and every process under it.
fn total_rss_kib(listener: u32) -> u64 {
    let mut total = 0;
    let mut pending = vec![listener];
    while let Some(pid) = pending.pop() {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        total += status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        pending.extend(children(pid));
    }
    total
}

/// `max_connections = 4`: four silent connections are held, the fifth is told `Busy` within a
/// second and closed; once one of the four leaves, a new client is served normally; with four
/// again (one running a command), the next is `Busy` again.
#[test]
fn one_connection_past_the_limit_is_told_busy_at_once() {
    let agent = Agent::start_with(&["--set", "max_connections=4"]);
    let listener = agent.pid();
    let mut held: Vec<Raw> = (0..4).map(|_| open(&agent.socket)).collect();
    let connected = Instant::now();
    let mut fifth = open(&agent.socket);
    assert_eq!(answer(&mut fifth, Duration::from_secs(1)), Answer::Busy);
    assert!(connected.elapsed() < Duration::from_secs(1));
    for (i, raw) in held.iter_mut().enumerate() {
        assert_eq!(
            answer(raw, Duration::from_millis(50)),
            Answer::Held,
            "held {i}"
        );
    }
    // Exactly the four connection processes, no spare.
    let at_limit = children(listener);
    assert_eq!(at_limit.len(), 4, "{at_limit:?}");

    // One leaves: its process ends and a spare takes its place.
    held.remove(0);
    let replaced = wait_until(Duration::from_secs(5), || {
        let now = children(listener);
        now.len() == 4 && now.iter().any(|pid| !at_limit.contains(pid))
    });
    assert!(
        replaced,
        "no spare after a connection ended: {:?}",
        children(listener)
    );
    let before = children(listener);
    assert_serves(&agent.socket, "three held");
    // That connection's process ends and a spare replaces it: three held and one spare.
    let settled = wait_until(Duration::from_secs(5), || {
        let now = children(listener);
        now.len() == 4 && now.iter().filter(|pid| !before.contains(pid)).count() == 1
    });
    assert!(settled, "no spare after the exec: {:?}", children(listener));

    // Exactly at the limit works, one past does not.
    let mut fourth = open(&agent.socket);
    let mut fifth = open(&agent.socket);
    assert_eq!(answer(&mut fifth, Duration::from_secs(1)), Answer::Busy);
    assert_eq!(answer(&mut fourth, Duration::from_millis(50)), Answer::Held);
    // And the limit holds for a client that runs a command, not only for silent ones.
    let output = client(&agent.socket).output(&ferry_host::Command::new("/bin/true"));
    let err = output.expect_err("a fifth connection ran a command");
    // While the client speaks first, its request may meet a socket the agent has already
    // answered and closed: the library then reports the failed write, not the frame.
    let broken = matches!(&err, ferry_host::Error::Io(io) if matches!(
        io.kind(),
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
    ));
    assert!(
        err.remote_code() == Some(ErrorCode::Busy) || broken,
        "{err:?}"
    );
}

/// A thousand clients at once against the default limit (64): at most 64 connection processes
/// ever exist, every other client is told `Busy` within seconds (none is left hanging), and
/// once all are gone the agent serves as before, at its idle size.
#[test]
fn a_thousand_clients_at_once_get_at_most_the_limit() {
    const CLIENTS: usize = 1000;
    const LIMIT: usize = 64;
    let agent = Agent::start();
    let listener = agent.pid();
    assert!(wait_until(Duration::from_secs(5), || children(listener)
        .len()
        == 2));
    let idle_kib = total_rss_kib(listener);

    let started = Instant::now();
    let mut most = 0;
    let mut conns: Vec<Raw> = (0..CLIENTS)
        .map(|i| {
            if i % 50 == 0 {
                most = most.max(children(listener).len());
            }
            open(&agent.socket)
        })
        .collect();
    // Until every client beyond the limit has its answer.
    let mut answers = vec![None; CLIENTS];
    loop {
        most = most.max(children(listener).len());
        for (raw, seen) in conns.iter_mut().zip(answers.iter_mut()) {
            if seen.is_none() {
                match answer(raw, Duration::from_millis(1)) {
                    Answer::Held => {}
                    other => *seen = Some(other),
                }
            }
        }
        let held = answers.iter().filter(|seen| seen.is_none()).count();
        if held <= LIMIT || started.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    let resolved = started.elapsed();
    let busy = answers.iter().filter(|a| **a == Some(Answer::Busy)).count();
    let unexpected: Vec<_> = answers
        .iter()
        .filter(|a| !matches!(a, None | Some(Answer::Busy)))
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:?}");
    assert!(
        busy >= CLIENTS - LIMIT,
        "{busy} told busy in {resolved:?}, the rest still waiting"
    );
    assert!(resolved < Duration::from_secs(5), "took {resolved:?}");
    most = most.max(children(listener).len());
    assert!(most <= LIMIT, "{most} connection processes at once");
    eprintln!("{busy} of {CLIENTS} busy in {resolved:?}, at most {most} processes");

    drop(conns);
    assert!(
        wait_until(Duration::from_secs(10), || children(listener).len() == 2),
        "connection processes left: {:?}",
        children(listener)
    );
    assert_serves(&agent.socket, "after a thousand clients");
    assert!(wait_until(Duration::from_secs(5), || children(listener)
        .len()
        == 2));
    let after_kib = total_rss_kib(listener);
    eprintln!("agent RSS: {idle_kib} KiB idle, {after_kib} KiB after");
    assert!(
        after_kib <= idle_kib + 512,
        "agent RSS {after_kib} KiB after, {idle_kib} KiB idle"
    );
}

/// An agent started through `sh -c "<prelude>; exec agent --listen unix:SOCKET ARGS"`, its
/// stderr lines collected with their arrival time; killed on drop.
struct Launched {
    child: Child,
    dir: std::path::PathBuf,
    socket: std::path::PathBuf,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Launched {
    fn start(prelude: &str, args: &[&str]) -> Launched {
        let dir = fresh_dir("ferry-listener");
        let socket = dir.join("agent.sock");
        let mut child = Command::new("/bin/sh")
            .arg("-c")
            .arg(format!(
                "{prelude}\nsocket=$1; shift; exec \"$0\" --listen \"unix:$socket\" \"$@\""
            ))
            .arg(agent_binary())
            .arg(&socket)
            .arg("--secret-file")
            .arg(common::secret_path())
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                sink.lock().unwrap().push((Instant::now(), line));
            }
        });
        let ok = wait_until(Duration::from_secs(10), || {
            is_listening(&socket) || child.try_wait().unwrap().is_some()
        });
        assert!(ok && is_listening(&socket), "the agent did not start");
        Launched {
            child,
            dir,
            socket,
            lines,
        }
    }

    fn lines_since(&self, since: Instant) -> Vec<String> {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .filter(|(at, _)| *at >= since)
            .map(|(_, line)| line.clone())
            .collect()
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Out of descriptors (a tiny RLIMIT_NOFILE), `accept` fails at once: a client is still told
/// `ResourceExhausted` rather than left hanging, and the agent's log stays readable (a few
/// lines a second, however many clients come).
#[test]
fn out_of_descriptors_a_client_is_told_and_the_log_is_not_flooded() {
    let agent = Launched::start("ulimit -n 8", &[]);
    let mut answers = Vec::new();
    let since = Instant::now();
    while since.elapsed() < Duration::from_secs(2) {
        let mut raw = open(&agent.socket);
        answers.push(raw.next_frame_within(Duration::from_secs(1)));
    }
    let logged = agent.lines_since(since);
    assert!(answers.len() > 20, "only {} clients in 2 s", answers.len());
    for seen in &answers {
        match seen {
            Ok(Some(Seen::Error(ErrorCode::ResourceExhausted, message))) => {
                assert_eq!(message, "out of file descriptors")
            }
            other => panic!("expected ResourceExhausted, got {other:?}"),
        }
    }
    // A burst of 20, then 5 a second, each after a line saying how many were suppressed
    // (the last read may end a little after the 2 s).
    let most = 20 + 2 * 5 * 3;
    eprintln!(
        "{} clients, {} log lines, e.g. {:?}",
        answers.len(),
        logged.len(),
        logged.last()
    );
    assert!(
        logged.len() <= most,
        "{} log lines in 2 s: {logged:#?}",
        logged.len()
    );
}

/// The socket has the policy's mode whatever the agent's umask, 0600 by default, and the
/// policy's group.
#[test]
fn the_socket_has_the_policys_mode_whatever_the_umask() {
    let mode_of = |agent: &Launched| {
        let meta = std::fs::symlink_metadata(&agent.socket).unwrap();
        (meta.permissions().mode() & 0o7777, meta.gid())
    };
    let agent = Launched::start("umask 000", &[]);
    let own_gid = std::fs::metadata(&agent.dir).unwrap().gid();
    assert_eq!(mode_of(&agent), (0o600, own_gid), "the default");
    assert_serves(&agent.socket, "default mode");
    drop(agent);

    let agent = Launched::start("umask 000", &["--set", "socket_mode=0660"]);
    assert_eq!(mode_of(&agent).0, 0o660);
    drop(agent);

    let agent = Launched::start("umask 077", &["--set", "socket_mode=0666"]);
    assert_eq!(mode_of(&agent).0, 0o666, "narrowing umask");
    drop(agent);

    // Giving a file to a group we are not in needs root; as root, any group will do.
    let is_root = std::fs::metadata("/proc/self").unwrap().uid() == 0;
    let gid = if is_root { 4242 } else { own_gid };
    let group = format!("socket_group={gid}");
    let agent = Launched::start("umask 022", &["--set", "socket_mode=0660", "--set", &group]);
    assert_eq!(mode_of(&agent), (0o660, gid));
}

/// Every operation leaves one audit line: who asked (the peer), as whom, for what, how it
/// ended and how long it took; a wrong proof leaves one line too, and says nothing more.
#[test]
fn every_operation_leaves_one_audit_line() {
    let agent = Launched::start("", &["--run-as-agent-user"]);
    let since = Instant::now();
    let client = client(&agent.socket);
    let output = client
        .output(ferry_host::Command::new("/bin/sh").args(["-c", "exit 3"]))
        .unwrap();
    assert_eq!(output.status, ferry_host::ExitStatus::Code(3));
    // A program name that tries to forge a log line (or drive the console) is shown defanged.
    let forged = client.output(&ferry_host::Command::new(
        "/x\nferry-agent: audit: exec forged\x1b[2J",
    ));
    assert!(forged.is_err());
    let missing = client.output(&ferry_host::Command::new("/nonexistent/prog"));
    assert_eq!(
        missing.unwrap_err().remote_code(),
        Some(ErrorCode::NotFound)
    );
    let wrong = {
        let path = fresh_dir("ferry-audit-secret").join("secret");
        std::fs::write(&path, b"another secret, 16+ bytes long").unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        ferry_host::ConnectOptions {
            secret: Some(ferry_host::read_secret_file(&path).unwrap()),
            ..ferry_host::ConnectOptions::default()
        }
    };
    let target = ferry_host::Target::Unix(agent.socket.clone());
    let refused = Client::new(&target, wrong).output(&ferry_host::Command::new("true"));
    assert!(matches!(
        refused,
        Err(ferry_host::Error::Unauthenticated(_))
    ));
    let expected = |lines: &[String]| {
        let audits: Vec<&String> = lines.iter().filter(|l| l.contains("audit: ")).collect();
        let failed = lines
            .iter()
            .filter(|l| l.contains("authentication failed"))
            .count();
        audits.len() == 3 && failed == 1
    };
    let seen = wait_until(Duration::from_secs(5), || {
        expected(&agent.lines_since(since))
    });
    let lines = agent.lines_since(since);
    assert!(seen, "{lines:#?}");
    let audits: Vec<&String> = lines.iter().filter(|l| l.contains("audit: ")).collect();
    assert!(
        audits[0].contains(
            "audit: exec peer=a unix client user=(default) program=/bin/sh result=exit 3 ms="
        ),
        "{}",
        audits[0]
    );
    assert!(
        audits[1].contains("program=/x?ferry-agent: audit: exec forged?[2J result=refused"),
        "{}",
        audits[1]
    );
    assert!(
        lines
            .iter()
            .all(|line| !line.starts_with("ferry-agent: audit: exec forged")),
        "{lines:#?}"
    );
    assert!(
        audits[2].contains("program=/nonexistent/prog result=refused (no such file or directory)"),
        "{}",
        audits[2]
    );
}
