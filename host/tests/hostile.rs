//! The shipped agent binary against a hostile client on its Unix socket, and against a hostile
//! environment (an odd umask, leaked descriptors, a second agent on the same path). Each test is
//! an attack that was tried; what the agent must do about it is the assertion. The plain protocol
//! breaches (bad frames before and at the request, noise, stdin far beyond credit) are scenarios
//! in `qemu-tests/tests/suite/raw.rs`; these are the ones that need the agent's process tree, its
//! timing or its launch under our control.
#![allow(clippy::unwrap_used)] // a test reports failure by panicking

mod common;
#[path = "../../qemu-tests/tests/suite/frames.rs"]
mod frames;

use std::io::Read;
use std::net::Shutdown;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{
    agent_binary, children, fresh_dir, group_members, is_listening, secret_path, wait_group_gone,
    Agent,
};
use ferry_host::{read_secret_file, Secret};
use ferry_wire::limits::{
    MAX_ARGS, MAX_ARGV_BYTES, MAX_ARG_LEN, MAX_DATA, MAX_ENV_BYTES, MAX_ENV_VARS, MAX_FRAME,
    MAX_PATH, NONCE_LEN, STDIN_WINDOW,
};
use ferry_wire::session::{ClientAuth, ClientEvent, ClientSession};
use ferry_wire::{
    decode_client_frame, AgentFrame, ByteArray, Bytes, ClientFrame, ClientProof, ErrorCode,
    ExecPart, ExecRequest, ExitStatus, ListKind, StdinMode, Termination,
};
use frames::{encode, exec, hello};

// ---------------------------------------------------------------------------------------------
// A client driven by hand.

/// What the agent sent, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Hello,
    Authenticated,
    Done,
    Started(u32),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Credit(u32),
    Exited(Termination),
    Error(ErrorCode, String),
    Ready,
    Keepalive,
    OutputDropped(u64),
    /// A frame of the operations beyond exec.
    Other(String),
}

impl From<AgentFrame<'_>> for Seen {
    fn from(frame: AgentFrame<'_>) -> Seen {
        match frame {
            AgentFrame::Hello(_) => Seen::Hello,
            AgentFrame::Authenticated(_) => Seen::Authenticated,
            AgentFrame::Done(_) => Seen::Done,
            AgentFrame::Started(started) => Seen::Started(started.pid),
            AgentFrame::Stdout(out) => Seen::Stdout(out.data.0.to_vec()),
            AgentFrame::Stderr(out) => Seen::Stderr(out.data.0.to_vec()),
            AgentFrame::StdinCredit(n) => Seen::Credit(n),
            AgentFrame::Exited(end) => Seen::Exited(end),
            AgentFrame::Error(err) => Seen::Error(err.code, err.message.to_owned()),
            AgentFrame::Ready(_) => Seen::Ready,
            AgentFrame::Keepalive => Seen::Keepalive,
            AgentFrame::OutputDropped(dropped) => Seen::OutputDropped(dropped.bytes),
            other => Seen::Other(format!("{other:?}")),
        }
    }
}

/// One connection, raw bytes out, whole frames in.
type Raw = frames::Raw<Seen>;

/// How long any single read may wait: a test that waits this long has failed.
const PATIENCE: Duration = Duration::from_secs(15);

/// The refusal of every failed authentication, whatever was wrong with the proof.
fn unauthenticated() -> Seen {
    Seen::Error(ErrorCode::Unauthenticated, "authentication failed".into())
}

/// The secret the test agents are started with ([`secret_path`]), read once.
fn secret() -> Secret {
    static SECRET: OnceLock<Secret> = OnceLock::new();
    SECRET
        .get_or_init(|| read_secret_file(secret_path()).unwrap())
        .clone()
}

impl Raw {
    /// Connects, and reads nothing: the agent's hello waits in the socket.
    fn connect(socket: &Path) -> Raw {
        Raw::new(UnixStream::connect(socket).unwrap(), PATIENCE)
    }

    /// Connects and takes the agent's hello (it speaks first, unasked) into a session that
    /// holds the agents' secret: our hello and proof are then queued in it.
    fn open(socket: &Path) -> (Raw, ClientSession) {
        let mut raw = Raw::connect(socket);
        let session = raw.greet(Some(secret()));
        (raw, session)
    }

    /// Takes the agent's hello into a new session that holds `secret` (or none).
    fn greet(&mut self, secret: Option<Secret>) -> ClientSession {
        let auth = ClientAuth {
            nonce: frames::nonce(),
            secret,
        };
        let mut session = ClientSession::new(0, None, auth);
        loop {
            let input = session.handle_input(self.recv.data()).unwrap();
            if input.consumed > 0 {
                let hello = matches!(input.event, Some(ClientEvent::HelloAccepted(_)));
                assert!(hello, "the agent's first frame is not its hello");
                self.recv.consume(input.consumed);
                return session;
            }
            let read = self.fill(PATIENCE).expect("no hello from the agent");
            assert!(read > 0, "the agent closed before its hello");
        }
    }

    /// The agent's proof and `Started`, in that order (its hello was taken at the opening);
    /// the command's pid (its process group).
    fn started(&mut self) -> u32 {
        assert_eq!(self.next_frame(), Some(Seen::Authenticated));
        match self.next_frame() {
            Some(Seen::Started(pid)) => pid,
            other => panic!("expected Started, got {other:?}"),
        }
    }
}

/// Our hello and proof, as `session` encodes them.
fn opening(session: &mut ClientSession) -> Vec<u8> {
    let mut out = [0u8; 512];
    let n = session.poll_transmit(&mut out).unwrap();
    out[..n].to_vec()
}

/// Our hello, proof and `request`, exactly as one write carries them.
fn exec_bytes(session: &mut ClientSession, request: &ExecRequest<'_>) -> Vec<u8> {
    let mut out = vec![0u8; 2 * MAX_FRAME];
    let n = session.start_exec(request, &mut out).unwrap();
    out.truncate(n);
    out
}

/// Connects to `socket`, takes the agent's hello, and returns the connection with our hello,
/// proof and an exec of `sh -c script`, as one write would carry them (not sent yet).
fn sh_request(socket: &Path, script: &str, stdin: StdinMode) -> (Raw, Vec<u8>) {
    let (raw, mut session) = Raw::open(socket);
    let argv = format!("/bin/sh\0-c\0{script}\0");
    let request = exec_bytes(&mut session, &exec(argv.as_bytes(), stdin));
    (raw, request)
}

fn stdout_of(seen: &[Seen]) -> Vec<u8> {
    let mut out = Vec::new();
    for frame in seen {
        if let Seen::Stdout(data) = frame {
            out.extend_from_slice(data);
        }
    }
    out
}

fn termination(seen: &[Seen]) -> Termination {
    match seen.last() {
        Some(Seen::Exited(end)) => *end,
        _ => panic!("no termination record last: {seen:?}"),
    }
}

/// Asserts that nobody is left in process group `pgid` within `within`.
fn assert_group_gone(pgid: u32, within: Duration, what: &str) {
    if let Err(left) = wait_group_gone(pgid, within) {
        panic!("{what}: processes left in group {pgid}: {left:?}");
    }
}

/// `/proc/<pid>/stat` fields after the command name: state, ppid, pgrp, …
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

fn parent_of(pid: u32) -> u32 {
    stat_fields(pid).unwrap()[1].parse().unwrap()
}

/// User plus system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let fields = stat_fields(pid).unwrap();
    // utime and stime: fields 14 and 15 of stat, 12 and 13 after the name.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} for {pid}"));
    line.trim().trim_end_matches(" kB").parse().unwrap()
}

/// The descriptors `pid` has open, by number.
fn open_fds(pid: u32) -> Vec<u32> {
    let mut fds: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    fds
}

/// Waits until `pid` has exactly `count` children (its spares, once connections are done).
fn wait_children(pid: u32, count: usize, within: Duration) -> Vec<u32> {
    let deadline = Instant::now() + within;
    loop {
        let now = children(pid);
        if now.len() == count || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_until(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    done()
}

/// The agent still runs a command for a client that plays by the rules, promptly.
fn assert_serving(socket: &Path, after: &str) {
    let started = Instant::now();
    let (mut raw, request) = sh_request(socket, "echo ok", StdinMode::Null);
    raw.send(&request);
    let seen = raw.frames_until_closed();
    assert_eq!(stdout_of(&seen), b"ok\n", "after {after}: {seen:?}");
    assert!(
        termination(&seen).status == ExitStatus::Code(0),
        "after {after}"
    );
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "after {after}: an exec took {took:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// An agent started the way an operator might: through a shell, with its umask and its open
// descriptors.

struct Launched {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

/// Starts the agent on `socket` through
/// `sh -c "<prelude> exec agent --listen unix:socket --secret-file secret"`: the agent is the
/// shell's pid, with whatever the prelude set up.
fn spawn_agent(prelude: &str, socket: &Path) -> Child {
    spawn_agent_with(prelude, socket, Stdio::piped())
}

/// [`spawn_agent`], with the agent's stderr going to `stderr`.
fn spawn_agent_with(prelude: &str, socket: &Path, stderr: Stdio) -> Child {
    Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "{prelude}\nexec \"$0\" --listen \"unix:$1\" --secret-file \"$2\""
        ))
        .arg(agent_binary())
        .arg(socket)
        .arg(secret_path())
        .stdin(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap()
}

/// An agent process killed (with its spares) when the test ends, however it ends.
struct Spawned(Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Launched {
    fn start(prelude: &str) -> Launched {
        let dir = fresh_dir("ferry-hostile-launched");
        let socket = dir.join("agent.sock");
        let mut child = spawn_agent(prelude, &socket);
        let ok = wait_until(Duration::from_secs(10), || {
            is_listening(&socket) || child.try_wait().unwrap().is_some()
        });
        assert!(ok && is_listening(&socket), "the agent did not start");
        Launched { child, dir, socket }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `script` on the agent at `socket` and returns its stdout (it must exit 0).
fn run(socket: &Path, script: &str) -> String {
    let (mut raw, request) = sh_request(socket, script, StdinMode::Null);
    raw.send(&request);
    let seen = raw.frames_until_closed();
    assert_eq!(
        termination(&seen).status,
        ExitStatus::Code(0),
        "{script}: {seen:?}"
    );
    String::from_utf8(stdout_of(&seen)).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Garbage and truncation at every phase.

/// Every prefix of a valid hello + proof + request, then a half-close: no prefix short of the
/// whole request starts anything. The agent's hello comes first, unasked (taken at the
/// opening); a prefix short of the whole proof gets nothing more (or at most the refusal of an
/// unauthenticated client), one with the whole proof gets the agent's proof and nothing else.
/// (The half-close is read as the client leaving: before a request nothing is owed to it.)
#[test]
fn every_truncation_of_the_request_starts_nothing() {
    let agent = Agent::start();
    let (raw, mut session) = Raw::open(&agent.socket);
    drop(raw);
    let opening_len = opening(&mut session).len();
    let whole_len = sh_request(&agent.socket, "echo started", StdinMode::Null)
        .1
        .len();
    assert!(opening_len > hello().len() && whole_len > opening_len);
    for cut in 0..whole_len {
        // Each connection has its own challenge, hence its own bytes (of the same length).
        let (mut raw, whole) = sh_request(&agent.socket, "echo started", StdinMode::Null);
        assert_eq!(whole.len(), whole_len);
        raw.send(&whole[..cut]);
        raw.stream.shutdown(Shutdown::Write).unwrap();
        let seen = raw.frames_until_closed();
        let what = format!("cut after {cut} of {whole_len} bytes (opening {opening_len})");
        if cut < opening_len {
            assert!(
                seen.is_empty() || seen == [unauthenticated()],
                "{what}: {seen:?}"
            );
        } else {
            assert_eq!(seen, [Seen::Authenticated], "{what}");
        }
    }
    // And a frame that announces more than it carries, then a full close.
    let (mut raw, mut session) = Raw::open(&agent.socket);
    raw.send(&opening(&mut session));
    raw.send(&[0x00, 0x00, 0x01, 0x00]);
    raw.send(&[0x01; 30_000]);
    drop(raw);
    assert_serving(&agent.socket, "truncated requests");
    // Each of those connection processes is gone: only the spares are left.
    let left = wait_children(agent.pid(), 2, Duration::from_secs(5));
    assert_eq!(left.len(), 2, "connection processes left: {left:?}");
}

/// After `Started`, a bad frame ends the conversation with one error frame and kills the
/// command's whole group, whatever kind of bad it is.
#[test]
fn garbage_after_started_is_refused_and_kills_the_group() {
    let agent = Agent::start();
    let cases: [(&str, Vec<u8>, ErrorCode); 5] = [
        (
            "undecodable",
            vec![3, 0, 0, 0, 9, 9, 9],
            ErrorCode::Malformed,
        ),
        ("empty body", vec![0, 0, 0, 0], ErrorCode::Malformed),
        (
            "huge length",
            vec![0xff, 0xff, 0xff, 0x7f],
            ErrorCode::FrameTooLarge,
        ),
        ("a second hello", hello(), ErrorCode::ProtocolViolation),
        (
            // A valid stdin frame with bytes after it inside its body.
            "trailing bytes",
            [vec![19, 0, 0, 0, 2, 1, b'x'], vec![0xaa; 16]].concat(),
            ErrorCode::Malformed,
        ),
    ];
    for (name, garbage, code) in cases {
        // Stdin is piped so that a Stdin frame is in place (the "trailing bytes" case).
        let (mut raw, request) =
            sh_request(&agent.socket, "sleep 30 & echo up; wait", StdinMode::Pipe);
        raw.send(&request);
        let pgid = raw.started();
        assert_eq!(
            raw.next_frame(),
            Some(Seen::Stdout(b"up\n".to_vec())),
            "{name}"
        );
        raw.send(&garbage);
        let seen = raw.frames_until_closed();
        let last = seen.last().cloned();
        assert!(
            matches!(&last, Some(Seen::Error(c, _)) if *c == code),
            "{name}: {seen:?}"
        );
        assert!(
            seen[..seen.len() - 1]
                .iter()
                .all(|s| matches!(s, Seen::Credit(_))),
            "{name}: {seen:?}"
        );
        assert_group_gone(pgid, Duration::from_secs(5), name);
    }
    assert_serving(&agent.socket, "garbage after Started");
}

/// A frame cut off after `Started` (mid-header or mid-body), then the client goes (half-close
/// or close): a disconnect, so the command's group dies and no final frame is owed.
#[test]
fn a_frame_cut_off_after_started_is_a_disconnect() {
    let agent = Agent::start();
    let stdin_frame = encode(&ClientFrame::Stdin(Bytes(&[b'x'; 1000])));
    for (name, cut, half_close) in [
        ("mid-header, half-close", 2, true),
        ("mid-body, half-close", 500, true),
        ("mid-header, close", 3, false),
        ("mid-body, close", 999, false),
    ] {
        let (mut raw, request) = sh_request(&agent.socket, "exec sleep 30", StdinMode::Pipe);
        raw.send(&request);
        let pgid = raw.started();
        raw.send(&stdin_frame[..cut]);
        if half_close {
            raw.stream.shutdown(Shutdown::Write).unwrap();
            assert_eq!(raw.frames_until_closed(), [], "{name}");
        } else {
            drop(raw);
        }
        assert_group_gone(pgid, Duration::from_secs(5), name);
    }
    assert_serving(&agent.socket, "frames cut off");
}

/// Anything after the final frame goes nowhere when keep-alive is off (`idle_timeout=0`, one
/// operation per connection as protocol 4 had): the agent has closed, and the next client is
/// served as usual. (With keep-alive, what follows is the next request, or a breach:
/// `keepalive.rs`.)
#[test]
fn input_after_the_final_frame_is_never_read() {
    let agent = Agent::start_with(&["--set", "idle_timeout=0s"]);
    let (mut raw, request) = sh_request(&agent.socket, "echo done", StdinMode::Null);
    raw.send(&request);
    raw.started();
    let mut seen = Vec::new();
    while !matches!(seen.last(), Some(Seen::Exited(_))) {
        seen.push(
            raw.next_frame()
                .expect("closed before the termination record"),
        );
    }
    // More garbage than any buffer of the agent's, and a valid-looking request (the opening
    // and request that were valid on this connection, again).
    raw.send(&vec![0x5a; 256 << 10]);
    raw.send(&request);
    assert_eq!(raw.frames_until_closed(), [], "frames after the final one");
    assert_serving(&agent.socket, "input after the final frame");
}

// ---------------------------------------------------------------------------------------------
// A reader that stops.

/// A client asks for a flood and stops reading: the command is slowed (blocked on its pipe),
/// the agent's memory does not grow; the client resumes and gets the stream; then it leaves
/// mid-stream and the command's group dies (a quiet `sleep` in it too, which the pipes closing
/// would not end), with nothing leaked in the listener.
#[test]
fn a_stalled_reader_slows_a_flood_without_growing_the_agent() {
    let agent = Agent::start();
    let listener_fds = open_fds(agent.pid());
    for flood in ["sleep 30 & exec yes", "sleep 30 & exec cat /dev/zero"] {
        let (mut raw, request) = sh_request(&agent.socket, flood, StdinMode::Null);
        raw.send(&request);
        let pgid = raw.started();
        let connection = parent_of(pgid);
        // Stalled: the socket buffers and the pipe fill, then the command blocks in write(2).
        let blocked = wait_until(Duration::from_secs(5), || {
            let before = cpu_ticks(pgid);
            std::thread::sleep(Duration::from_millis(300));
            cpu_ticks(pgid) == before && stat_fields(pgid).unwrap()[0] == "S"
        });
        assert!(
            blocked,
            "{flood}: still running at full speed with no reader"
        );
        std::thread::sleep(Duration::from_millis(500));
        let rss = status_kib(connection, "VmRSS");
        assert!(rss < 1024, "{flood}: connection process at {rss} KiB");
        assert_eq!(
            stat_fields(connection).unwrap()[0],
            "S",
            "{flood}: agent spinning"
        );
        // Resumed: the stream flows again.
        let mut received = 0usize;
        while received < 16 << 20 {
            match raw.next_frame() {
                Some(Seen::Stdout(data)) => received += data.len(),
                other => panic!("{flood}: {other:?}"),
            }
        }
        let rss = status_kib(connection, "VmHWM");
        assert!(
            rss < 1024,
            "{flood}: connection process peaked at {rss} KiB"
        );
        // Gone mid-stream: the group dies, the connection process ends.
        drop(raw);
        assert_group_gone(pgid, Duration::from_secs(5), flood);
        assert!(
            wait_until(Duration::from_secs(5), || stat_fields(connection).is_none()),
            "{flood}: the connection process lingers"
        );
    }
    assert_listener_fds_settle(agent.pid(), &listener_fds);
}

/// A command killed by a signal while its output still waits in the pipe for a stalled
/// reader: all of it arrives, and then the signal, with nothing reported dropped.
#[test]
fn a_command_killed_while_its_output_drains_reports_everything() {
    let agent = Agent::start();
    // Killed by its own hand once everything is written.
    let (mut raw, request) = sh_request(
        &agent.socket,
        "head -c 700000 /dev/zero; kill -KILL $$",
        StdinMode::Null,
    );
    raw.send(&request);
    raw.started();
    std::thread::sleep(Duration::from_millis(600));
    let seen = raw.frames_until_closed();
    assert_eq!(stdout_of(&seen).len(), 700_000);
    let end = termination(&seen);
    let killed = ExitStatus::Signal {
        number: 9,
        core_dumped: false,
    };
    assert_eq!((end.status, end.output_dropped), (killed, false));

    // Killed from outside while it floods a reader that does not read.
    let (mut raw, request) = sh_request(&agent.socket, "exec yes", StdinMode::Null);
    raw.send(&request);
    let pgid = raw.started();
    std::thread::sleep(Duration::from_millis(300));
    let status = Command::new("kill")
        .args(["-TERM", &pgid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    std::thread::sleep(Duration::from_millis(600));
    let seen = raw.frames_until_closed();
    let out = stdout_of(&seen);
    assert!(out.len() > 64 << 10, "only {} bytes", out.len());
    assert!(
        out.chunks(2).all(|c| c == b"y\n" || c == b"y"),
        "not yes's output"
    );
    let end = termination(&seen);
    let terminated = ExitStatus::Signal {
        number: 15,
        core_dumped: false,
    };
    assert_eq!((end.status, end.output_dropped), (terminated, false));
}

/// Daemons keep the command's stdout after the command exits, one flooding it, and the client
/// stops reading and then leaves before the termination record: the client's leaving is a
/// disconnect even though the group's leader is gone and reaped, and the daemons die with the
/// group (the quiet one too, which the pipes closing would not end).
#[test]
fn leaving_while_a_daemon_holds_the_output_kills_the_daemon() {
    let agent = Agent::start();
    // One daemon floods until the reader's stall blocks it; the other only holds stdout. The
    // leader writes before it starts them: after, a full pipe could block it.
    let (mut raw, request) = sh_request(
        &agent.socket,
        "echo leader done; sleep 30 & yes &",
        StdinMode::Null,
    );
    raw.send(&request);
    let pgid = raw.started();
    assert!(
        wait_until(Duration::from_secs(5), || stat_fields(pgid)
            .is_none_or(|f| f[0] == "Z")),
        "the leader did not exit"
    );
    std::thread::sleep(Duration::from_millis(500));
    let members = group_members(pgid);
    assert!(
        members.len() >= 2,
        "the daemons are gone already: {members:?}"
    );
    drop(raw);
    assert_group_gone(
        pgid,
        Duration::from_secs(5),
        "after leaving during the drain",
    );
}

// ---------------------------------------------------------------------------------------------
// Half-close.

/// The contract: the client's end of stream before the final frame is a disconnect, and a
/// disconnect kills the command's group. A half-close (`shutdown(SHUT_WR)`) is an end of stream
/// like any other, whether it follows the request or the end of stdin: the agent cannot tell
/// it from a client that is gone (and vhost-device-vsock turns one into the other). A client
/// that wants the rest of its command's output sends `StdinEof` and keeps its socket open.
#[test]
fn a_half_close_is_no_more_input_and_a_close_is_a_disconnect() {
    let agent = Agent::start();
    let script = "cat; sleep 1; echo late";
    let cases: [(&str, Vec<u8>, &[u8]); 2] = [
        ("right after the request", Vec::new(), b"late\n"),
        (
            "after stdin's end",
            [
                encode(&ClientFrame::Stdin(Bytes(b"abc"))),
                encode(&ClientFrame::StdinEof),
            ]
            .concat(),
            b"abclate\n",
        ),
    ];
    // `nc -N`: the command reads EOF, runs to its end, and its output and record still come.
    for (name, after, expected) in cases {
        let (mut raw, request) = sh_request(&agent.socket, script, StdinMode::Pipe);
        raw.send(&[request, after].concat());
        raw.stream.shutdown(Shutdown::Write).unwrap();
        raw.started();
        let seen = raw.frames_until_closed();
        assert_eq!(stdout_of(&seen), expected, "{name}: {seen:?}");
        assert_eq!(termination(&seen).status, ExitStatus::Code(0), "{name}");
    }
    // A client that is gone (both directions closed) mid-run: the command's group is killed.
    let started = Instant::now();
    let (mut raw, request) = sh_request(&agent.socket, "sleep 30", StdinMode::Null);
    raw.send(&request);
    let pgid = raw.started();
    raw.stream.shutdown(Shutdown::Both).unwrap();
    assert_group_gone(pgid, Duration::from_secs(2), "a closed client");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

// ---------------------------------------------------------------------------------------------
// Authentication.

/// The proof in `opening` (our hello, then the proof frame): its nonce and MAC.
fn proof_of(opening: &[u8]) -> ([u8; NONCE_LEN], Vec<u8>) {
    let frame = &opening[hello().len()..];
    match decode_client_frame(&frame[4..]).unwrap() {
        ClientFrame::Auth(proof) => (proof.nonce.0, proof.mac.0.to_vec()),
        other => panic!("not a proof: {other:?}"),
    }
}

/// A proof frame of `nonce` and `mac`, whatever their worth.
fn proof_frame(nonce: [u8; NONCE_LEN], mac: &[u8]) -> Vec<u8> {
    encode(&ClientFrame::Auth(ClientProof {
        nonce: ByteArray(nonce),
        mac: Bytes(mac),
    }))
}

/// Every way of not proving the secret, each with a request behind it: a proof made with
/// another secret, another connection's proof replayed verbatim, no proof at all, a proof cut
/// short (a MAC of half its length, and a proof frame missing its last byte). All are refused
/// with one and the same error frame (nothing about which part was wrong), nothing runs, no
/// connection process is left, and the agent keeps serving.
#[test]
fn every_failed_proof_is_refused_alike_and_starts_nothing() {
    let agent = Agent::start_with(&["--set", "idle_timeout=0s"]);
    // (Keep-alive off: the count of connection processes at the end is the spares alone.)
    let dir = fresh_dir("ferry-hostile-auth");
    let marker = dir.join("ran");
    let argv = format!("/bin/sh\0-c\0echo ran >> '{}'\0", marker.display());
    let request = exec(argv.as_bytes(), StdinMode::Null);
    let exec_frame = encode(&ClientFrame::Exec(request));
    let ran = || std::fs::read_to_string(&marker).unwrap_or_default();

    // A client that knows the secret, overheard: its opening and request run once.
    let (mut raw, mut session) = Raw::open(&agent.socket);
    let recorded = exec_bytes(&mut session, &request);
    raw.send(&recorded);
    raw.started();
    let seen = raw.frames_until_closed();
    assert_eq!(termination(&seen).status, ExitStatus::Code(0), "{seen:?}");
    assert_eq!(ran(), "ran\n");

    let other = Secret::new(b"not the agent's secret, 32 bytes").unwrap();
    let cases = [
        "a proof made with another secret",
        "another connection's opening replayed",
        "no proof",
        "a MAC cut to half its length",
        "a proof frame cut short by a byte",
        "an empty MAC",
    ];
    for case in cases {
        let mut raw = Raw::connect(&agent.socket);
        let bytes = match case {
            "a proof made with another secret" => {
                let mut session = raw.greet(Some(other.clone()));
                exec_bytes(&mut session, &request)
            }
            "another connection's opening replayed" => {
                raw.greet(Some(secret()));
                recorded.clone()
            }
            "no proof" => {
                raw.greet(Some(secret()));
                [hello(), exec_frame.clone()].concat()
            }
            _ => {
                let mut session = raw.greet(Some(secret()));
                let opening = opening(&mut session);
                let (nonce, mac) = proof_of(&opening);
                let proof = match case {
                    "a MAC cut to half its length" => proof_frame(nonce, &mac[..mac.len() / 2]),
                    "an empty MAC" => proof_frame(nonce, &[]),
                    _ => {
                        // The right proof less its last byte, the length prefix told so.
                        let whole = &opening[hello().len()..];
                        let body = u32::try_from(whole.len() - 5).unwrap();
                        [&body.to_le_bytes()[..], &whole[4..whole.len() - 1]].concat()
                    }
                };
                [hello(), proof, exec_frame.clone()].concat()
            }
        };
        raw.send(&bytes);
        let seen = raw.frames_until_closed();
        assert_eq!(seen, [unauthenticated()], "{case}");
        assert_eq!(ran(), "ran\n", "{case}: the request ran");
        assert_serving(&agent.socket, case);
    }
    let left = wait_children(agent.pid(), 2, Duration::from_secs(5));
    assert_eq!(left.len(), 2, "connection processes left: {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A client that connects and says nothing gets the agent's hello and, at the handshake
/// deadline, an error frame saying it timed out, then the close; so does one that proves the
/// secret and then sends no request. Both wait at once.
#[test]
fn a_silent_client_is_dropped_at_the_handshake_deadline() {
    let agent = Agent::start();
    let connected = Instant::now();
    let mut silent = Raw::connect(&agent.socket);
    let (mut proven, mut session) = Raw::open(&agent.socket);
    proven.send(&opening(&mut session));
    for (name, raw, expected) in [
        ("silent", &mut silent, [Seen::Hello, handshake_timed_out()]),
        (
            "proven, then silent",
            &mut proven,
            [Seen::Authenticated, handshake_timed_out()],
        ),
    ] {
        let seen = raw.frames_until_closed();
        let ended = connected.elapsed();
        assert_eq!(seen, expected, "{name}");
        assert!(
            ended > HANDSHAKE_TIMEOUT && ended < HANDSHAKE_TIMEOUT + Duration::from_secs(3),
            "{name}: dropped after {ended:?}"
        );
    }
    assert_serving(&agent.socket, "silent clients");
    let left = wait_children(agent.pid(), 2, Duration::from_secs(5));
    assert_eq!(left.len(), 2, "connection processes left: {left:?}");
}

/// The refusal of a wrong proof takes as long whether the MAC is wrong in its first byte or
/// only in its last: a comparison that stops at the first difference would tell a client how
/// much of its guess was right. Time from sending the hello and proof to the refusal, over
/// hundreds of connections of each kind, interleaved (in alternating order) so that any drift
/// in the machine's load hits both alike; medians, against a generous bound. A round that
/// misses the bound is tried again (noise comes and goes, a leak stays): three misses fail.
#[test]
fn a_refusal_takes_as_long_wherever_the_proof_is_wrong() {
    const CONNECTIONS: usize = 300;
    const ROUNDS: usize = 3;
    let dir = fresh_dir("ferry-hostile-timing");
    let socket = dir.join("agent.sock");
    // Its stderr to /dev/null: a line per refusal, and nobody reads them.
    let _agent = Spawned(spawn_agent_with("", &socket, Stdio::null()));
    assert!(wait_until(Duration::from_secs(10), || is_listening(
        &socket
    )));
    let refusal_time = |byte: usize| {
        let mut raw = Raw::connect(&socket);
        let mut session = raw.greet(Some(secret()));
        let opening = opening(&mut session);
        let (nonce, mut mac) = proof_of(&opening);
        let len = mac.len();
        mac[byte % len] ^= 0x01;
        let bytes = [hello(), proof_frame(nonce, &mac)].concat();
        let sent = Instant::now();
        raw.send(&bytes);
        let answer = raw.next_frame();
        let took = sent.elapsed();
        assert_eq!(answer, Some(unauthenticated()));
        took
    };
    let median = |times: &mut Vec<Duration>| {
        times.sort_unstable();
        times[times.len() / 2]
    };
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let (mut first, mut last) = (Vec::new(), Vec::new());
        for i in 0..CONNECTIONS {
            if i % 2 == 0 {
                first.push(refusal_time(0));
                last.push(refusal_time(usize::MAX));
            } else {
                last.push(refusal_time(usize::MAX));
                first.push(refusal_time(0));
            }
        }
        let (first, last) = (median(&mut first), median(&mut last));
        let bound = (first.max(last) / 5).max(Duration::from_micros(200));
        let gap = first.abs_diff(last);
        rounds.push((first, last));
        eprintln!("refusal medians: wrong first byte {first:?}, wrong last byte {last:?}");
        if gap < bound {
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
    }
    panic!("the refusal's time tells where the proof is wrong: medians (first, last) {rounds:?}");
}

// ---------------------------------------------------------------------------------------------
// Slow and many clients.

/// The agent's handshake deadline (no knob on its command line).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

fn handshake_timed_out() -> Seen {
    Seen::Error(ErrorCode::ProtocolViolation, "handshake timed out".into())
}

/// A slowloris: the hello, proof and request one byte a second. Dribbling does not extend the
/// handshake deadline (5 s from the connection by default), nobody else waits meanwhile, and
/// at the deadline the client is told and closed.
#[test]
fn a_slowloris_handshake_times_out_and_delays_nobody() {
    let agent = Agent::start();
    let socket = agent.socket.clone();
    let connected = Instant::now();
    let (mut slow, request) = sh_request(&socket, "echo never", StdinMode::Null);
    let mut answer = Vec::new();
    let mut sent = 0;
    let mut execs = 0;
    let ended = loop {
        if sent < request.len() {
            slow.send(&request[sent..sent + 1]);
            sent += 1;
        }
        // Meanwhile others are served promptly.
        if execs < 10 {
            assert_serving(&socket, "a slowloris connected");
            execs += 1;
        }
        match slow.next_frame_within(Duration::from_secs(1)) {
            Ok(Some(seen)) => answer.push(seen),
            Ok(None) => break connected.elapsed(),
            Err(()) => {}
        }
        assert!(
            connected.elapsed() < HANDSHAKE_TIMEOUT + Duration::from_secs(4),
            "never timed out"
        );
    };
    assert!(sent < request.len(), "the whole request went through");
    // The agent's hello was taken at the opening: the refusal is all that follows.
    assert_eq!(answer, [handshake_timed_out()]);
    assert!(ended > HANDSHAKE_TIMEOUT, "ended after {ended:?}");
}

/// Hundreds of connections at once, each with a request, and hundreds that say nothing: all
/// requests are served, the silent ones delay nobody, and once they are gone the listener has
/// the descriptors and the spares it started with.
#[test]
fn hundreds_of_connections_at_once() {
    const MANY: usize = 300;
    // All of them served at once: beyond `max_connections` they would be told `Busy` (see
    // tests/listener.rs).
    let agent = Agent::start_with(&["--set", "max_connections=1024"]);
    let listener = agent.pid();
    wait_children(listener, 2, Duration::from_secs(5));
    let fds = settled_fds(listener);
    // All connected first, then each takes the agent's hello and sends its request.
    let mut busy: Vec<Raw> = (0..MANY).map(|_| Raw::connect(&agent.socket)).collect();
    for (i, raw) in busy.iter_mut().enumerate() {
        let mut session = raw.greet(Some(secret()));
        let argv = format!("/bin/sh\0-c\0echo {i}\0");
        raw.send(&exec_bytes(
            &mut session,
            &exec(argv.as_bytes(), StdinMode::Null),
        ));
    }
    let silent: Vec<Raw> = (0..MANY).map(|_| Raw::connect(&agent.socket)).collect();
    for (i, raw) in busy.iter_mut().enumerate() {
        let seen = raw.frames_until_closed();
        assert_eq!(stdout_of(&seen), format!("{i}\n").as_bytes(), "{seen:?}");
    }
    assert_serving(&agent.socket, "hundreds of silent connections");
    drop(busy);
    drop(silent);
    let left = wait_children(listener, 2, Duration::from_secs(10));
    assert_eq!(left.len(), 2, "connection processes left: {}", left.len());
    assert_listener_fds_settle(listener, &fds);
}

/// The listener holds as many descriptors as `before` once its children's news is in (their
/// numbers may differ: a connection's report pipe is kept until its process ends).
fn assert_listener_fds_settle(listener: u32, before: &[u32]) {
    let settled = wait_until(Duration::from_secs(5), || {
        open_fds(listener).len() == before.len()
    });
    assert!(
        settled,
        "the listener's descriptors: {:?}, before {before:?}",
        open_fds(listener)
    );
}

/// The descriptors `pid` has open once they stay the same for a while (spares come and go).
fn settled_fds(pid: u32) -> Vec<u32> {
    let mut fds = open_fds(pid);
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let now = open_fds(pid);
        if now == fds {
            break;
        }
        fds = now;
    }
    fds
}

// ---------------------------------------------------------------------------------------------
// Stdin.

/// A command that never reads: its pipe fills, then credit stops. Exactly the credit left is
/// accepted; one byte more is a breach, answered with an error, and the command's group dies.
#[test]
fn stdin_exactly_at_the_credit_edge_and_one_byte_beyond() {
    let agent = Agent::start();
    let (mut raw, request) = sh_request(&agent.socket, "exec sleep 30", StdinMode::Pipe);
    raw.send(&request);
    let pgid = raw.started();
    let mut sent = 0usize;
    let mut credited = 0usize;
    // The whole window at once, then whatever credit comes back (what fit the pipe), until
    // it stops: the pipe is full.
    for _ in 0..STDIN_WINDOW / MAX_DATA {
        raw.send_frame(&ClientFrame::Stdin(Bytes(&[b's'; MAX_DATA])));
        sent += MAX_DATA;
    }
    loop {
        match raw.next_frame_within(Duration::from_millis(500)) {
            Ok(Some(Seen::Credit(n))) => credited += n as usize,
            Err(()) => break,
            other => panic!("{other:?}"),
        }
    }
    let credit = STDIN_WINDOW - (sent - credited);
    assert!(credited > 0 && credit > 0, "no credit came back");
    // Exactly at the edge, in pieces of up to a chunk: taken without a word.
    let mut left = credit;
    while left > 0 {
        let n = left.min(MAX_DATA);
        raw.send_frame(&ClientFrame::Stdin(Bytes(&vec![b'e'; n])));
        left -= n;
    }
    assert_eq!(
        raw.next_frame_within(Duration::from_millis(500)),
        Err(()),
        "the agent answered stdin within credit"
    );
    assert!(!group_members(pgid).is_empty(), "the command died");
    // One byte beyond.
    raw.send_frame(&ClientFrame::Stdin(Bytes(b"!")));
    let seen = raw.frames_until_closed();
    let beyond = Seen::Error(ErrorCode::ProtocolViolation, "stdin beyond credit".into());
    assert_eq!(seen, [beyond]);
    assert_group_gone(pgid, Duration::from_secs(5), "after stdin beyond credit");
}

/// A command that closes its stdin at once and keeps running: what the client sends can no
/// longer be written (EPIPE), so it is discarded and credited back, and credit keeps flowing
/// for as much as the client cares to send.
#[test]
fn stdin_closed_by_the_command_keeps_credit_flowing() {
    let agent = Agent::start();
    let (mut raw, request) = sh_request(
        &agent.socket,
        "exec 0<&-; sleep 3; echo done",
        StdinMode::Pipe,
    );
    raw.send(&request);
    raw.started();
    let started = Instant::now();
    let total = 16usize << 20;
    let (mut sent, mut credit, mut credited) = (0usize, STDIN_WINDOW, 0usize);
    let chunk = vec![b'x'; MAX_DATA];
    while sent < total {
        if credit == 0 {
            match raw.next_frame() {
                Some(Seen::Credit(n)) => {
                    (credit, credited) = (credit + n as usize, credited + n as usize)
                }
                other => panic!("after {sent} bytes: {other:?}"),
            }
            continue;
        }
        let n = credit.min(MAX_DATA);
        raw.send_frame(&ClientFrame::Stdin(Bytes(&chunk[..n])));
        (sent, credit) = (sent + n, credit - n);
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "16 MiB of stdin took {took:?}"
    );
    raw.send_frame(&ClientFrame::StdinEof);
    let seen = raw.frames_until_closed();
    assert!(
        seen.iter().all(|s| !matches!(s, Seen::Error(..))),
        "{seen:?}"
    );
    // Every byte is credited back before the end, the ones discarded at EPIPE included.
    for frame in &seen {
        if let Seen::Credit(n) = frame {
            credited += *n as usize;
        }
    }
    assert_eq!(credited, sent, "credit never returned");
    assert_eq!(stdout_of(&seen), b"done\n");
    assert_eq!(termination(&seen).status, ExitStatus::Code(0));
}

// ---------------------------------------------------------------------------------------------
// Limits.

/// `count` NUL-terminated entries of exactly `total` bytes, `head` first, each entry made by
/// `entry(index, length without NUL)`.
fn list(
    head: &[&str],
    count: usize,
    total: usize,
    entry: impl Fn(usize, usize) -> String,
) -> Vec<u8> {
    let mut out: Vec<u8> = head
        .iter()
        .flat_map(|h| [h.as_bytes(), b"\0"].concat())
        .collect();
    let rest = count - head.len();
    for i in 0..rest {
        let left = total - out.len();
        let share = left / (rest - i);
        out.extend_from_slice(entry(i, share - 1).as_bytes());
        out.push(0);
    }
    assert_eq!(
        (out.len(), out.iter().filter(|b| **b == 0).count()),
        (total, count)
    );
    out
}

/// Frames for a request whose lists travel in pieces (`ExecPart`, then the exec frame with empty
/// lists), encoded by hand: the client session would refuse to send one beyond the limits.
fn request_in_pieces(argv: &[u8], env: &[u8], cwd: Option<&[u8]>) -> Vec<u8> {
    let mut frames = Vec::new();
    for (list, bytes) in [(ListKind::Argv, argv), (ListKind::Env, env)] {
        for piece in bytes.chunks(MAX_DATA) {
            frames.extend(encode(&ClientFrame::ExecPart(ExecPart {
                list,
                data: Bytes(piece),
            })));
        }
    }
    let request = ExecRequest {
        cwd: cwd.map(Bytes),
        ..exec(b"", StdinMode::Null)
    };
    frames.extend(encode(&ClientFrame::Exec(request)));
    frames
}

/// argv and env at exactly their limits (bytes and entries at once) are taken, and then either
/// run or meet the kernel's own limit (E2BIG: `ArgumentsTooLong`, never a crash); one byte, one
/// entry or one entry's byte more is refused before anything runs; a working directory of
/// exactly `MAX_PATH` bytes passes validation, one more byte does not.
#[test]
fn argv_env_and_cwd_at_the_limits_and_one_over() {
    let agent = Agent::start();
    let script = "echo $# ${#1}; env | grep -c '^HOSTILE_'";
    let argv = |extra_byte: usize, extra_entry: usize| {
        let head = ["/bin/sh", "-c", script, "sh"];
        list(
            &head,
            MAX_ARGS + extra_entry,
            MAX_ARGV_BYTES + extra_byte,
            |_, n| "a".repeat(n),
        )
    };
    let env = |extra_byte: usize, extra_entry: usize| {
        list(
            &[],
            MAX_ENV_VARS + extra_entry,
            MAX_ENV_BYTES + extra_byte,
            |i, n| {
                let key = format!("HOSTILE_{i:05}=");
                format!("{key}{}", "v".repeat(n - key.len()))
            },
        )
    };
    let attempt = |argv: &[u8], env: &[u8], cwd: Option<&[u8]>| {
        let (mut raw, mut session) = Raw::open(&agent.socket);
        raw.send(&[opening(&mut session), request_in_pieces(argv, env, cwd)].concat());
        raw.frames_until_closed()
    };
    let at_limit = attempt(&argv(0, 0), &env(0, 0), None);
    eprintln!("at the limit: {:?}", &at_limit[..at_limit.len().min(3)]);
    match &at_limit[..] {
        [Seen::Authenticated, Seen::Error(ErrorCode::ArgumentsTooLong, _)] => {}
        _ => {
            let expected = format!(
                "{} {}\n{}\n",
                MAX_ARGS - 4,
                MAX_ARGV_BYTES / MAX_ARGS - 1,
                MAX_ENV_VARS
            );
            assert_eq!(String::from_utf8(stdout_of(&at_limit)).unwrap(), expected);
            assert_eq!(termination(&at_limit).status, ExitStatus::Code(0));
        }
    }
    // What the kernel takes runs: 20000 arguments and one of 100 KiB beside them.
    let many = list(
        &["/bin/sh", "-c", script, "sh"],
        20_004,
        20_004 * 21,
        |_, n| "b".repeat(n),
    );
    let long = [many.as_slice(), &vec![b'c'; 100 * 1024], b"\0"].concat();
    let seen = attempt(&long, b"HOSTILE_1=1\0", None);
    assert_eq!(
        String::from_utf8(stdout_of(&seen)).unwrap(),
        "20001 20\n1\n"
    );
    let limit = Seen::Error(
        ErrorCode::LimitExceeded,
        "request exceeds the agent's limits".into(),
    );
    let entry_over = [b"true\0".as_slice(), &vec![b'x'; MAX_ARG_LEN], b"\0"].concat();
    for (name, argv, env) in [
        ("argv a byte over", argv(1, 0), env(0, 0)),
        ("argv an entry over", argv(0, 1), env(0, 0)),
        ("env a byte over", argv(0, 0), env(1, 0)),
        ("env an entry over", argv(0, 0), env(0, 1)),
        ("an entry a byte over", entry_over, Vec::new()),
    ] {
        assert_eq!(
            attempt(&argv, &env, None),
            [Seen::Authenticated, limit.clone()],
            "{name}"
        );
    }
    let cwd = |len: usize| format!("/{}", "d".repeat(len - 1)).into_bytes();
    let true_argv = b"true\0";
    let seen = attempt(true_argv, b"", Some(&cwd(MAX_PATH)));
    assert!(
        matches!(
            &seen[..],
            [Seen::Authenticated, Seen::Error(ErrorCode::BadCwd, _)]
        ),
        "{seen:?}"
    );
    assert_eq!(
        attempt(true_argv, b"", Some(&cwd(MAX_PATH + 1))),
        [Seen::Authenticated, limit]
    );
}

// ---------------------------------------------------------------------------------------------
// The agent's own environment.

/// A command inherits exactly 0, 1 and 2, even when whoever started the agent leaked
/// descriptors into it (here fds 7 and 9, open without close-on-exec).
#[test]
fn commands_inherit_only_the_standard_descriptors() {
    let agent = Launched::start("exec 7</dev/null 9<>/dev/null");
    let listener_fds = open_fds(agent.pid());
    assert!(
        listener_fds.contains(&7),
        "the leak was not set up: {listener_fds:?}"
    );
    // The shell's own descriptors, listed by a child that opens nothing of its own in there.
    let fds = run(&agent.socket, "ls /proc/$$/fd");
    assert_eq!(fds, "0\n1\n2\n");
    let fds = run(&agent.socket, "exec ls /proc/self/fd");
    assert_eq!(fds, "0\n1\n2\n3\n", "ls's own directory is 3");
}

/// Signals whoever started the agent ignored (`nohup`, `trap '' INT`) stay ignored for the agent,
/// and every command gets them back at their defaults: `kill -INT` ends it as it would anywhere.
#[test]
fn signals_the_launcher_ignored_are_not_ignored_by_commands() {
    let agent = Launched::start("trap '' INT HUP QUIT USR1");
    // SigIgn of the listener: the agent itself keeps them ignored.
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let ignored = status
        .lines()
        .find_map(|line| line.strip_prefix("SigIgn:"))
        .map(|mask| u64::from_str_radix(mask.trim(), 16).unwrap())
        .unwrap();
    for signal in [1, 2, 3, 10] {
        assert_ne!(
            ignored & (1 << (signal - 1)),
            0,
            "the agent's own SIG{signal}"
        );
    }
    // The command's own mask: none of those is ignored.
    let mask = run(&agent.socket, "grep SigIgn: /proc/self/status");
    let mask = u64::from_str_radix(mask.trim().trim_start_matches("SigIgn:").trim(), 16).unwrap();
    for signal in [1, 2, 3, 10, 13] {
        assert_eq!(
            mask & (1 << (signal - 1)),
            0,
            "SIG{signal} is ignored in {mask:x}"
        );
    }
    // And it acts on them.
    let out = run(
        &agent.socket,
        "sh -c 'kill -INT $$; sleep 5'; echo status $?",
    );
    assert_eq!(out, "status 130\n");
}

/// An odd umask: the socket is the owner's alone whatever the umask (whoever can connect can
/// run commands as the agent's user), and commands inherit the agent's umask, as any child
/// does.
#[test]
fn the_socket_is_private_whatever_the_umask() {
    for (umask, expected) in [("000", "0000"), ("077", "0077"), ("027", "0027")] {
        let agent = Launched::start(&format!("umask {umask}"));
        let meta = std::fs::symlink_metadata(&agent.socket).unwrap();
        assert!(meta.file_type().is_socket());
        let mode = meta.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "umask {umask}: socket mode {mode:o}");
        assert_eq!(
            run(&agent.socket, "umask").trim(),
            expected,
            "umask {umask}"
        );
    }
}

/// A second agent on a path where one listens: it must fail, saying why, and leave the first
/// one's socket alone (not unlink it and listen in its place). A socket file nobody listens on
/// (an agent that was killed) is taken over, as before.
#[test]
fn a_second_agent_on_a_live_socket_fails_and_leaves_it_alone() {
    let first = Agent::start();
    let inode = std::fs::symlink_metadata(&first.socket).unwrap().ino();
    let mut second = Spawned(spawn_agent("", &first.socket));
    let exited = wait_until(Duration::from_secs(5), || {
        second.0.try_wait().unwrap().is_some()
    });
    assert!(
        exited,
        "the second agent is running on the first one's path"
    );
    let status = second.0.wait().unwrap();
    assert!(!status.success(), "{status:?}");
    let mut said = String::new();
    second
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut said)
        .unwrap();
    assert!(said.contains("cannot listen"), "it said {said:?}");
    assert_eq!(
        std::fs::symlink_metadata(&first.socket).unwrap().ino(),
        inode,
        "the first agent's socket was replaced"
    );
    assert_serving(&first.socket, "a second agent tried the same path");
    // The first agent's connection processes only: the probe's, if any, has ended.
    assert_eq!(
        wait_children(first.pid(), 2, Duration::from_secs(5)).len(),
        2
    );

    // Killed without a chance to clean up: its socket file stays, and a new agent takes it.
    let dir = fresh_dir("ferry-hostile-stale");
    let socket = dir.join("agent.sock");
    let killed = Spawned(spawn_agent("", &socket));
    assert!(wait_until(Duration::from_secs(10), || is_listening(
        &socket
    )));
    drop(killed);
    // Its spares die with it (their parent-death signal); until then they still listen, and
    // a new agent would rightly refuse the path.
    assert!(wait_until(Duration::from_secs(5), || !is_listening(
        &socket
    )));
    assert!(
        std::fs::symlink_metadata(&socket).is_ok(),
        "the socket file went with it"
    );
    let next = Spawned(spawn_agent("", &socket));
    let listening = wait_until(Duration::from_secs(10), || is_listening(&socket));
    assert!(listening, "a stale socket file blocked a new agent");
    assert_serving(&socket, "taking over a stale socket");
    drop(next);
    let _ = std::fs::remove_dir_all(&dir);
}

/// What each connection process holds, beyond the agent's own 0, 1 and 2: its socket, the jobs'
/// channel, the read ends of the command's stdout and stderr, the command's pidfd, its own
/// report pipe (kept so the listener counts it until it ends), and the next operation's stdout
/// and stderr pipes and `/dev/null` (made while the command starts, right after `Started`);
/// nothing of the listener's (a spare forked while another waited used to keep that one's
/// report pipe).
#[test]
fn a_connection_process_holds_only_its_own_descriptors() {
    let agent = Agent::start();
    let target = |pid: &str, fd: u32| std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok();
    // What this test process leaked into the agent (whoever started it may have leaked some into
    // it): the agent has them too, as they were, and they are not the question here.
    let ours: Vec<_> = open_fds(std::process::id())
        .into_iter()
        .map(|fd| (fd, target("self", fd)))
        .collect();
    let kinds = |pid: u32| {
        let mut kinds: Vec<String> = open_fds(pid)
            .into_iter()
            .filter(|fd| *fd > 2)
            .filter(|fd| !ours.contains(&(*fd, target(&pid.to_string(), *fd))))
            .filter_map(|fd| target(&pid.to_string(), fd))
            .map(|target| {
                let target = target.to_string_lossy().into_owned();
                target.split(':').next().unwrap_or_default().to_owned()
            })
            .collect();
        kinds.sort();
        kinds
    };
    // Several at once, so spares are forked while others wait.
    let mut held = Vec::new();
    for _ in 0..5 {
        let (mut raw, request) = sh_request(&agent.socket, "exec sleep 5", StdinMode::Null);
        raw.send(&request);
        let pgid = raw.started();
        let connection = parent_of(pgid);
        let expected = [
            "/dev/null",
            "anon_inode",
            "pipe",
            "pipe",
            "pipe",
            "pipe",
            "pipe",
            "pipe",
            "pipe",
            "socket",
            // The jobs' channel (see ARCHITECTURE.md).
            "socket",
        ];
        wait_until(Duration::from_secs(5), || kinds(connection) == expected);
        assert_eq!(
            kinds(connection),
            expected,
            "connection process {connection}"
        );
        held.push(raw);
    }
    drop(held);
}
