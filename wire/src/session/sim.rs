//! A simulated pair (quinn-proto's `Pair`): a client session and an agent session joined by two
//! in-memory byte pipes, driven by a seeded random scheduler that chunks the byte streams at
//! random, interleaves the two directions at random, stalls either side at random, and bounds
//! each pipe like a socket buffer. The agent side runs a model command instead of a process.
//!
//! Every conversation must end — no deadlock, no livelock — with exactly the outcome the model
//! predicts, whatever the schedule. This is where the protocol's edge cases are tested without
//! processes. Each conversation runs against a secure agent (both ends share a secret, fresh
//! nonces per run) or an insecure one (neither has a secret).
//!
//! Protocol 3 in the scenarios: requests large enough to go in pieces (the agent's driver
//! appends them and checks it got the request byte for byte), signals, resizes and cancels
//! while the command runs (the model command reacts: a terminal size is echoed, a signal kills
//! it unless it is one ignored by default, a cancel or a timeout ends it with `SIGTERM` — or
//! with `SIGKILL` after the grace, for a command that ignores `SIGTERM` — and the record says
//! so), keepalives as the simulated clock advances (the client checks the agent's liveness with
//! `handle_input_at`/`handle_timeout`, so a keepalive that does not come fails the run), a
//! client that half-closes its side once it has nothing more to send (the record still comes),
//! and an output cap the agent's driver applies (head, `OutputDropped`, tail, in order with the
//! data).

use std::collections::VecDeque;
use std::vec::Vec;

use super::*;
use crate::limits::{MAX_DATA, MAX_FRAME, MAX_INLINE_LIST, NONCE_LEN};
use crate::msg::{
    Ending, ErrorCode, ExecRequest, ExitStatus, ListKind, Security, StdinMode, StrList, Stream,
    StreamRecord, TreeKill, WindowSize, DEFAULT_KILL_GRACE_MS,
};
use crate::recv::RecvBuf;
use crate::{DataKind, DATA_HEADROOM};

/// A small, fast, seedable PRNG (xorshift64*): the schedule of a failing run is replayed from
/// its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    /// A size with a heavy tail: mostly small, sometimes up to `max`.
    pub fn size(&mut self, max: usize) -> usize {
        match self.below(4) {
            0 => 1 + self.below(4.min(max)),
            1 => 1 + self.below(64.min(max)),
            2 => 1 + self.below(4096.min(max)),
            _ => 1 + self.below(max),
        }
    }
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// What the model command does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Program {
    /// Writes `stdout` and `stderr` (interleaved at random), then exits with `code`.
    Print {
        stdout: Vec<u8>,
        stderr: Vec<u8>,
        code: u8,
    },
    /// Copies stdin to stdout until EOF, then exits 0.
    Cat,
    /// Reads `take` bytes of stdin, then exits with 3 (the rest of stdin is discarded).
    Head { take: usize },
    /// Dies of `signal` at once.
    Killed { signal: u8 },
    /// Does not exist: the agent refuses with `NotFound`.
    Missing,
    /// Exits 0 at once, but something it left behind keeps writing `flood` bytes to stdout
    /// afterwards: the drain limit cuts it.
    Flood { flood: usize },
    /// Not a program: the client asks for a kill-all, the agent reports `count` processes.
    KillAll { count: u32 },
    /// Writes `greeting` to stdout, then waits: on a terminal it writes each size it is given
    /// (`ROWSxCOLS\n`); it ignores the signals Linux ignores by default, dies of any other,
    /// and ends as `end` says.
    Wait {
        greeting: Vec<u8>,
        /// The sizes the client gives its terminal (one after the other, once the greeting and
        /// the previous size came back).
        resizes: Vec<WindowSize>,
        /// Harmless signals the client sends while it waits (ignored).
        ignored: Vec<u8>,
        end: WaitEnd,
        /// The command ignores `SIGTERM`: a cancel or a timeout ends it with `SIGKILL`, after
        /// the grace.
        ignores_term: bool,
    },
}

/// How a [`Program::Wait`] ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitEnd {
    /// The client sends this signal (one that kills).
    Signal(u8),
    /// The client cancels it with these graces (a second cancel can only bring the kill
    /// closer).
    Cancel(Vec<Option<u32>>),
    /// The request's timeout, in milliseconds, ends it.
    Timeout(u64),
}

/// The signals whose default action is to be ignored (`SIGCHLD`, `SIGCONT`, `SIGURG`,
/// `SIGWINCH`): the model command lives on.
const IGNORED_SIGNALS: [u8; 4] = [17, 18, 23, 28];

/// Whether the agent checks who connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Both ends know the same secret: the client proves it, then the agent does.
    Secure,
    /// Neither has a secret; the agent announces it runs insecure.
    Insecure,
}

/// One conversation: the program and, for stdin-reading ones, what the client sends.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub program: Program,
    pub stdin: Option<Vec<u8>>,
    pub mode: Mode,
    /// The request's argv and environment (large ones go in pieces).
    pub argv: Vec<u8>,
    pub env: Vec<u8>,
    /// The request's output cap (0: none).
    pub max_output: u64,
    /// The client shuts its side once it has nothing more to send (after its stdin's EOF;
    /// with `no_eof`, instead of it).
    pub half_close: bool,
    /// With `half_close`: the half-close is the only end of stdin the client sends.
    pub no_eof: bool,
}

/// How a conversation ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub started: bool,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Each `OutputDropped`: its stream, how much of that stream had come before it, and the
    /// bytes dropped.
    pub drops: Vec<(Stream, usize, u64)>,
    pub end: End,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The termination record (duration left out: it depends on the schedule).
    Exited(Record),
    /// The agent's error frame.
    Refused(ErrorCode),
    /// The kill-all's report.
    Done(u32),
}

/// A termination record without its duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub status: ExitStatus,
    pub output_dropped: bool,
    pub ending: Ending,
    pub tree_kill: TreeKill,
    pub stdout: StreamRecord,
    pub stderr: StreamRecord,
    pub pipes_held: bool,
    pub peak_memory: u64,
}

impl Record {
    fn of(end: &crate::Termination) -> Record {
        Record {
            status: end.status,
            output_dropped: end.output_dropped,
            ending: end.ending,
            tree_kill: end.tree_kill,
            stdout: end.stdout,
            stderr: end.stderr,
            pipes_held: end.pipes_held,
            peak_memory: end.peak_memory,
        }
    }
}

/// The agent's policy in the simulation: a small drain limit so floods are cheap.
pub const SIM_DRAIN_LIMIT: usize = 100_000;
/// The agent's keepalive interval in the simulation (ms): short enough that long commands see
/// several, long enough that three of them outlast the scheduler's stalls.
pub const SIM_KEEPALIVE_MS: u32 = 25;
/// The interval for a request in pieces: the agent sends nothing before it has the whole
/// request, so the client's liveness check must allow for the upload (as a real agent's
/// handshake deadline, which covers the upload, is well within three real intervals).
const SIM_KEEPALIVE_LARGE_MS: u32 = 250;
/// The request's grace between `SIGTERM` and `SIGKILL` in the simulation (ms).
const SIM_KILL_GRACE_MS: u32 = 3;

impl Scenario {
    pub fn random(rng: &mut Rng, mode: Mode) -> Scenario {
        let program = match rng.below(10) {
            0 | 1 => {
                let out = rng.size(100_000);
                let err = if rng.chance(50) { rng.size(20_000) } else { 0 };
                Program::Print {
                    stdout: rng.bytes(out),
                    stderr: rng.bytes(err),
                    code: rng.below(256) as u8,
                }
            }
            2 | 3 => Program::Cat,
            4 => Program::Head {
                take: rng.below(100_000),
            },
            5 => {
                if rng.chance(50) {
                    Program::Killed {
                        signal: 1 + rng.below(31) as u8,
                    }
                } else {
                    Program::Missing
                }
            }
            6 => Program::Flood {
                flood: SIM_DRAIN_LIMIT + rng.size(100_000),
            },
            7 => Program::KillAll {
                count: rng.below(10) as u32,
            },
            _ => Self::random_wait(rng),
        };
        let stdin = match program {
            Program::Cat | Program::Head { .. } => {
                let len = if rng.chance(10) { 0 } else { rng.size(200_000) };
                Some(rng.bytes(len))
            }
            _ => None,
        };
        let (argv, env) = random_lists(rng, &program);
        // The cap applies where the expected output does not depend on the schedule.
        let max_output = match program {
            Program::Print { .. } | Program::Cat if rng.chance(30) => 1 + rng.size(60_000) as u64,
            _ => 0,
        };
        let half_close = !matches!(program, Program::Missing) && rng.chance(30);
        let no_eof = half_close && matches!(program, Program::Cat) && rng.chance(50);
        Scenario {
            program,
            stdin,
            mode,
            argv,
            env,
            max_output,
            half_close,
            no_eof,
        }
    }

    /// A conversation without protocol 3's extras: the program's name alone for argv, no
    /// environment, no cap, no half-close.
    pub fn plain(program: Program, stdin: Option<Vec<u8>>, mode: Mode) -> Scenario {
        Scenario {
            argv: program_name(&program).to_vec(),
            program,
            stdin,
            mode,
            env: Vec::new(),
            max_output: 0,
            half_close: false,
            no_eof: false,
        }
    }

    fn random_wait(rng: &mut Rng) -> Program {
        let len = rng.size(4_000);
        let greeting = rng.bytes(len);
        let ignored = (0..rng.below(3))
            .map(|_| IGNORED_SIGNALS[rng.below(IGNORED_SIGNALS.len())])
            .collect();
        let ignores_term = rng.chance(40);
        let (end, resizes) = match rng.below(3) {
            0 => {
                // A signal that kills: anything but the ignored ones (and those that stop).
                let mut signal = 1 + rng.below(64) as u8;
                while IGNORED_SIGNALS.contains(&signal) || (19..=22).contains(&signal) {
                    signal = 1 + rng.below(64) as u8;
                }
                (WaitEnd::Signal(signal), random_sizes(rng))
            }
            1 => {
                let graces = (0..1 + rng.below(2))
                    .map(|_| rng.chance(70).then(|| rng.below(10) as u32))
                    .collect();
                (WaitEnd::Cancel(graces), random_sizes(rng))
            }
            // A timeout races the client's resizes: none then.
            _ => (WaitEnd::Timeout(1 + rng.below(200) as u64), Vec::new()),
        };
        Program::Wait {
            greeting,
            resizes,
            ignored,
            end,
            ignores_term,
        }
    }

    /// The request's terminal: a waiting command the client resizes has one (others may).
    fn pty(&self) -> Option<WindowSize> {
        match &self.program {
            Program::Wait { resizes, .. }
                if !resizes.is_empty() || self.argv.len().is_multiple_of(2) =>
            {
                Some(WindowSize { rows: 24, cols: 80 })
            }
            _ => None,
        }
    }

    /// Whether the request goes in pieces.
    fn large(&self) -> bool {
        self.argv.len() > MAX_INLINE_LIST || self.env.len() > MAX_INLINE_LIST
    }

    /// The keepalive interval of the simulated agent.
    fn keepalive_ms(&self) -> u32 {
        if self.large() {
            SIM_KEEPALIVE_LARGE_MS
        } else {
            SIM_KEEPALIVE_MS
        }
    }

    fn timeout_ms(&self) -> u64 {
        match self.program {
            Program::Wait {
                end: WaitEnd::Timeout(ms),
                ..
            } => ms,
            _ => 0,
        }
    }

    /// The request the client sends.
    pub fn request(&self) -> ExecRequest<'_> {
        ExecRequest {
            argv: StrList::new(&self.argv),
            env: StrList::new(&self.env),
            clean_env: false,
            cwd: None,
            stdin: if self.stdin.is_some() {
                StdinMode::Pipe
            } else {
                StdinMode::Null
            },
            user: None,
            pty: self.pty(),
            timeout_ms: self.timeout_ms(),
            kill_grace_ms: Some(SIM_KILL_GRACE_MS),
            kill_tree_on_exit: false,
            max_output: self.max_output,
        }
    }

    /// What the client must see, whatever the schedule. For a flood, the output is checked
    /// as a prefix separately (where the cut falls depends on the schedule).
    pub fn expected(&self) -> Outcome {
        let stdin = self.stdin.clone().unwrap_or_default();
        let record = |status, stdout: &[u8], stderr: &[u8]| Record {
            status,
            output_dropped: false,
            ending: Ending::Exited,
            tree_kill: TreeKill::None,
            stdout: StreamRecord {
                bytes: stdout.len() as u64,
                dropped: 0,
            },
            stderr: StreamRecord {
                bytes: stderr.len() as u64,
                dropped: 0,
            },
            pipes_held: false,
            peak_memory: self.argv.len() as u64,
        };
        let (stdout, stderr, end, started) = match &self.program {
            Program::Print {
                stdout,
                stderr,
                code,
            } => {
                let end = record(ExitStatus::Code(*code), stdout, stderr);
                (stdout.clone(), stderr.clone(), End::Exited(end), true)
            }
            Program::Cat => {
                let end = record(ExitStatus::Code(0), &stdin, &[]);
                (stdin, Vec::new(), End::Exited(end), true)
            }
            Program::Head { .. } => {
                let end = record(ExitStatus::Code(3), &[], &[]);
                (Vec::new(), Vec::new(), End::Exited(end), true)
            }
            Program::Killed { signal } => {
                let status = ExitStatus::Signal {
                    number: *signal,
                    core_dumped: false,
                };
                (
                    Vec::new(),
                    Vec::new(),
                    End::Exited(record(status, &[], &[])),
                    true,
                )
            }
            Program::Missing => (
                Vec::new(),
                Vec::new(),
                End::Refused(ErrorCode::NotFound),
                false,
            ),
            Program::Flood { .. } => {
                let mut end = record(ExitStatus::Code(0), &[], &[]);
                end.output_dropped = true;
                end.pipes_held = true;
                (Vec::new(), Vec::new(), End::Exited(end), true)
            }
            Program::KillAll { count } => (Vec::new(), Vec::new(), End::Done(*count), false),
            Program::Wait {
                greeting,
                resizes,
                end,
                ignores_term,
                ..
            } => {
                let mut stdout = greeting.clone();
                if self.pty().is_some() {
                    for size in resizes {
                        stdout.extend_from_slice(size_line(*size).as_bytes());
                    }
                }
                let term = if *ignores_term { 9 } else { 15 };
                let (number, ending, tree_kill) = match end {
                    WaitEnd::Signal(number) => (*number, Ending::Exited, TreeKill::None),
                    WaitEnd::Cancel(_) => (term, Ending::Cancelled, TreeKill::Cgroup),
                    WaitEnd::Timeout(_) => (term, Ending::TimedOut, TreeKill::Cgroup),
                };
                let status = ExitStatus::Signal {
                    number,
                    core_dumped: false,
                };
                let mut end = record(status, &stdout, &[]);
                end.ending = ending;
                end.tree_kill = tree_kill;
                (stdout, Vec::new(), End::Exited(end), true)
            }
        };
        let mut outcome = Outcome {
            started,
            stdout,
            stderr,
            drops: Vec::new(),
            end,
        };
        if self.max_output > 0 {
            // Each stream's head and tail, the middle dropped and counted.
            let cap = self.max_output as usize;
            let (head, tail) = (cap - cap / 2, cap / 2);
            let mut cut = |stream, data: &mut Vec<u8>| -> StreamRecord {
                let len = data.len();
                if len <= cap {
                    return StreamRecord {
                        bytes: len as u64,
                        dropped: 0,
                    };
                }
                let dropped = (len - cap) as u64;
                outcome.drops.push((stream, head, dropped));
                data.drain(head..len - tail);
                StreamRecord {
                    bytes: len as u64,
                    dropped,
                }
            };
            let stdout = cut(Stream::Stdout, &mut outcome.stdout);
            let stderr = cut(Stream::Stderr, &mut outcome.stderr);
            if let End::Exited(record) = &mut outcome.end {
                record.stdout = stdout;
                record.stderr = stderr;
                record.output_dropped = stdout.dropped > 0 || stderr.dropped > 0;
            }
        }
        outcome
    }
}

/// Up to three terminal sizes.
fn random_sizes(rng: &mut Rng) -> Vec<WindowSize> {
    (0..rng.below(4))
        .map(|_| WindowSize {
            rows: rng.below(300) as u16,
            cols: rng.below(1_000) as u16,
        })
        .collect()
}

/// What a waiting command writes when its terminal is resized.
fn size_line(size: WindowSize) -> String {
    std::format!("{}x{}\n", size.rows, size.cols)
}

/// The program's name, first in its argv (the model agent knows programs by it).
fn program_name(program: &Program) -> &'static [u8] {
    match program {
        Program::Print { .. } => b"print\0",
        Program::Cat => b"cat\0",
        Program::Head { .. } => b"head\0",
        Program::Killed { .. } => b"killed\0",
        Program::Missing => b"missing\0",
        Program::Flood { .. } => b"flood\0",
        Program::KillAll { .. } => b"",
        Program::Wait { .. } => b"wait\0",
    }
}

/// A request's argv (the program's name, then arguments) and environment: mostly small, in
/// one run of ten large enough to go in pieces, now and then as large as the limits allow.
fn random_lists(rng: &mut Rng, program: &Program) -> (Vec<u8>, Vec<u8>) {
    let mut argv = program_name(program).to_vec();
    let mut env = Vec::new();
    if matches!(program, Program::KillAll { .. }) {
        return (argv, env);
    }
    let (argv_len, env_len) = match rng.below(200) {
        0 => (crate::limits::MAX_ARGV_BYTES, crate::limits::MAX_ENV_BYTES),
        1..=19 => (
            MAX_INLINE_LIST + rng.size(300_000),
            if rng.chance(50) {
                MAX_INLINE_LIST + rng.size(150_000)
            } else {
                rng.size(100)
            },
        ),
        _ => (argv.len() + rng.size(200), rng.size(200)),
    };
    // Entries of random lengths (within the longest allowed), bytes that differ from place to
    // place so a piece out of order or lost shows.
    let longest = if rng.chance(20) {
        crate::limits::MAX_ARG_LEN
    } else {
        1 + rng.size(2_000)
    };
    // Long enough entries that their count stays within the limits.
    let shortest = argv_len / (crate::limits::MAX_ARGS / 2) + 1;
    while argv.len() < argv_len {
        let len = (shortest + rng.below(longest))
            .min(crate::limits::MAX_ARG_LEN)
            .min(argv_len - argv.len());
        argv.extend((1..len).map(|_| 1 + rng.below(255) as u8));
        argv.push(0);
    }
    let shortest = env_len / (crate::limits::MAX_ENV_VARS / 2) + 3;
    while env.len() + 3 <= env_len {
        let len = (shortest + rng.below(longest.saturating_sub(2).max(1)))
            .min(crate::limits::MAX_ARG_LEN)
            .min(env_len - env.len());
        env.push(b'A' + rng.below(26) as u8);
        env.push(b'=');
        env.extend((3..len).map(|_| 1 + rng.below(255) as u8));
        env.push(0);
    }
    (argv, env)
}

/// A byte pipe with a capacity, like one direction of a socket.
#[derive(Debug, Default)]
struct Wire {
    bytes: VecDeque<u8>,
    capacity: usize,
    closed: bool,
}

impl Wire {
    fn room(&self) -> usize {
        self.capacity.saturating_sub(self.bytes.len())
    }
    /// Writes up to `max` of `data`; returns how many were taken.
    fn write(&mut self, data: &[u8], max: usize) -> usize {
        let n = data.len().min(self.room()).min(max);
        self.bytes.extend(&data[..n]);
        n
    }
    fn read(&mut self, into: &mut [u8], max: usize) -> usize {
        let n = into.len().min(self.bytes.len()).min(max);
        for (slot, byte) in into.iter_mut().zip(self.bytes.drain(..n)) {
            *slot = byte;
        }
        n
    }
}

/// Bytes a side has encoded and not yet pushed into its wire.
#[derive(Debug, Default)]
struct Outbox {
    buf: Vec<u8>,
    sent: usize,
}

impl Outbox {
    fn is_empty(&self) -> bool {
        self.sent == self.buf.len()
    }
    fn push(&mut self, wire: &mut Wire, rng: &mut Rng) -> bool {
        let n = wire.write(&self.buf[self.sent..], rng.size(MAX_FRAME));
        self.sent += n;
        if self.is_empty() {
            self.buf.clear();
            self.sent = 0;
        }
        n > 0
    }
}

/// The client side: a ClientSession driven the way the host library drives it.
struct Client {
    session: ClientSession,
    recv: RecvBuf<Vec<u8>>,
    out: Outbox,
    frame: Vec<u8>,
    /// The operation, started once the agent's hello is in.
    scenario: Scenario,
    stdin: Option<(Vec<u8>, usize)>,
    outcome: Outcome,
    /// The agent proved the secret (secure), or announced it has none (insecure).
    authenticated: bool,
    ended: Option<Result<(), SessionError>>,
    /// What a waiting command's client has done: resizes sent, ignored signals sent, its end
    /// sent.
    resizes_sent: usize,
    ignored_sent: usize,
    end_sent: bool,
    /// The client has shut its side (or will, once its outbox is out).
    half_closing: bool,
    /// The last output timestamp seen: it never goes back.
    last_at: u64,
    /// Keepalives heard.
    keepalives: usize,
}

/// The agent side: an AgentSession driven the way the agent's pump drives it, with a model
/// command in place of a process.
struct Agent {
    session: AgentSession,
    recv: RecvBuf<Vec<u8>>,
    out: Outbox,
    frame: Vec<u8>,
    /// What an exec runs (the model agent has no PATH).
    program: Program,
    /// The request it must receive.
    argv: Vec<u8>,
    env: Vec<u8>,
    /// The pieces received so far.
    argv_parts: Vec<u8>,
    env_parts: Vec<u8>,
    command: Option<Command>,
    /// The client half-closed: nothing more is read.
    input_closed: bool,
    closed: bool,
}

/// The model command: its pipes are queues.
struct Command {
    program: Program,
    /// Stdin received and not yet "written to the pipe".
    stdin_buffered: VecDeque<u8>,
    stdin_eof: bool,
    /// Bytes the command has read from stdin.
    stdin_read: usize,
    stdout_pipe: VecDeque<u8>,
    stderr_pipe: VecDeque<u8>,
    /// Output the command has yet to write.
    to_write: (Vec<u8>, usize, Vec<u8>, usize),
    exited: bool,
    /// Output written after the exit by what it left behind.
    flood_left: usize,
    pipes_closed: bool,
    /// It has a terminal.
    pty: bool,
    /// A signal (its own or ferry's) ends it at its next step.
    dying: Option<u8>,
    /// What ended it, as the record says; how its tree was killed.
    ending: Ending,
    tree_kill: TreeKill,
    /// Its request's timeout, when it runs out.
    timeout_at: Option<Micros>,
    /// The request's grace between `SIGTERM` and `SIGKILL`.
    grace: Micros,
    /// `SIGTERM` was sent (by a cancel or the timeout); `SIGKILL` follows at this time.
    kill_at: Option<Micros>,
    term_sent: bool,
    /// The output cap, per stream.
    caps: Option<[Cap; 2]>,
}

/// The agent driver's output cap on one stream: the head goes out as it comes, the tail is
/// kept in a window, what falls out of it is dropped; at the end, the notice then the tail.
#[derive(Debug, Default)]
struct Cap {
    head_left: usize,
    tail: VecDeque<u8>,
    tail_max: usize,
    dropped: u64,
    notice_sent: bool,
}

const PIPE_CAPACITY: usize = 64 * 1024;

impl Command {
    fn new(program: Program, request: &ExecRequest<'_>, now: Micros) -> Command {
        let (out, err) = match &program {
            Program::Print { stdout, stderr, .. } => (stdout.clone(), stderr.clone()),
            _ => (Vec::new(), Vec::new()),
        };
        let flood_left = match program {
            Program::Flood { flood } => flood,
            _ => 0,
        };
        let cap = request.max_output as usize;
        let caps = (cap > 0).then(|| {
            let one = || Cap {
                head_left: cap - cap / 2,
                tail_max: cap / 2,
                ..Cap::default()
            };
            [one(), one()]
        });
        let grace = u64::from(request.kill_grace_ms.unwrap_or(DEFAULT_KILL_GRACE_MS)) * 1000;
        // A waiting command's greeting is in its pipe from the start (before any timeout).
        let stdout_pipe = match &program {
            Program::Wait { greeting, .. } => greeting.iter().copied().collect(),
            _ => VecDeque::new(),
        };
        Command {
            program,
            stdin_buffered: VecDeque::new(),
            stdin_eof: false,
            stdin_read: 0,
            stdout_pipe,
            stderr_pipe: VecDeque::new(),
            to_write: (out, 0, err, 0),
            exited: false,
            flood_left,
            pipes_closed: false,
            pty: request.pty.is_some(),
            dying: None,
            ending: Ending::Exited,
            tree_kill: TreeKill::None,
            timeout_at: (request.timeout_ms > 0).then(|| now + request.timeout_ms * 1000),
            grace,
            kill_at: None,
            term_sent: false,
            caps,
        }
    }

    fn ignores_term(&self) -> bool {
        matches!(
            self.program,
            Program::Wait {
                ignores_term: true,
                ..
            }
        )
    }

    /// `SIGTERM` to the tree (a cancel, the timeout), `SIGKILL` after `grace`; a later one can
    /// only bring the kill closer.
    fn terminate(&mut self, ending: Ending, grace: Micros, now: Micros) {
        if self.exited {
            return;
        }
        if !self.term_sent {
            self.term_sent = true;
            self.ending = ending;
            self.tree_kill = TreeKill::Cgroup;
            if !self.ignores_term() {
                self.dying.get_or_insert(15);
            }
        }
        let kill_at = now + grace;
        self.kill_at = Some(self.kill_at.map_or(kill_at, |at| at.min(kill_at)));
    }

    /// A signal from the client.
    fn signal(&mut self, number: u8) {
        if !self.exited && !IGNORED_SIGNALS.contains(&number) {
            self.dying.get_or_insert(number);
        }
    }

    /// The terminal was resized: a waiting command on a terminal writes its new size.
    fn resize(&mut self, size: WindowSize) {
        if self.pty && !self.exited && matches!(self.program, Program::Wait { .. }) {
            self.stdout_pipe.extend(size_line(size).as_bytes());
        }
    }

    /// Runs the command a little; returns its exit status when it exits now.
    fn step(
        &mut self,
        rng: &mut Rng,
        session: &mut AgentSession,
        now: Micros,
    ) -> Option<ExitStatus> {
        if self.exited {
            if self.flood_left > 0 && !self.pipes_closed {
                // It writes as fast as the pipe takes it: never seen idle.
                let n = self.flood_left.min(PIPE_CAPACITY - self.stdout_pipe.len());
                self.stdout_pipe.extend(core::iter::repeat_n(b'f', n));
                self.flood_left -= n;
            }
            return None;
        }
        if self.timeout_at.is_some_and(|at| now >= at) {
            self.timeout_at = None;
            let grace = self.grace;
            self.terminate(Ending::TimedOut, grace, now);
        }
        if self.kill_at.is_some_and(|at| now >= at) {
            // Unless the SIGTERM already ended it.
            self.dying.get_or_insert(9);
        }
        if let Some(number) = self.dying {
            return Some(ExitStatus::Signal {
                number,
                core_dumped: false,
            });
        }
        match self.program.clone() {
            Program::Print { code, .. } => {
                let (out, out_at, err, err_at) = &mut self.to_write;
                let to_stdout = rng.chance(50);
                let (src, at, pipe) = if to_stdout {
                    (&*out, &mut *out_at, &mut self.stdout_pipe)
                } else {
                    (&*err, &mut *err_at, &mut self.stderr_pipe)
                };
                let n = rng
                    .size(PIPE_CAPACITY)
                    .min(src.len() - *at)
                    .min(PIPE_CAPACITY - pipe.len());
                pipe.extend(&src[*at..*at + n]);
                *at += n;
                (*out_at == out.len() && *err_at == err.len()).then_some(ExitStatus::Code(code))
            }
            Program::Cat => {
                let n = rng
                    .size(PIPE_CAPACITY)
                    .min(self.stdin_buffered.len())
                    .min(PIPE_CAPACITY - self.stdout_pipe.len());
                self.stdout_pipe.extend(self.stdin_buffered.drain(..n));
                self.stdin_read += n;
                session.stdin_consumed(n);
                (self.stdin_eof && self.stdin_buffered.is_empty()).then_some(ExitStatus::Code(0))
            }
            Program::Head { take } => {
                let n = rng
                    .size(PIPE_CAPACITY)
                    .min(self.stdin_buffered.len())
                    .min(take - self.stdin_read);
                self.stdin_buffered.drain(..n);
                self.stdin_read += n;
                session.stdin_consumed(n);
                (self.stdin_read == take || (self.stdin_eof && self.stdin_buffered.is_empty()))
                    .then_some(ExitStatus::Code(3))
            }
            Program::Killed { signal } => Some(ExitStatus::Signal {
                number: signal,
                core_dumped: false,
            }),
            Program::Flood { .. } => Some(ExitStatus::Code(0)),
            Program::Missing | Program::KillAll { .. } | Program::Wait { .. } => None,
        }
    }

    /// Stdin nobody will read any more: discarded, credited back.
    fn discard_stdin(&mut self, session: &mut AgentSession) {
        session.stdin_consumed(self.stdin_buffered.len());
        self.stdin_buffered.clear();
    }
}

/// The simulation's result: the client's outcome and how the client session ended.
pub struct Run {
    pub outcome: Outcome,
    pub client_end: Result<(), SessionError>,
    /// Whether the client session reported the agent authenticated by the end.
    pub authenticated: bool,
    pub steps: usize,
    /// Keepalives the client heard.
    pub keepalives: usize,
}

/// The secret both ends of a secure simulated pair share.
const SIM_SECRET: &[u8] = b"the simulated VM's secret";

/// Runs one conversation under the schedule drawn from `seed`.
pub fn run(scenario: &Scenario, seed: u64, max_steps: usize) -> Result<Run, String> {
    let mut rng = Rng::new(seed);
    let mut now: Micros = 1_000;
    let config = AgentConfig {
        agent_version: "sim",
        drain_limit: SIM_DRAIN_LIMIT,
        limits: crate::Limits {
            keepalive_ms: scenario.keepalive_ms(),
            ..crate::Limits::CURRENT
        },
        ..AgentConfig::DEFAULT
    };
    // A request in pieces over a socket buffer of a few bytes would take the simulated
    // seconds a real one never does.
    let least = if scenario.large() { MAX_FRAME } else { 16 };
    let mut c2a = Wire {
        capacity: least + rng.size(256 * 1024),
        ..Wire::default()
    };
    let mut a2c = Wire {
        capacity: 16 + rng.size(256 * 1024),
        ..Wire::default()
    };
    // Fresh nonces for every run, as from the OS's random source.
    let mut nonce = || -> [u8; NONCE_LEN] {
        let mut nonce = [0u8; NONCE_LEN];
        for chunk in nonce.chunks_mut(8) {
            chunk.copy_from_slice(&rng.next().to_le_bytes());
        }
        nonce
    };
    let secret = match scenario.mode {
        Mode::Secure => Some(Secret::new(SIM_SECRET).map_err(|e| format!("secret: {e}"))?),
        Mode::Insecure => None,
    };
    let client_auth = ClientAuth {
        nonce: nonce(),
        secret: secret.clone(),
    };
    let agent_auth = AgentAuth {
        nonce: nonce(),
        secret,
    };
    let mut client = Client {
        session: ClientSession::new(now, Some(60_000_000), client_auth),
        recv: RecvBuf::new(vec![0u8; 2 * MAX_FRAME]),
        out: Outbox::default(),
        frame: vec![0u8; MAX_FRAME],
        scenario: scenario.clone(),
        stdin: scenario.stdin.clone().map(|bytes| (bytes, 0)),
        outcome: Outcome {
            started: false,
            stdout: Vec::new(),
            stderr: Vec::new(),
            drops: Vec::new(),
            end: End::Refused(ErrorCode::Internal),
        },
        authenticated: false,
        ended: None,
        resizes_sent: 0,
        ignored_sent: 0,
        end_sent: false,
        half_closing: false,
        last_at: 0,
        keepalives: 0,
    };
    let mut agent = Agent {
        session: AgentSession::new(config, now, agent_auth),
        recv: RecvBuf::new(vec![0u8; MAX_FRAME]),
        out: Outbox::default(),
        frame: vec![0u8; MAX_FRAME],
        program: scenario.program.clone(),
        argv: scenario.argv.clone(),
        env: scenario.env.clone(),
        argv_parts: Vec::new(),
        env_parts: Vec::new(),
        command: None,
        input_closed: false,
        closed: false,
    };

    // The agent speaks first; the client starts its operation once the agent's hello is in
    // (see `client_step`).
    // Stalls: a side skips its turns for a while.
    let mut client_stall = 0usize;
    let mut agent_stall = 0usize;
    for step in 0..max_steps {
        now += rng.below(50) as u64;
        if client.ended.is_some() && agent.closed {
            return Ok(Run {
                outcome: client.outcome,
                client_end: client.ended.unwrap_or(Ok(())),
                authenticated: client.authenticated,
                steps: step,
                keepalives: client.keepalives,
            });
        }
        if rng.chance(2) {
            client_stall = rng.size(200);
        }
        if rng.chance(2) {
            agent_stall = rng.size(200);
        }
        // Random delivery order: either side may go first this round.
        let client_first = rng.chance(50);
        for turn in 0..2 {
            if (turn == 0) == client_first {
                if client_stall > 0 {
                    client_stall -= 1;
                } else {
                    client_step(&mut client, &mut c2a, &mut a2c, &mut rng, now)?;
                }
            } else if agent_stall > 0 {
                agent_stall -= 1;
            } else {
                agent_step(&mut agent, &mut c2a, &mut a2c, &mut rng, now)?;
            }
        }
    }
    Err(format!(
        "no end after {max_steps} steps: client {:?} (credit {}), agent {:?}, wires c2a {} a2c {}",
        client.session.phase(),
        client.session.stdin_credit(),
        agent.session.phase(),
        c2a.bytes.len(),
        a2c.bytes.len()
    ))
}

fn client_step(
    client: &mut Client,
    c2a: &mut Wire,
    a2c: &mut Wire,
    rng: &mut Rng,
    now: Micros,
) -> Result<(), String> {
    if client.ended.is_some() {
        // The host library closes its socket once the operation is over.
        c2a.closed = true;
        a2c.bytes.clear();
        return Ok(());
    }
    // The agent's liveness (and the handshake's deadline): a keepalive that does not come
    // fails the run.
    client
        .session
        .handle_timeout(now)
        .map_err(|e| format!("client timeout: {e}"))?;
    if client.out.is_empty() && !client.half_closing {
        send_stdin(client, rng)?;
        send_controls(client, rng)?;
        let n = client
            .session
            .poll_transmit(&mut client.frame)
            .map_err(|e| format!("client poll_transmit: {e}"))?;
        client.out.buf.extend_from_slice(&client.frame[..n]);
        client.half_closing = client.scenario.half_close && client.has_sent_everything();
    }
    if !c2a.closed {
        client.out.push(c2a, rng);
        // A half-close once everything went out: the agent still owes the record.
        if client.half_closing && client.out.is_empty() {
            c2a.closed = true;
        }
    }
    // Read a random amount, then handle every whole frame; the agent was heard if bytes came.
    let spare = client
        .recv
        .spare()
        .map_err(|e| format!("client recv: {e}"))?;
    let n = a2c.read(spare, rng.size(MAX_FRAME));
    client.recv.commit(n);
    let mut heard = n > 0;
    loop {
        let result = if heard {
            client.session.handle_input_at(client.recv.data(), now)
        } else {
            client.session.handle_input(client.recv.data())
        };
        heard = false;
        let input = match result {
            Ok(input) => input,
            Err(err) => {
                client.ended = Some(Err(err));
                return Ok(());
            }
        };
        let consumed = input.consumed;
        match input.event {
            None if consumed == 0 => break,
            // A keepalive: proof of life, nothing more.
            None => client.keepalives += 1,
            Some(ClientEvent::HelloAccepted(info)) => {
                let security = announced_security(client, &info)?;
                client.authenticated = security == Security::Insecure;
                start_operation(client, rng)?;
            }
            Some(ClientEvent::Authenticated) => {
                if client.authenticated {
                    return Err("the agent proved itself twice".into());
                }
                client.authenticated = true;
            }
            Some(ClientEvent::StdinCredit { .. }) => {}
            Some(ClientEvent::OutputDropped(dropped)) => {
                let before = match dropped.stream {
                    Stream::Stdout => client.outcome.stdout.len(),
                    Stream::Stderr => client.outcome.stderr.len(),
                };
                client
                    .outcome
                    .drops
                    .push((dropped.stream, before, dropped.bytes));
            }
            Some(ClientEvent::Started { .. }) => {
                if !client.authenticated {
                    return Err("started before the agent proved itself".into());
                }
                client.outcome.started = true
            }
            Some(ClientEvent::Done(report)) => {
                if !client.authenticated {
                    return Err("done before the agent proved itself".into());
                }
                client.outcome.end = End::Done(report.count);
                client.ended = Some(Ok(()));
            }
            Some(ClientEvent::Stdout(data)) => {
                output_at(&client.session, &mut client.last_at)?;
                client.outcome.stdout.extend_from_slice(data)
            }
            Some(ClientEvent::Stderr(data)) => {
                output_at(&client.session, &mut client.last_at)?;
                client.outcome.stderr.extend_from_slice(data)
            }
            Some(ClientEvent::Exited(end)) => {
                client.outcome.end = End::Exited(Record::of(&end));
                client.ended = Some(Ok(()));
            }
            Some(ClientEvent::Refused(err)) => {
                client.outcome.end = End::Refused(err.code);
                client.ended = Some(Ok(()));
            }
            Some(other) => return Err(format!("the client heard {other:?}")),
        }
        client.recv.consume(consumed);
        if client.ended.is_some() {
            return Ok(());
        }
    }
    if a2c.closed && a2c.bytes.is_empty() {
        let left = client.recv.data().len();
        client.ended = Some(client.session.handle_eof(left));
    }
    Ok(())
}

/// Output timestamps never go back (the agent's clock only goes forward).
fn output_at(session: &ClientSession, last_at: &mut u64) -> Result<(), String> {
    let at = session.last_output_at();
    if at < *last_at {
        return Err(format!("output at {at} µs after output at {last_at}"));
    }
    *last_at = at;
    Ok(())
}

impl Client {
    /// The client will send nothing more: its operation, its stdin (and EOF, unless the
    /// half-close is its EOF) and its controls are out.
    fn has_sent_everything(&self) -> bool {
        if self.session.phase() == Phase::Hello || self.session.phase() == Phase::Idle {
            return false;
        }
        let stdin_done = match &self.stdin {
            Some((bytes, sent)) if self.scenario.no_eof => *sent == bytes.len(),
            Some(_) => !self.session.stdin_open(),
            None => true,
        };
        let controls_done = match &self.scenario.program {
            Program::Wait {
                end: WaitEnd::Timeout(_),
                ..
            } => true,
            Program::Wait { .. } => self.end_sent,
            _ => true,
        };
        stdin_done && controls_done
    }
}

/// Stdin within credit, in random pieces, then its end (unless the half-close is its end).
fn send_stdin(client: &mut Client, rng: &mut Rng) -> Result<(), String> {
    let Some((bytes, sent)) = client.stdin.as_mut() else {
        return Ok(());
    };
    if *sent < bytes.len() && client.session.stdin_open() {
        let piece = rng.size(bytes.len() - *sent);
        let written = client
            .session
            .send_stdin(&bytes[*sent..*sent + piece], &mut client.frame)
            .map_err(|e| format!("send_stdin: {e}"))?;
        *sent += written.taken;
        client
            .out
            .buf
            .extend_from_slice(&client.frame[..written.written]);
    }
    if *sent == bytes.len() && client.session.stdin_open() && !client.scenario.no_eof {
        let _ = client.session.close_stdin();
    }
    Ok(())
}

/// A waiting command's client: once the greeting (and each size it echoes) came back, the next
/// resize, the harmless signals, then its end. Any other running command gets a harmless signal
/// now and then.
fn send_controls(client: &mut Client, rng: &mut Rng) -> Result<(), String> {
    let running = client.session.phase() == Phase::Running;
    let mut frame = [0u8; 64];
    let n = match client.scenario.program.clone() {
        Program::Wait {
            greeting,
            resizes,
            ignored,
            end,
            ..
        } if running && !client.end_sent => {
            let mut echoed = greeting.len();
            for size in &resizes[..client.resizes_sent] {
                echoed += size_line(*size).len();
            }
            if client.outcome.stdout.len() < echoed || !rng.chance(30) {
                return Ok(());
            }
            if client.resizes_sent < resizes.len() {
                client.resizes_sent += 1;
                client
                    .session
                    .send_resize(resizes[client.resizes_sent - 1], &mut frame)
            } else if client.ignored_sent < ignored.len() {
                client.ignored_sent += 1;
                client
                    .session
                    .send_signal(ignored[client.ignored_sent - 1], &mut frame)
            } else {
                match end {
                    WaitEnd::Timeout(_) => return Ok(()),
                    WaitEnd::Signal(number) => {
                        client.end_sent = true;
                        client.session.send_signal(number, &mut frame)
                    }
                    WaitEnd::Cancel(graces) => {
                        client.end_sent = true;
                        let mut n = 0;
                        for grace in graces {
                            n += client
                                .session
                                .send_cancel(grace, &mut frame[n..])
                                .map_err(|e| format!("send_cancel: {e}"))?;
                        }
                        Ok(n)
                    }
                }
            }
        }
        Program::Wait { .. } => return Ok(()),
        _ if running && rng.chance(1) => client.session.send_signal(IGNORED_SIGNALS[3], &mut frame),
        _ => return Ok(()),
    }
    .map_err(|e| format!("a control: {e}"))?;
    client.out.buf.extend_from_slice(&frame[..n]);
    Ok(())
}

/// The security the agent announced, checked against what the session reports.
fn announced_security(client: &Client, info: &AgentInfo<'_>) -> Result<Security, String> {
    let session = &client.session;
    if info.protocol_version != crate::PROTOCOL_VERSION {
        return Err(format!("negotiated v{}", info.protocol_version));
    }
    if session.is_authenticated() != (info.security == Security::Insecure) {
        return Err("authenticated before the agent's proof".into());
    }
    if info.limits.keepalive_ms != client.scenario.keepalive_ms() {
        return Err(format!("keepalive every {} ms", info.limits.keepalive_ms));
    }
    Ok(info.security)
}

/// Starts the scenario's operation behind our hello (and proof), as the host library does: in
/// one write, or (at random) after our hello went out on its own.
fn start_operation(client: &mut Client, rng: &mut Rng) -> Result<(), String> {
    if rng.chance(30) {
        let n = client
            .session
            .poll_transmit(&mut client.frame)
            .map_err(|e| format!("client poll_transmit: {e}"))?;
        client.out.buf.extend_from_slice(&client.frame[..n]);
    }
    let n = match client.scenario.program {
        Program::KillAll { .. } => client.session.start_kill_all(&mut client.frame),
        _ => {
            let scenario = client.scenario.clone();
            let request = scenario.request();
            // A large request needs a larger buffer than a frame.
            let len = ClientSession::exec_buffer_len(&request);
            if client.frame.len() < len {
                client.frame.resize(len, 0);
            }
            client.session.start_exec(&request, &mut client.frame)
        }
    }
    .map_err(|e| format!("starting the operation: {e}"))?;
    client.out.buf.extend_from_slice(&client.frame[..n]);
    Ok(())
}

fn agent_step(
    agent: &mut Agent,
    c2a: &mut Wire,
    a2c: &mut Wire,
    rng: &mut Rng,
    now: Micros,
) -> Result<(), String> {
    if agent.closed {
        return Ok(());
    }
    // Deadlines: the handshake's, the drain's, the keepalive's.
    let _ = agent.session.handle_timeout(now);
    // Receive, until the client half-closed. The end of its stream is noticed whenever it
    // comes, while the final frame waits to go out too: that frame is still owed.
    if !agent.input_closed {
        if c2a.closed && c2a.bytes.is_empty() {
            agent
                .session
                .handle_eof()
                .map_err(|e| format!("handle_eof: {e}"))?;
            if agent.session.input_closed() {
                // A half-close mid-operation: no more input (stdin ends), the command runs on
                // (or what is owed goes out).
                agent.input_closed = true;
                if let Some(command) = agent.command.as_mut() {
                    command.stdin_eof = true;
                }
            } else {
                // Before a request: the conversation is over.
                agent.command = None;
                agent.closed = true;
                a2c.closed = true;
                return Ok(());
            }
        } else if !agent.session.is_closing() {
            receive(agent, c2a, rng, now)?;
        }
    }
    // Run the command and move its output.
    if let Some(command) = agent.command.as_mut() {
        if let Some(status) = command.step(rng, &mut agent.session, now) {
            command.exited = true;
            command.discard_stdin(&mut agent.session);
            agent
                .session
                .child_exited(status, now)
                .map_err(|e| format!("child_exited: {e}"))?;
        }
        if command.exited {
            command.discard_stdin(&mut agent.session);
        }
    }
    if agent.out.is_empty() {
        let n = agent
            .session
            .poll_transmit(&mut agent.frame)
            .map_err(|e| format!("agent poll_transmit: {e}"))?;
        if n > 0 {
            agent.out.buf.extend_from_slice(&agent.frame[..n]);
        } else if let Some(command) = agent.command.as_mut() {
            let peak_memory = agent.argv.len() as u64;
            let finished = move_output(
                command,
                &mut agent.session,
                &mut agent.out,
                &mut agent.frame,
                rng,
                now,
                peak_memory,
            )?;
            if finished {
                agent.command = None;
            }
        }
    }
    agent.out.push(a2c, rng);
    if agent.session.is_closed() && agent.out.is_empty() {
        agent.closed = true;
        a2c.closed = true;
    }
    Ok(())
}

/// Reads what the client sent and handles every whole frame.
fn receive(agent: &mut Agent, c2a: &mut Wire, rng: &mut Rng, now: Micros) -> Result<(), String> {
    let spare = agent.recv.spare().map_err(|e| format!("agent recv: {e}"))?;
    let n = c2a.read(spare, rng.size(MAX_FRAME));
    agent.recv.commit(n);
    loop {
        let input = match agent.session.handle_input(agent.recv.data(), now) {
            Ok(input) => input,
            Err(err) => return Err(format!("the agent refused the client: {err}")),
        };
        let consumed = input.consumed;
        match input.event {
            None if consumed == 0 => break,
            None | Some(AgentEvent::Hello) | Some(AgentEvent::Authenticated) => {}
            // The simulated client only runs commands and kill-alls (`ops_tests` and the
            // transcripts cover the rest).
            Some(
                event @ (AgentEvent::Put(_)
                | AgentEvent::PutEnd(_)
                | AgentEvent::Get(_)
                | AgentEvent::Info
                | AgentEvent::Shutdown(_)
                | AgentEvent::TimeSync(_)
                | AgentEvent::Reseed(_)),
            ) => return Err(format!("the agent received {event:?}")),
            Some(AgentEvent::ExecPart { list, data }) => match list {
                ListKind::Argv => agent.argv_parts.extend_from_slice(data),
                ListKind::Env => agent.env_parts.extend_from_slice(data),
            },
            Some(AgentEvent::KillAll) => match agent.program {
                Program::KillAll { count } => agent
                    .session
                    .done(count, now)
                    .map_err(|e| format!("done: {e}"))?,
                _ => return Err("the agent received a kill-all".into()),
            },
            Some(AgentEvent::Exec(valid)) => {
                let request = valid.request();
                // The driver appends the exec's own lists to the pieces: the whole request.
                let parts = !agent.argv_parts.is_empty() || !agent.env_parts.is_empty();
                if valid.has_parts() != parts {
                    return Err(format!(
                        "has_parts {} with pieces {parts}",
                        valid.has_parts()
                    ));
                }
                agent.argv_parts.extend_from_slice(request.argv.as_bytes());
                agent.env_parts.extend_from_slice(request.env.as_bytes());
                if agent.argv_parts != agent.argv || agent.env_parts != agent.env {
                    return Err(format!(
                        "the agent received another request: argv {} / {} bytes, env {} / {}",
                        agent.argv_parts.len(),
                        agent.argv.len(),
                        agent.env_parts.len(),
                        agent.env.len()
                    ));
                }
                let big = agent.argv.len() > MAX_INLINE_LIST || agent.env.len() > MAX_INLINE_LIST;
                if parts != big {
                    return Err(format!("pieces {parts} for a request large {big}"));
                }
                let program = agent.program.clone();
                if program == Program::Missing {
                    let refusal = Refusal::os(ErrorCode::NotFound, 2, "no such program");
                    agent
                        .session
                        .refuse(refusal, now)
                        .map_err(|e| format!("refuse: {e}"))?;
                } else {
                    agent
                        .session
                        .started(4242, now)
                        .map_err(|e| format!("started: {e}"))?;
                    agent.command = Some(Command::new(program, request, now));
                }
            }
            Some(AgentEvent::Stdin(data)) => match agent.command.as_mut() {
                Some(command) if !command.exited => command.stdin_buffered.extend(data),
                // Nobody reads it: credited back at once.
                _ => agent.session.stdin_consumed(data.len()),
            },
            Some(AgentEvent::StdinEof) => {
                if let Some(command) = agent.command.as_mut() {
                    command.stdin_eof = true;
                }
            }
            Some(AgentEvent::Signal(number)) => {
                if let Some(command) = agent.command.as_mut() {
                    command.signal(number);
                }
            }
            Some(AgentEvent::Resize(size)) => {
                if let Some(command) = agent.command.as_mut() {
                    command.resize(size);
                }
            }
            Some(AgentEvent::Cancel { grace_ms }) => {
                if let Some(command) = agent.command.as_mut() {
                    let grace = grace_ms.map_or(command.grace, |ms| u64::from(ms) * 1000);
                    command.terminate(Ending::Cancelled, grace, now);
                }
            }
        }
        agent.recv.consume(consumed);
    }
    Ok(())
}

/// One output frame from a pipe, as the pump does it (through the output cap, if the request
/// has one); finishes the operation once the command exited and its pipes are done.
fn move_output(
    command: &mut Command,
    session: &mut AgentSession,
    out: &mut Outbox,
    frame: &mut [u8],
    rng: &mut Rng,
    now: Micros,
    peak_memory: u64,
) -> Result<bool, String> {
    let phase = session.output_phase(now);
    if phase == OutputPhase::Closed {
        command.pipes_closed = true;
        command.stdout_pipe.clear();
    }
    let order = if rng.chance(50) {
        [DataKind::Stdout, DataKind::Stderr]
    } else {
        [DataKind::Stderr, DataKind::Stdout]
    };
    if !command.pipes_closed {
        for kind in order {
            let index = usize::from(kind == DataKind::Stderr);
            let pipe = match kind {
                DataKind::Stderr => &mut command.stderr_pipe,
                _ => &mut command.stdout_pipe,
            };
            let mut n = rng.size(MAX_DATA).min(pipe.len());
            if let Some(cap) = command.caps.as_mut().map(|caps| &mut caps[index]) {
                // Past the head, into the tail window; what falls out of it is dropped.
                n = n.min(cap.head_left);
                if n == 0 {
                    cap.tail.extend(pipe.drain(..));
                    let over = cap.tail.len().saturating_sub(cap.tail_max);
                    cap.tail.drain(..over);
                    cap.dropped += over as u64;
                    continue;
                }
                cap.head_left -= n;
            }
            if n == 0 {
                continue;
            }
            for (slot, byte) in frame[DATA_HEADROOM..].iter_mut().zip(pipe.drain(..n)) {
                *slot = byte;
            }
            let start = session
                .frame_output(frame, kind, n, now)
                .map_err(|e| format!("frame_output: {e}"))?;
            out.buf.extend_from_slice(&frame[start..DATA_HEADROOM + n]);
            return Ok(false);
        }
    }
    // Pipes empty: once the command exited (and whatever it left behind is done or cut), the
    // operation is over.
    // Past the grace period an idle pipe is closed, whatever might still write to it.
    let leftovers_done =
        command.flood_left == 0 || command.pipes_closed || phase == OutputPhase::Drain;
    if !(command.exited && leftovers_done) {
        return Ok(false);
    }
    // What the cap held back: the notice of what was dropped, then the tail.
    if let Some([stdout, stderr]) = command.caps.as_mut() {
        for (cap, stream, kind) in [
            (stdout, Stream::Stdout, DataKind::Stdout),
            (stderr, Stream::Stderr, DataKind::Stderr),
        ] {
            if cap.dropped > 0 && !cap.notice_sent {
                cap.notice_sent = true;
                let n = session
                    .encode_output_dropped(stream, cap.dropped, frame)
                    .map_err(|e| format!("encode_output_dropped: {e}"))?;
                out.buf.extend_from_slice(&frame[..n]);
                return Ok(false);
            }
            if !cap.tail.is_empty() {
                let n = rng.size(MAX_DATA).min(cap.tail.len());
                for (slot, byte) in frame[DATA_HEADROOM..].iter_mut().zip(cap.tail.drain(..n)) {
                    *slot = byte;
                }
                let start = session
                    .frame_output(frame, kind, n, now)
                    .map_err(|e| format!("frame_output: {e}"))?;
                out.buf.extend_from_slice(&frame[start..DATA_HEADROOM + n]);
                return Ok(false);
            }
        }
    }
    let facts = EndFacts {
        ending: command.ending,
        tree_kill: command.tree_kill,
        pipes_held: command.flood_left > 0 || command.pipes_closed,
        oom_killed: false,
        peak_memory,
    };
    session
        .finish_with(now, facts)
        .map_err(|e| format!("finish: {e}"))?;
    let n = session
        .poll_transmit(frame)
        .map_err(|e| format!("agent poll_transmit: {e}"))?;
    out.buf.extend_from_slice(&frame[..n]);
    Ok(true)
}
