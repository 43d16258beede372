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
//!
//! Protocol 4 in the scenarios: puts (random content within credit, before the agent's checks
//! passed too; the right digest or a wrong one; a destination that exists; a tree with entries
//! left out; a client that goes away before its digest, after which nothing may be committed),
//! gets (random content, entries left out at known offsets, a missing file), infos (the system,
//! then mounts and interfaces, cut at `MAX_INFO_ITEMS`), time syncs, reseeds and shutdowns. The
//! agent's driver keeps a model file system: what a put committed is compared byte for byte, and
//! both ends' SHA-256 (`sha2`) must agree.
//!
//! Protocol 5's jobs in the scenarios, against a model registry in the agent's driver: a job's
//! start (its name in use or not), a listing (cut at `MAX_JOBS`, its `Done` counting what went
//! whatever the driver says), an attachment (the retained output in random chunks with a gap's
//! notice where the ring overran, then the live output and the job's record, or `Done` when it
//! does not follow; a harmless signal relayed now and then), a wait that lasts (keepalives keep
//! the client's liveness check content) or finds the job ended, kills and removals the registry
//! grants or refuses, and unknown jobs.

use std::collections::VecDeque;
use std::vec::Vec;

use super::*;
use crate::jobs::{
    AttachHeader, AttachRequest, JobQuery, JobRecord, JobRequest, JobStarted, JobState, KillJob,
    Resume,
};
use crate::limits::{MAX_DATA, MAX_FRAME, MAX_INLINE_LIST, NONCE_LEN};
use crate::msg::{
    AgentFrame, Ending, ErrorCode, ExecRequest, ExitStatus, ListKind, Security, StdinMode, StrList,
    Stream, StreamRecord, TreeKill, WindowSize, DEFAULT_KILL_GRACE_MS,
};
use crate::ops::{
    FileHeader, FileSummary, GetRequest, InterfaceInfo, MountInfo, PutRequest, ShutdownRequest,
    SkipReason, SystemInfo, Timestamp, TransferKind, DIGEST_LEN,
};
use crate::recv::RecvBuf;
use crate::{ByteArray, Bytes};
use crate::{DataKind, DATA_HEADROOM};
use sha2::{Digest, Sha256};

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
    /// Not a program: the client writes a file.
    Put(PutScenario),
    /// Not a program: the client reads a file.
    Get(GetScenario),
    /// Not a program: the client asks about the guest, which has this many mounts and
    /// interfaces (the agent sends at most `MAX_INFO_ITEMS` of them).
    Info { mounts: usize, interfaces: usize },
    /// Not a program: the client sets the guest's clock to `to`; it said `previous`.
    TimeSync { to: Timestamp, previous: Timestamp },
    /// Not a program: the client adds these bytes to the guest's entropy pool.
    Reseed { random: Vec<u8> },
    /// Not a program: the client powers the guest off (or reboots it).
    Shutdown(ShutdownRequest),
    /// Not a program: a job operation (protocol 5) against the agent's model registry.
    Job(JobScenario),
}

impl Program {
    /// Whether this is one of protocol 4's operations, not a command.
    pub fn is_operation(&self) -> bool {
        matches!(
            self,
            Program::Put(_)
                | Program::Get(_)
                | Program::Info { .. }
                | Program::TimeSync { .. }
                | Program::Reseed { .. }
                | Program::Shutdown(_)
                | Program::Job(_)
        )
    }
}

/// A put: its content and how it goes.
#[derive(Clone, PartialEq, Eq)]
pub struct PutScenario {
    pub content: Vec<u8>,
    /// The client sends another digest than its content's: nothing may be committed.
    pub wrong_digest: bool,
    /// The request carries the content's size.
    pub declare_size: bool,
    /// A tree: the agent leaves these entries out once it has written this much.
    pub tree: Option<Vec<(usize, Vec<u8>)>>,
    /// The destination exists and the client said no clobber: refused before any content is
    /// taken.
    pub exists: bool,
    /// The agent's checks take this long (µs): content arrives before `FileReady`.
    pub checks_us: u64,
    /// The client goes away (before its digest) once this many content bytes are out.
    pub vanish_at: Option<usize>,
}

/// A get: the file's content and how it goes.
#[derive(Clone, PartialEq, Eq)]
pub struct GetScenario {
    pub content: Vec<u8>,
    /// A tree: these entries are left out, at these offsets of the stream.
    pub tree: Option<Vec<(usize, Vec<u8>)>>,
    /// The file does not exist.
    pub missing: bool,
}

impl core::fmt::Debug for PutScenario {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "put {} bytes (wrong digest {}, size declared {}, tree {:?}, exists {}, checks {} µs, \
             vanish at {:?})",
            self.content.len(),
            self.wrong_digest,
            self.declare_size,
            self.tree.as_ref().map(|entries| entries.len()),
            self.exists,
            self.checks_us,
            self.vanish_at
        )
    }
}

impl core::fmt::Debug for GetScenario {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "get {} bytes (tree {:?}, missing {})",
            self.content.len(),
            self.tree.as_ref().map(|entries| entries.len()),
            self.missing
        )
    }
}

/// Where the simulated transfers go.
const PUT_PATH: &[u8] = b"/srv/put";
const GET_PATH: &[u8] = b"/srv/get";
/// The modification time every simulated file has.
const SIM_MTIME: Timestamp = Timestamp {
    secs: 1_700_000_000,
    nanos: 5,
};

impl PutScenario {
    /// The digest the client sends.
    fn digest(&self) -> [u8; DIGEST_LEN] {
        let mut digest = sha256(&self.content);
        if self.wrong_digest {
            digest[0] ^= 1;
        }
        digest
    }

    fn request(&self) -> PutRequest<'static> {
        PutRequest {
            path: Bytes(PUT_PATH),
            kind: if self.tree.is_some() {
                TransferKind::Tree
            } else {
                TransferKind::File
            },
            mode: None,
            owner: None,
            mtime: Some(SIM_MTIME),
            size: (self.declare_size && self.tree.is_none()).then_some(self.content.len() as u64),
            create_parents: true,
            no_clobber: self.exists,
            user: None,
        }
    }

    /// The destination as the agent will write it.
    fn header(&self) -> FileHeader {
        let (size, mode) = match (&self.tree, self.declare_size) {
            (Some(_), _) => (0, 0o040755),
            (None, true) => (self.content.len() as u64, 0o100644),
            (None, false) => (0, 0o100644),
        };
        FileHeader {
            size,
            mode,
            mtime: SIM_MTIME,
            uid: 0,
            gid: 0,
        }
    }
}

impl GetScenario {
    fn request(&self) -> GetRequest<'static> {
        GetRequest {
            path: Bytes(GET_PATH),
            kind: if self.tree.is_some() {
                TransferKind::Tree
            } else {
                TransferKind::File
            },
            user: None,
        }
    }

    fn header(&self) -> FileHeader {
        FileHeader {
            size: if self.tree.is_some() {
                0
            } else {
                self.content.len() as u64
            },
            mode: if self.tree.is_some() {
                0o040755
            } else {
                0o100600
            },
            mtime: SIM_MTIME,
            uid: 1000,
            gid: 1000,
        }
    }
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; DIGEST_LEN] {
    Sha256::digest(data).into()
}

/// Entries a tree leaves out: up to three, at offsets within `len`, in order.
fn random_skips(rng: &mut Rng, len: usize) -> Vec<(usize, Vec<u8>)> {
    let mut offsets: Vec<usize> = (0..rng.below(4)).map(|_| rng.below(len + 1)).collect();
    offsets.sort_unstable();
    offsets
        .into_iter()
        .enumerate()
        .map(|(i, at)| (at, std::format!("dev/node{i}").into_bytes()))
        .collect()
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
    /// A put's or get's header (a get's content is in `stdout`).
    pub header: Option<FileHeader>,
    /// A tree's entries left out: how much content had come before each, and its path.
    pub skipped: Vec<(usize, Vec<u8>)>,
    /// An info's frames: `system`, then each mount's target and each interface's name.
    pub info: Vec<Vec<u8>>,
    /// What the agent committed (a put's file): the agent's side of the outcome.
    pub committed: Option<Vec<u8>>,
    /// An attachment's header.
    pub attached: Option<AttachHeader>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The termination record (duration left out: it depends on the schedule).
    Exited(Record),
    /// The agent's error frame.
    Refused(ErrorCode),
    /// The report of a kill-all, an info, a reseed or a shutdown.
    Done(u32),
    /// A transfer's summary.
    FileDone(FileSummary),
    /// A time sync's answer: the clock before.
    ClockSet(Timestamp),
    /// The client went away mid-put, before its digest (it reports nothing else).
    Vanished,
    /// A detached job started.
    Detached(JobStarted),
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
        let program = if rng.chance(6) {
            Program::Job(JobScenario::random(rng))
        } else if rng.chance(30) {
            Self::random_operation(rng)
        } else {
            Self::random_program(rng)
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
        // A client that goes away mid-put has closed already.
        let vanishes = matches!(&program, Program::Put(put) if put.vanish_at.is_some());
        let half_close = !matches!(program, Program::Missing) && !vanishes && rng.chance(30);
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

    /// One of protocol 4's operations.
    fn random_operation(rng: &mut Rng) -> Program {
        match rng.below(20) {
            0..=6 => {
                let len = if rng.chance(10) { 0 } else { rng.size(200_000) };
                let content = rng.bytes(len);
                let tree = rng.chance(20).then(|| random_skips(rng, len));
                let vanish_at =
                    (len > 0 && tree.is_none() && rng.chance(15)).then(|| rng.below(len));
                Program::Put(PutScenario {
                    wrong_digest: vanish_at.is_none() && rng.chance(15),
                    declare_size: rng.chance(50),
                    tree,
                    exists: vanish_at.is_none() && rng.chance(8),
                    checks_us: if rng.chance(30) {
                        rng.below(20_000) as u64
                    } else {
                        0
                    },
                    vanish_at,
                    content,
                })
            }
            7..=11 => {
                let len = if rng.chance(10) { 0 } else { rng.size(200_000) };
                Program::Get(GetScenario {
                    tree: rng.chance(25).then(|| random_skips(rng, len)),
                    missing: rng.chance(8),
                    content: rng.bytes(len),
                })
            }
            12 | 13 => {
                let many = rng.chance(10);
                Program::Info {
                    mounts: rng.below(if many { 300 } else { 8 }),
                    interfaces: rng.below(if many { 300 } else { 4 }),
                }
            }
            14 | 15 => {
                let mut stamp = || Timestamp {
                    secs: rng.next() as i64 >> 20,
                    nanos: rng.below(1_000_000_000) as u32,
                };
                Program::TimeSync {
                    to: stamp(),
                    previous: stamp(),
                }
            }
            16 | 17 => {
                let len = 1 + rng.below(crate::limits::MAX_RESEED);
                Program::Reseed {
                    random: rng.bytes(len),
                }
            }
            _ => Program::Shutdown(ShutdownRequest {
                reboot: rng.chance(50),
                grace_ms: rng.below(crate::limits::MAX_SHUTDOWN_GRACE_MS as usize + 1) as u32,
            }),
        }
    }

    /// A command (or a kill-all).
    fn random_program(rng: &mut Rng) -> Program {
        match rng.below(10) {
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
            Program::Put(_)
            | Program::Get(_)
            | Program::Info { .. }
            | Program::TimeSync { .. }
            | Program::Reseed { .. }
            | Program::Shutdown(_)
            | Program::Job(_) => return self.expected_operation(),
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
            ..Outcome::default()
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

impl Scenario {
    /// What a protocol-4 operation must end with.
    fn expected_operation(&self) -> Outcome {
        let mut outcome = Outcome::default();
        match &self.program {
            Program::Put(put) => {
                let summary = FileSummary {
                    bytes: put.content.len() as u64,
                    sha256: ByteArray(sha256(&put.content)),
                };
                if put.vanish_at.is_some() {
                    outcome.end = End::Vanished;
                } else if put.exists {
                    outcome.end = End::Refused(ErrorCode::AlreadyExists);
                } else {
                    outcome.header = Some(put.header());
                    outcome.skipped = put
                        .tree
                        .iter()
                        .flatten()
                        .map(|(_, path)| (0, path.clone()))
                        .collect();
                    if put.wrong_digest {
                        outcome.end = End::Refused(ErrorCode::IntegrityMismatch);
                    } else {
                        outcome.end = End::FileDone(summary);
                        outcome.committed = Some(put.content.clone());
                    }
                }
            }
            Program::Get(get) if get.missing => outcome.end = End::Refused(ErrorCode::NotFound),
            Program::Get(get) => {
                outcome.header = Some(get.header());
                outcome.stdout = get.content.clone();
                outcome.skipped = get.tree.clone().unwrap_or_default();
                outcome.end = End::FileDone(FileSummary {
                    bytes: get.content.len() as u64,
                    sha256: ByteArray(sha256(&get.content)),
                });
            }
            Program::Info { mounts, interfaces } => {
                outcome.info = info_items(*mounts, *interfaces);
                let items = outcome.info.len() - 1;
                outcome.end = End::Done(items as u32);
            }
            Program::TimeSync { previous, .. } => outcome.end = End::ClockSet(*previous),
            Program::Reseed { random } => outcome.end = End::Done(random.len() as u32),
            Program::Shutdown(_) => outcome.end = End::Done(0),
            Program::Job(job) => return job.expected(),
            _ => unreachable!("not an operation of protocol 4"),
        }
        outcome
    }
}

impl Default for Outcome {
    fn default() -> Outcome {
        Outcome {
            started: false,
            stdout: Vec::new(),
            stderr: Vec::new(),
            drops: Vec::new(),
            end: End::Refused(ErrorCode::Internal),
            header: None,
            skipped: Vec::new(),
            info: Vec::new(),
            committed: None,
            attached: None,
        }
    }
}

/// What an info operation reports (and the client receives): the system, then the mounts, then
/// the interfaces, at most `MAX_INFO_ITEMS` of those.
fn info_items(mounts: usize, interfaces: usize) -> Vec<Vec<u8>> {
    let mut items = vec![b"system".to_vec()];
    items.extend((0..mounts).map(|i| std::format!("/mnt/{i}").into_bytes()));
    items.extend((0..interfaces).map(|i| std::format!("eth{i}").into_bytes()));
    items.truncate(1 + crate::limits::MAX_INFO_ITEMS);
    items
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
        Program::Wait { .. } => b"wait\0",
        _ => b"",
    }
}

/// A request's argv (the program's name, then arguments) and environment: mostly small, in
/// one run of ten large enough to go in pieces, now and then as large as the limits allow.
fn random_lists(rng: &mut Rng, program: &Program) -> (Vec<u8>, Vec<u8>) {
    let mut argv = program_name(program).to_vec();
    let mut env = Vec::new();
    if argv.is_empty() {
        // Not a command.
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
    /// A protocol-4 operation in progress.
    task: Option<Task>,
    /// The model file system's put destination: what a put committed.
    committed: Option<Vec<u8>>,
    /// The client half-closed: nothing more is read.
    input_closed: bool,
    closed: bool,
}

/// A protocol-4 operation the agent's driver carries out.
enum Task {
    Put(PutTask),
    Get(GetTask),
    /// The frames an info still sends (the system's first), and how many went.
    Info {
        items: Vec<Vec<u8>>,
        sent: usize,
    },
    /// A job operation in progress.
    Job(JobTask),
}

/// A put in progress: content is held until the checks passed, then written at the pace the
/// "disk" takes it, into a temporary file that only a right digest commits.
struct PutTask {
    scenario: PutScenario,
    /// When the checks pass; `FileReady` goes out then.
    ready_at: Micros,
    ready: bool,
    /// Content received, not yet written.
    held: VecDeque<u8>,
    written: Vec<u8>,
    digest: Option<[u8; DIGEST_LEN]>,
    skipped_sent: usize,
}

/// A get in progress.
struct GetTask {
    scenario: GetScenario,
    sent: usize,
    skipped_sent: usize,
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
            // Waits, or not a command at all.
            _ => None,
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
        outcome: Outcome::default(),
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
        task: None,
        committed: None,
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
            let mut outcome = client.outcome;
            outcome.committed = agent.committed.take();
            return Ok(Run {
                outcome,
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
    if client.vanishes() {
        // Gone mid-put, whatever was still in its outbox with it (maybe half a frame): it
        // reports nothing else.
        client.outcome = Outcome {
            end: End::Vanished,
            ..Outcome::default()
        };
        client.ended = Some(Ok(()));
        c2a.closed = true;
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
            Some(ClientEvent::FileReady(header)) => {
                if !client.authenticated {
                    return Err("a file header before the agent proved itself".into());
                }
                client.outcome.header = Some(header);
            }
            Some(ClientEvent::FileData(data)) => client.outcome.stdout.extend_from_slice(data),
            Some(ClientEvent::Skipped(skipped)) => {
                let at = client.outcome.stdout.len();
                client.outcome.skipped.push((at, skipped.path.0.to_vec()));
            }
            Some(ClientEvent::FileDone(summary)) => {
                // The client checks a get's content against the agent's digest itself.
                if matches!(client.scenario.program, Program::Get(_))
                    && (sha256(&client.outcome.stdout) != summary.sha256.0
                        || client.outcome.stdout.len() as u64 != summary.bytes)
                {
                    return Err("the content differs from its summary".into());
                }
                client.outcome.end = End::FileDone(summary);
                client.ended = Some(Ok(()));
            }
            Some(ClientEvent::SystemInfo(_)) => client.outcome.info.push(b"system".to_vec()),
            Some(ClientEvent::Mount(mount)) => client.outcome.info.push(mount.target.0.to_vec()),
            Some(ClientEvent::Interface(interface)) => {
                client.outcome.info.push(interface.name.as_bytes().to_vec())
            }
            Some(ClientEvent::ClockSet(previous)) => {
                client.outcome.end = End::ClockSet(previous);
                client.ended = Some(Ok(()));
            }
            Some(ClientEvent::Detached(job)) => {
                client.outcome.end = End::Detached(job);
                client.ended = Some(Ok(()));
            }
            Some(ClientEvent::Job(record)) => {
                client.outcome.info.push(record.id.to_string().into_bytes())
            }
            Some(ClientEvent::Attached(header)) => {
                if !client.authenticated {
                    return Err("attached before the agent proved itself".into());
                }
                client.outcome.attached = Some(header);
            }
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
    /// A put's client goes away once its share of the content is out (and the agent proved
    /// itself: the run checks every conversation was authenticated).
    fn vanishes(&self) -> bool {
        let Program::Put(PutScenario {
            vanish_at: Some(at),
            ..
        }) = &self.scenario.program
        else {
            return false;
        };
        let sent = self.stdin.as_ref().map_or(0, |(_, sent)| *sent);
        self.authenticated && sent >= *at && !self.session.is_finished()
    }

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
        match &client.scenario.program {
            // A client that will go away never sends its digest.
            Program::Put(put) if put.vanish_at.is_some() => {}
            // A put's content ends with its digest.
            Program::Put(put) => {
                let n = client
                    .session
                    .end_put(&put.digest(), &mut client.frame)
                    .map_err(|e| format!("end_put: {e}"))?;
                client.out.buf.extend_from_slice(&client.frame[..n]);
            }
            _ => {
                let _ = client.session.close_stdin();
            }
        }
    }
    Ok(())
}

/// A waiting command's client: once the greeting (and each size it echoes) came back, the next
/// resize, the harmless signals, then its end. Any other running command gets a harmless signal
/// now and then.
fn send_controls(client: &mut Client, rng: &mut Rng) -> Result<(), String> {
    let running = client.session.phase() == Phase::Running;
    let mut frame = [0u8; 64];
    if !matches!(client.scenario.program, Program::Wait { .. }) {
        // Now and then a harmless signal: controls are for commands, the client refuses them
        // for anything else.
        if !running || !rng.chance(1) {
            return Ok(());
        }
        let result = client.session.send_signal(IGNORED_SIGNALS[3], &mut frame);
        // An attachment relays it to its job (the model job ignores it).
        let attach = matches!(
            client.scenario.program,
            Program::Job(JobScenario::Attach { .. })
        );
        if client.scenario.program.is_operation() && !attach {
            return match result {
                Err(SessionError::InvalidState) => Ok(()),
                other => Err(format!(
                    "a signal during {:?}: {other:?}",
                    client.scenario.program
                )),
            };
        }
        let n = result.map_err(|e| format!("a signal: {e}"))?;
        client.out.buf.extend_from_slice(&frame[..n]);
        return Ok(());
    }
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
    let scenario = client.scenario.clone();
    let n = match &scenario.program {
        Program::KillAll { .. } => client.session.start_kill_all(&mut client.frame),
        Program::Put(put) => {
            // The content goes as stdin, within credit, before the agent's checks passed too.
            client.stdin = Some((put.content.clone(), 0));
            client.session.start_put(&put.request(), &mut client.frame)
        }
        Program::Get(get) => client.session.start_get(&get.request(), &mut client.frame),
        Program::Info { .. } => client.session.start_info(&mut client.frame),
        Program::TimeSync { to, .. } => client.session.start_time_sync(*to, &mut client.frame),
        Program::Reseed { random } => client.session.start_reseed(random, &mut client.frame),
        Program::Shutdown(request) => client.session.start_shutdown(*request, &mut client.frame),
        Program::Job(job) => job.start(&mut client.session, &mut client.frame),
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
            let put = matches!(agent.task, Some(Task::Put(_)));
            match agent.session.handle_eof() {
                // A client gone before its put's digest abandoned it: nothing is committed,
                // nothing more is sent.
                Err(SessionError::Disconnected { .. }) if put => {
                    if !agent.session.is_closed() || agent.session.has_queued() {
                        return Err("an abandoned put left something to send".into());
                    }
                    agent.task = None;
                    agent.closed = true;
                    a2c.closed = true;
                    return Ok(());
                }
                result => result.map_err(|e| format!("handle_eof: {e}"))?,
            }
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
    if let Some(Task::Put(put)) = agent.task.as_mut() {
        put.step(&mut agent.session, rng, now)?;
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
        } else if agent.task.is_some() {
            move_task(agent, rng, now)?;
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
            Some(
                event @ (AgentEvent::Put(_)
                | AgentEvent::PutEnd(_)
                | AgentEvent::Get(_)
                | AgentEvent::Info
                | AgentEvent::Shutdown(_)
                | AgentEvent::TimeSync(_)
                | AgentEvent::Reseed(_)),
            ) => operation_event(
                &mut agent.session,
                &mut agent.task,
                &agent.program,
                event,
                now,
            )?,
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
            Some(AgentEvent::Exec(valid)) if agent.session.is_job() => {
                let Agent {
                    session,
                    task,
                    program,
                    ..
                } = agent;
                job_event(session, task, program, AgentEvent::Exec(valid), now)?
            }
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
            Some(AgentEvent::Stdin(data)) if matches!(agent.task, Some(Task::Put(_))) => {
                if let Some(Task::Put(put)) = agent.task.as_mut() {
                    put.held.extend(data);
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
            Some(
                event @ (AgentEvent::StartJob(_)
                | AgentEvent::Jobs(_)
                | AgentEvent::Attach(_)
                | AgentEvent::Wait(_)
                | AgentEvent::Kill(_)
                | AgentEvent::Remove(_)),
            ) => job_event(
                &mut agent.session,
                &mut agent.task,
                &agent.program,
                event,
                now,
            )?,
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

/// A protocol-4 request reached the agent's driver: check it is the scenario's, then answer or
/// begin the task.
fn operation_event(
    session: &mut AgentSession,
    task: &mut Option<Task>,
    program: &Program,
    event: AgentEvent<'_>,
    now: Micros,
) -> Result<(), String> {
    let answer = |result: Result<(), SessionError>| result.map_err(|e| format!("{event:?}: {e}"));
    match (event, program.clone()) {
        (AgentEvent::Put(request), Program::Put(put)) if request == put.request() => {
            if put.exists {
                let refusal = Refusal::os(ErrorCode::AlreadyExists, 17, "the file exists");
                answer(session.refuse(refusal, now))?;
            } else {
                *task = Some(Task::Put(PutTask {
                    ready_at: now + put.checks_us,
                    scenario: put,
                    ready: false,
                    held: VecDeque::new(),
                    written: Vec::new(),
                    digest: None,
                    skipped_sent: 0,
                }));
            }
        }
        (AgentEvent::PutEnd(digest), Program::Put(_)) => match task.as_mut() {
            Some(Task::Put(put)) if put.digest.is_none() => put.digest = Some(digest),
            _ => return Err("a digest without a put in progress".into()),
        },
        (AgentEvent::Get(request), Program::Get(get)) if request == get.request() => {
            if get.missing {
                let refusal = Refusal::os(ErrorCode::NotFound, 2, "no such file");
                answer(session.refuse(refusal, now))?;
            } else {
                answer(session.file_ready(get.header(), now))?;
                *task = Some(Task::Get(GetTask {
                    scenario: get,
                    sent: 0,
                    skipped_sent: 0,
                }));
            }
        }
        (AgentEvent::Info, Program::Info { mounts, interfaces }) => {
            // All of them: the session stops the driver at the protocol's bound.
            let mut items = vec![b"system".to_vec()];
            items.extend((0..mounts).map(|i| std::format!("/mnt/{i}").into_bytes()));
            items.extend((0..interfaces).map(|i| std::format!("eth{i}").into_bytes()));
            *task = Some(Task::Info { items, sent: 0 });
        }
        (AgentEvent::TimeSync(to), Program::TimeSync { to: want, previous }) if to == want => {
            answer(session.clock_set(previous, now))?;
        }
        (AgentEvent::Reseed(random), Program::Reseed { random: want }) if random == want => {
            answer(session.done(random.len() as u32, now))?;
        }
        (AgentEvent::Shutdown(request), Program::Shutdown(want)) if request == want => {
            answer(session.done(0, now))?;
        }
        (event, program) => return Err(format!("the agent received {event:?} for {program:?}")),
    }
    Ok(())
}

impl PutTask {
    /// The checks pass in their time; then held content is written at the disk's pace.
    fn step(
        &mut self,
        session: &mut AgentSession,
        rng: &mut Rng,
        now: Micros,
    ) -> Result<(), String> {
        if !self.ready {
            if now < self.ready_at || session.is_closing() {
                return Ok(());
            }
            session
                .file_ready(self.scenario.header(), now)
                .map_err(|e| format!("file_ready: {e}"))?;
            self.ready = true;
        }
        let n = rng.size(PIPE_CAPACITY).min(self.held.len());
        self.written.extend(self.held.drain(..n));
        session.stdin_consumed(n);
        Ok(())
    }
}

/// One frame of a protocol-4 task (nothing else is queued): a tree's left-out entry, a get's
/// content, an info frame; or its end once everything went.
fn move_task(agent: &mut Agent, rng: &mut Rng, now: Micros) -> Result<(), String> {
    let Agent {
        task,
        session,
        frame,
        out,
        committed,
        ..
    } = agent;
    let encoded = |result: Result<usize, SessionError>, what: &str| {
        result.map_err(|e| format!("{what}: {e}"))
    };
    let finished = match task.as_mut() {
        None => return Ok(()),
        Some(Task::Put(put)) => {
            if !put.ready {
                return Ok(());
            }
            let skips = put.scenario.tree.as_deref().unwrap_or(&[]);
            if let Some((at, path)) = skips.get(put.skipped_sent) {
                if put.written.len() >= *at {
                    let n = encoded(
                        session.encode_skipped(path, SkipReason::Special, frame),
                        "encode_skipped",
                    )?;
                    out.buf.extend_from_slice(&frame[..n]);
                    put.skipped_sent += 1;
                }
                return Ok(());
            }
            let Some(digest) = put.digest else {
                return Ok(());
            };
            if !put.held.is_empty() {
                return Ok(());
            }
            // Everything is written: only the right digest (and size) commits it.
            let written = core::mem::take(&mut put.written);
            let size = put.scenario.request().size;
            let sha = sha256(&written);
            if sha == digest && size.is_none_or(|size| size == written.len() as u64) {
                let summary = FileSummary {
                    bytes: written.len() as u64,
                    sha256: ByteArray(sha),
                };
                *committed = Some(written);
                session
                    .file_done(summary, now)
                    .map_err(|e| format!("file_done: {e}"))?;
            } else {
                let refusal = Refusal::new(ErrorCode::IntegrityMismatch, "digest differs");
                session
                    .refuse(refusal, now)
                    .map_err(|e| format!("refuse: {e}"))?;
            }
            true
        }
        Some(Task::Get(get)) => {
            let content = &get.scenario.content;
            let skips = get.scenario.tree.as_deref().unwrap_or(&[]);
            let next_skip = skips.get(get.skipped_sent);
            if let Some((_, path)) = next_skip.filter(|(at, _)| *at == get.sent) {
                let n = encoded(
                    session.encode_skipped(path, SkipReason::HardLink, frame),
                    "encode_skipped",
                )?;
                out.buf.extend_from_slice(&frame[..n]);
                get.skipped_sent += 1;
                return Ok(());
            }
            if get.sent < content.len() {
                let until = next_skip.map_or(content.len(), |(at, _)| *at);
                let n = rng.size(MAX_DATA).min(until - get.sent);
                frame[DATA_HEADROOM..DATA_HEADROOM + n]
                    .copy_from_slice(&content[get.sent..get.sent + n]);
                let start = encoded(session.frame_file_data(frame, n), "frame_file_data")?;
                out.buf.extend_from_slice(&frame[start..DATA_HEADROOM + n]);
                get.sent += n;
                return Ok(());
            }
            let summary = FileSummary {
                bytes: content.len() as u64,
                sha256: ByteArray(sha256(content)),
            };
            session
                .file_done(summary, now)
                .map_err(|e| format!("file_done: {e}"))?;
            true
        }
        Some(Task::Info { items, sent }) => {
            let item = items.get(*sent).map(Vec::as_slice);
            let info = match item {
                None => None,
                Some(b"system") => Some(AgentFrame::SystemInfo(SystemInfo {
                    kernel_release: "6.1.0",
                    kernel_version: "#1",
                    machine: "x86_64",
                    hostname: "sim",
                    uptime_ms: now / 1000,
                    now: SIM_MTIME,
                    cpus: 2,
                    cpu_model: "model",
                    load: [0, 1, 2],
                    memory_total: 1 << 30,
                    memory_available: 1 << 29,
                    processes: 3,
                    agent_pid: 1,
                    agent_rss: 1 << 20,
                })),
                Some(target) if target.starts_with(b"/mnt") => Some(AgentFrame::Mount(MountInfo {
                    source: Bytes(b"/dev/vda"),
                    target: Bytes(target),
                    fstype: "ext4",
                    read_only: false,
                    total: 100,
                    free: 50,
                    available: 40,
                })),
                Some(name) => Some(AgentFrame::Interface(InterfaceInfo {
                    name: core::str::from_utf8(name).map_err(|_| "an interface name")?,
                    up: true,
                    mtu: 1500,
                    mac: Bytes(&[2, 0, 0, 0, 0, 1]),
                    addresses: StrList::new(b"10.0.2.15/24\0"),
                    rx_bytes: 1,
                    tx_bytes: 2,
                })),
            };
            let result = info.map(|info| session.encode_info(&info, frame));
            match result {
                Some(Ok(n)) => {
                    out.buf.extend_from_slice(&frame[..n]);
                    *sent += 1;
                    return Ok(());
                }
                // Past the protocol's bound the rest is left out.
                Some(Err(SessionError::InvalidState)) if *sent > crate::limits::MAX_INFO_ITEMS => {}
                Some(Err(err)) => return Err(format!("encode_info: {err}")),
                None => {}
            }
            session
                .done(*sent as u32 - 1, now)
                .map_err(|e| format!("done: {e}"))?;
            true
        }
        Some(Task::Job(job)) => job.step(session, frame, out, rng, now)?,
    };
    if finished {
        *task = None;
        let n = session
            .poll_transmit(frame)
            .map_err(|e| format!("agent poll_transmit: {e}"))?;
        out.buf.extend_from_slice(&frame[..n]);
    }
    Ok(())
}

/// A job operation (protocol 5) against the model registry of the agent's driver, which holds
/// the job `web` (id 1) as the scenario says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobScenario {
    /// Start a detached job, named `web` or not; `taken`: that name is in use.
    Start {
        named: bool,
        taken: bool,
    },
    /// List the registry's `count` jobs (the session stops the driver at `MAX_JOBS`).
    List {
        count: usize,
    },
    /// Attach to `web`: its retained stdout, with `lost` bytes that fell out of the ring after
    /// its first `cut` bytes; following, the live output then the record (the job exits with
    /// `code`); not following, `Done` once the retained output went.
    Attach {
        retained: Vec<u8>,
        cut: usize,
        lost: u64,
        live: Vec<u8>,
        follow: bool,
        code: u8,
        unknown: bool,
    },
    /// Wait for `web`, which ends `after_us` from the request (keepalives meanwhile; 0: it
    /// has ended already).
    Wait {
        after_us: u64,
        code: u8,
        unknown: bool,
    },
    /// Kill or remove job 1: the registry's answer (`None`: done).
    Kill {
        answer: Option<ErrorCode>,
    },
    Remove {
        answer: Option<ErrorCode>,
    },
}

/// A job's exec in the simulation.
const JOB_REQUEST: ExecRequest<'static> = ExecRequest {
    argv: StrList::new(b"job\0"),
    env: StrList::new(b""),
    clean_env: false,
    cwd: None,
    stdin: StdinMode::Pipe,
    user: None,
    pty: None,
    timeout_ms: 0,
    kill_grace_ms: None,
    kill_tree_on_exit: false,
    max_output: 0,
};

const JOB_STARTED: JobStarted = JobStarted { id: 1, pid: 4242 };

impl JobScenario {
    fn random(rng: &mut Rng) -> JobScenario {
        let code = rng.below(256) as u8;
        let unknown = rng.chance(10);
        match rng.below(6) {
            0 => JobScenario::Start {
                named: rng.chance(70),
                taken: rng.chance(20),
            },
            1 => JobScenario::List {
                count: if rng.chance(10) {
                    crate::limits::MAX_JOBS + rng.below(20)
                } else {
                    rng.below(8)
                },
            },
            2 => {
                let len = if rng.chance(10) { 0 } else { rng.size(100_000) };
                let live = if rng.chance(30) { 0 } else { rng.size(50_000) };
                JobScenario::Attach {
                    cut: rng.below(len + 1),
                    retained: rng.bytes(len),
                    lost: if rng.chance(50) {
                        rng.size(1 << 20) as u64
                    } else {
                        0
                    },
                    live: rng.bytes(live),
                    follow: rng.chance(70),
                    code,
                    unknown,
                }
            }
            3 => JobScenario::Wait {
                after_us: if rng.chance(20) {
                    0
                } else {
                    rng.below(200_000) as u64
                },
                code,
                unknown,
            },
            4 => JobScenario::Kill {
                answer: [
                    None,
                    None,
                    Some(ErrorCode::NoSuchJob),
                    Some(ErrorCode::JobEnded),
                ][rng.below(4)],
            },
            _ => JobScenario::Remove {
                answer: [
                    None,
                    None,
                    Some(ErrorCode::NoSuchJob),
                    Some(ErrorCode::JobRunning),
                ][rng.below(4)],
            },
        }
    }

    fn header(follow: bool) -> AttachHeader {
        AttachHeader {
            id: 1,
            stdout: Resume { from: 0, lost: 0 },
            stderr: Resume::default(),
            stdin: false,
            running: follow,
        }
    }

    fn record(code: u8, stdout: u64) -> Record {
        Record {
            status: ExitStatus::Code(code),
            output_dropped: false,
            ending: Ending::Exited,
            tree_kill: TreeKill::None,
            stdout: StreamRecord {
                bytes: stdout,
                dropped: 0,
            },
            stderr: StreamRecord::default(),
            pipes_held: false,
            peak_memory: 0,
        }
    }

    fn termination(code: u8, stdout: u64) -> crate::Termination {
        let record = JobScenario::record(code, stdout);
        crate::Termination {
            status: record.status,
            duration_us: 5,
            output_dropped: record.output_dropped,
            ending: record.ending,
            tree_kill: record.tree_kill,
            stdout: record.stdout,
            stderr: record.stderr,
            pipes_held: record.pipes_held,
            oom_killed: false,
            peak_memory: record.peak_memory,
        }
    }

    /// What the client must see.
    fn expected(&self) -> Outcome {
        let mut outcome = Outcome::default();
        outcome.end = match self {
            JobScenario::Start { named, taken } if *named && *taken => {
                End::Refused(ErrorCode::AlreadyExists)
            }
            JobScenario::Start { .. } => End::Detached(JOB_STARTED),
            JobScenario::List { count } => {
                let listed = (*count).min(crate::limits::MAX_JOBS);
                outcome.info = (1..=listed).map(|id| id.to_string().into_bytes()).collect();
                End::Done(listed as u32)
            }
            JobScenario::Attach { unknown: true, .. } | JobScenario::Wait { unknown: true, .. } => {
                End::Refused(ErrorCode::NoSuchJob)
            }
            JobScenario::Attach {
                retained,
                cut,
                lost,
                live,
                follow,
                code,
                ..
            } => {
                outcome.attached = Some(JobScenario::header(*follow));
                outcome.stdout = retained.clone();
                if *lost > 0 {
                    outcome.drops = vec![(Stream::Stdout, *cut, *lost)];
                }
                if *follow {
                    outcome.stdout.extend_from_slice(live);
                    let total = retained.len() as u64 + lost + live.len() as u64;
                    End::Exited(JobScenario::record(*code, total))
                } else {
                    End::Done(0)
                }
            }
            JobScenario::Wait { code, .. } => End::Exited(JobScenario::record(*code, 0)),
            JobScenario::Kill { answer } | JobScenario::Remove { answer } => match answer {
                None => End::Done(0),
                Some(code) => End::Refused(*code),
            },
        };
        outcome
    }

    /// The client starts it.
    fn start(&self, session: &mut ClientSession, out: &mut [u8]) -> Result<usize, SessionError> {
        let job = JobRequest {
            job: Bytes(b"web"),
            user: None,
        };
        match self {
            JobScenario::Start { named, .. } => {
                session.start_job(named.then_some(&b"web"[..]), &JOB_REQUEST, out)
            }
            JobScenario::List { .. } => session.start_jobs(&JobQuery { user: None }, out),
            JobScenario::Attach { follow, .. } => session.start_attach(
                &AttachRequest {
                    job: Bytes(b"web"),
                    user: None,
                    since_stdout: 0,
                    since_stderr: 0,
                    follow: *follow,
                    stdin: false,
                },
                out,
            ),
            JobScenario::Wait { .. } => session.start_wait(&job, out),
            JobScenario::Kill { .. } => session.start_kill(
                &KillJob {
                    job: Bytes(b"1"),
                    user: None,
                    signal: 0,
                    grace_ms: None,
                },
                out,
            ),
            JobScenario::Remove { .. } => session.start_remove(
                &JobRequest {
                    job: Bytes(b"1"),
                    user: None,
                },
                out,
            ),
        }
    }
}

/// A job operation the agent's driver carries out.
struct JobTask {
    job: JobScenario,
    /// Records or retained bytes sent; the gap's notice went; live bytes sent.
    sent: usize,
    dropped: bool,
    live_sent: usize,
    /// When a waited-for job ends.
    until: Micros,
}

/// A job request reached the agent's driver: check it is the scenario's, then answer it from
/// the model registry or begin its task.
fn job_event(
    session: &mut AgentSession,
    task_slot: &mut Option<Task>,
    program: &Program,
    event: AgentEvent<'_>,
    now: Micros,
) -> Result<(), String> {
    let Program::Job(job) = program.clone() else {
        return Err(format!("the agent received {event:?} for {program:?}"));
    };
    let answer = |result: Result<(), SessionError>| result.map_err(|e| format!("{event:?}: {e}"));
    let refuse = |session: &mut AgentSession, code| {
        session
            .refuse(Refusal::new(code, "the registry says no"), now)
            .map_err(|e| format!("refuse: {e}"))
    };
    let task = |job: &JobScenario, until| {
        Some(Task::Job(JobTask {
            job: job.clone(),
            sent: 0,
            dropped: false,
            live_sent: 0,
            until,
        }))
    };
    match (event, &job) {
        (AgentEvent::StartJob(start), JobScenario::Start { named, .. }) => {
            if start.name.map(|name| name.0) != named.then_some(&b"web"[..]) {
                return Err(format!("a job start named {:?}", start.name));
            }
        }
        (AgentEvent::Exec(valid), JobScenario::Start { named, taken }) => {
            if *valid.request() != JOB_REQUEST {
                return Err("another job request".into());
            }
            if *named && *taken {
                refuse(session, ErrorCode::AlreadyExists)?;
            } else {
                answer(session.detached(JOB_STARTED, now))?;
            }
        }
        (AgentEvent::Jobs(_), JobScenario::List { .. }) => *task_slot = task(&job, now),
        (
            AgentEvent::Attach(request),
            JobScenario::Attach {
                unknown, follow, ..
            },
        ) => {
            if request.follow != *follow || request.job.0 != b"web" {
                return Err("another attach request".into());
            }
            if *unknown {
                refuse(session, ErrorCode::NoSuchJob)?;
            } else {
                let header = JobScenario::header(*follow);
                answer(session.attached(header, now.saturating_sub(1_000), now))?;
                *task_slot = task(&job, now);
            }
        }
        (
            AgentEvent::Wait(_),
            JobScenario::Wait {
                after_us,
                code,
                unknown,
            },
        ) => {
            if *unknown {
                refuse(session, ErrorCode::NoSuchJob)?;
            } else if *after_us == 0 {
                answer(session.job_ended(JobScenario::termination(*code, 0), now))?;
            } else {
                answer(session.waiting(now))?;
                *task_slot = task(&job, now + after_us);
            }
        }
        (AgentEvent::Kill(_), JobScenario::Kill { answer: reply })
        | (AgentEvent::Remove(_), JobScenario::Remove { answer: reply }) => match reply {
            None => answer(session.done(0, now))?,
            Some(code) => refuse(session, *code)?,
        },
        (event, job) => return Err(format!("the agent received {event:?} for {job:?}")),
    }
    Ok(())
}

impl JobTask {
    /// One frame of the task (nothing else is queued), or its end; returns whether it ended.
    fn step(
        &mut self,
        session: &mut AgentSession,
        frame: &mut [u8],
        out: &mut Outbox,
        rng: &mut Rng,
        now: Micros,
    ) -> Result<bool, String> {
        let mut output = |session: &mut AgentSession, data: &[u8]| -> Result<(), String> {
            frame[DATA_HEADROOM..DATA_HEADROOM + data.len()].copy_from_slice(data);
            let start = session
                .frame_output(frame, DataKind::Stdout, data.len(), now)
                .map_err(|e| format!("frame_output: {e}"))?;
            out.buf
                .extend_from_slice(&frame[start..DATA_HEADROOM + data.len()]);
            Ok(())
        };
        match &self.job {
            JobScenario::List { count } => {
                if self.sent < *count {
                    let record = JobRecord {
                        id: self.sent as u32 + 1,
                        name: None,
                        argv: StrList::new(b"job\0"),
                        uid: 0,
                        gid: 0,
                        pid: 4242,
                        state: JobState::Running,
                        started: SIM_MTIME,
                        duration_us: 1,
                        stdout_bytes: 0,
                        stderr_bytes: 0,
                        termination: None,
                    };
                    match session.encode_job(&record, frame) {
                        Ok(n) => {
                            out.buf.extend_from_slice(&frame[..n]);
                            self.sent += 1;
                            return Ok(false);
                        }
                        // Past the protocol's bound the rest is left out.
                        Err(SessionError::InvalidState) if self.sent >= crate::limits::MAX_JOBS => {
                        }
                        Err(err) => return Err(format!("encode_job: {err}")),
                    }
                }
                // The driver counts all; the session counts what went.
                session
                    .done(*count as u32, now)
                    .map_err(|e| format!("done: {e}"))?;
                Ok(true)
            }
            JobScenario::Attach {
                retained,
                cut,
                lost,
                live,
                follow,
                code,
                ..
            } => {
                // The head up to the gap, the gap's notice, the rest of what is retained.
                if *lost > 0 && !self.dropped && self.sent == *cut {
                    let n = session
                        .encode_output_dropped(Stream::Stdout, *lost, frame)
                        .map_err(|e| format!("encode_output_dropped: {e}"))?;
                    out.buf.extend_from_slice(&frame[..n]);
                    self.dropped = true;
                    return Ok(false);
                }
                let until = if self.sent < *cut {
                    *cut
                } else {
                    retained.len()
                };
                if self.sent < until {
                    let n = rng.size(MAX_DATA).min(until - self.sent);
                    output(session, &retained[self.sent..self.sent + n])?;
                    self.sent += n;
                    return Ok(false);
                }
                if !follow {
                    session.done(0, now).map_err(|e| format!("done: {e}"))?;
                    return Ok(true);
                }
                if self.live_sent < live.len() {
                    let n = rng.size(MAX_DATA).min(live.len() - self.live_sent);
                    output(session, &live[self.live_sent..self.live_sent + n])?;
                    self.live_sent += n;
                    return Ok(false);
                }
                let total = retained.len() as u64 + lost + live.len() as u64;
                session
                    .job_ended(JobScenario::termination(*code, total), now)
                    .map_err(|e| format!("job_ended: {e}"))?;
                Ok(true)
            }
            JobScenario::Wait { code, .. } => {
                if now < self.until {
                    return Ok(false);
                }
                session
                    .job_ended(JobScenario::termination(*code, 0), now)
                    .map_err(|e| format!("job_ended: {e}"))?;
                Ok(true)
            }
            other => Err(format!("no task for {other:?}")),
        }
    }
}
