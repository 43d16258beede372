//! The agent's session under arbitrary client bytes, in arbitrary pieces, with the driver's
//! commands (started, refuse, stdin consumed, child exited, output, output dropped, finish with
//! the driver's facts, timeouts, a half-close) in an order the fuzzer chooses. Beside "no panic",
//! a model of the protocol checks every answer: which frames are accepted and which are a typed
//! breach (a request in pieces is checked by a list model of its own, written apart from
//! `ListCheck`; a signal outside 1–64 is refused), which commands are allowed, every deadline
//! `poll_timeout` reports (handshake, drain grace, keepalive, final send), and the agent's own
//! stream (checked frame by frame as it is sent): the hello first and once (it is queued when
//! the session is made), a proof only for the right client proof (checked against a
//! `ClientSession` with the same secret) and before anything else it says, `Started` before
//! output and keepalives, output stamped with the time since the start, a keepalive only when
//! one was due, credit never beyond what was consumed, stdin never beyond the window, exactly one
//! final frame and nothing after it (the record counting each stream's bytes and drops), and
//! after a breach exactly one error frame.
//!
//! Protocol 4 in the model: a put (validated by rules of the model's own) starts with stdin
//! credit for its content and ends with its digest (`PutEnd`, never a bare `StdinEof`); a get
//! and a put begin with `file_ready`, a get's content goes out with `frame_file_data`, a tree's
//! left-out entries with `encode_skipped`, and `file_done` (for a put only after its digest) is
//! the last frame; info, shutdown, reseed and time sync wait for the driver (`encode_info`:
//! the system first, then at most `MAX_INFO_ITEMS` mounts and interfaces, then `done`;
//! `done`; `clock_set`); controls are refused for anything but an exec, and a client that goes
//! away before its put's digest abandoned it (`Disconnected`, nothing more sent). The stream
//! check holds `FileReady` before content, credit and keepalives, the info frames after the
//! proof and in their order, and the summary last. Besides the client's bytes, the fuzzer may
//! send well-formed client frames of its choosing (`Step::Send`: a right proof, any request).

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use ferry_wire::limits::{HEADER_LEN, MAX_INFO_ITEMS, MAX_JOBS, NONCE_LEN};
use ferry_wire::limits::{
    MAX_ARGS, MAX_ARGV_BYTES, MAX_ARG_LEN, MAX_DATA, MAX_ENV_BYTES, MAX_ENV_VARS, MAX_FRAME,
    MAX_FRAME_BODY, MAX_MESSAGE, MAX_PATH, MAX_USER, STDIN_WINDOW,
};
use ferry_wire::session::{
    AgentAuth, AgentConfig, AgentEvent, AgentSession, ClientAuth, ClientEvent, ClientSession,
    EndFacts, FrameKind, Micros, OutputPhase, Phase, Refusal, Secret, SessionError,
};
use ferry_wire::{
    decode_agent_frame, decode_client_frame, encode_client_frame, split_frame, AgentFrame,
    ByteArray, Bytes, Cancel, ClientFrame, ClientHello, ClientProof, DataKind, DoneReport, Ending,
    ErrorCode, ExecRequest, ExitStatus, FileHeader, FileSummary, InterfaceInfo, Limits, ListKind,
    MountInfo, ShutdownRequest, SkipReason, StdinMode, StrList, Stream, StreamRecord, SystemInfo,
    Termination, Timestamp, TreeKill, DATA_HEADROOM, MAGIC,
};
use ferry_wire::{AttachHeader, JobRecord, JobStarted, JobState, Resume, WindowSize};
use ferry_wire_fuzz::jobs::{
    attach_refusal, kill_refusal, query_refusal, request_refusal, start_refusal, JobRequestChoice,
    NameChoice,
};
use ferry_wire_fuzz::ops::{
    get_refusal, put_refusal, reseed_refusal, shutdown_refusal, time_sync_refusal, GetChoice,
    PutChoice, RequestRefusal, LIMIT,
};
use ferry_wire_fuzz::{arbitrary_steps, split_input, whole_frames};
use libfuzzer_sys::fuzz_target;

/// How the agent is configured.
#[derive(Arbitrary, Debug)]
struct Setup {
    /// A stdin window other than the protocol's (0: the protocol's).
    window: u16,
    /// Tighter request limits.
    max_args: u8,
    /// The drain limit, in bytes (0: ferry's 4 MiB).
    drain_limit: u16,
    /// The agent's version string, cut to the protocol's bound when sent.
    long_version: bool,
    /// An insecure agent (no proof asked for).
    insecure: bool,
    /// The keepalive interval: 0 the protocol's, 255 none, otherwise this many milliseconds.
    keepalive: u8,
    /// Tighter list limits (0: the protocol's): the bytes of either list, in units of 8 bytes.
    max_list_bytes: u8,
    /// The longest entry, NUL included (0: the protocol's).
    max_arg_len: u8,
    /// The longest transfer path (0: the protocol's), in units of 16 bytes.
    max_path: u8,
    /// The longest user (0: the protocol's).
    max_user: u8,
    /// Keep-alive connections (protocol 5): the idle deadline in units of 4 ms (0: none, the
    /// protocol's default).
    idle: u8,
}

/// What the driver knows about a command's end ([`EndFacts`]).
#[derive(Arbitrary, Debug, Clone, Copy)]
struct Facts {
    ending: u8,
    tree_kill: u8,
    pipes_held: bool,
    oom_killed: bool,
    peak_memory: u64,
}

impl Facts {
    fn end_facts(self) -> EndFacts {
        EndFacts {
            ending: match self.ending % 5 {
                0 => Ending::Exited,
                1 => Ending::TimedOut,
                2 => Ending::Cancelled,
                3 => Ending::RuntimeLimit,
                _ => Ending::OutputLimit,
            },
            tree_kill: match self.tree_kill % 3 {
                0 => TreeKill::None,
                1 => TreeKill::Cgroup,
                _ => TreeKill::ProcessGroup,
            },
            pipes_held: self.pipes_held,
            oom_killed: self.oom_killed,
            peak_memory: self.peak_memory,
        }
    }
}

/// One move of the agent's driver.
#[derive(Arbitrary, Debug)]
enum Step {
    /// Receive the next `len` bytes of the client's stream and handle every whole frame.
    Receive { len: u16 },
    /// `poll_transmit` into a buffer of `room` bytes (0: a whole frame's).
    Transmit { room: u16 },
    /// The command was spawned.
    Started { pid: u32 },
    /// The kill-all is done.
    Done { count: u32 },
    /// Refuse the request (or fail the agent).
    Refuse { code: u8, errno: u32, long: bool },
    /// Stdin was written to the command (a share of what is unconsumed, in 1/256ths).
    StdinConsumed { share: u8 },
    /// The command exited.
    ChildExited { code: u8, signal: Option<u8> },
    /// Output read from a pipe (the pump sends control frames first); `kind` 0 stdout, 1
    /// stderr, 2 stdin, 3 file data (never output).
    Output { kind: u8, len: u32 },
    /// The output cap dropped `bytes` of a stream: the notice goes out in order with the data,
    /// encoded into a buffer of `room` bytes (0: a whole frame's).
    Dropped { stderr: bool, bytes: u64, room: u8 },
    /// Some output was lost.
    NoteDropped,
    /// The pipes are done: queue the termination record (`finish`, or `finish_with` facts).
    Finish { facts: Option<Facts> },
    /// Time passes; the driver checks the deadlines.
    Advance { micros: u32 },
    /// The client's stream ended (mid-operation: a half-close; mid-put: the put abandoned).
    Eof,
    /// The client sends this well-formed frame (after whatever it sent before).
    Send(Frame),
    /// The put's or get's checks passed: the header goes out.
    FileReady { size: u64, mode: u32, uid: u32 },
    /// A get's content read from the file (control frames first, like output).
    FileData { len: u32 },
    /// A tree's entry left out, encoded into a buffer of `room` bytes (0: a whole frame's).
    Skipped { path_len: u16, reason: u8, room: u8 },
    /// The transfer is complete (a put: committed).
    FileDone { bytes: u64, digest: u8 },
    /// `times` frames of an info operation (`kind` 0: the system, 1: a mount, 2: an
    /// interface, else a frame that is none of these), into a buffer of `room` bytes.
    EncodeInfo { kind: u8, times: u8, room: u8 },
    /// The clock was set; it said this before.
    ClockSet { secs: i64, nanos: u32 },
    /// A job's command started and the job is registered (`detached`).
    Detached { id: u32, pid: u32 },
    /// `times` records of a job listing (`encode_job`), into a buffer of `room` bytes.
    EncodeJob { times: u8, room: u8, ended: bool },
    /// The attachment begins (`attached`): the job started `ago` microseconds before now.
    Attached {
        stdin: bool,
        running: bool,
        from: u64,
        lost: u64,
        ago: u32,
    },
    /// The job waited for still runs (`waiting`).
    Waiting,
    /// The job attached to or waited for has ended (`job_ended`).
    JobEnded { code: u8, facts: Facts },
    /// The operation's resources are released: wait for the next request (protocol 5).
    NextOperation,
}

/// A client frame the fuzzer builds (its fields its choices).
#[derive(Arbitrary, Debug)]
enum Frame {
    Hello,
    /// The right proof for the agent's hello and our own (a wrong one after another hello).
    Proof {
        nonce: u8,
    },
    Exec {
        pipe: bool,
    },
    KillAll,
    Put(PutChoice),
    PutEnd {
        digest: u8,
    },
    Get(GetChoice),
    Info,
    Shutdown {
        reboot: bool,
        grace_ms: u32,
    },
    TimeSync {
        secs: i64,
        nanos: u32,
    },
    Reseed {
        len: u16,
    },
    Stdin {
        len: u16,
    },
    StdinEof,
    Signal(u8),
    Cancel(Option<u32>),
    /// A piece of a request's list: `len` bytes of entries.
    ExecPart {
        env: bool,
        len: u8,
    },
    Resize,
    StartJob(NameChoice),
    Jobs(JobRequestChoice),
    Attach(JobRequestChoice),
    Wait(JobRequestChoice),
    Kill(JobRequestChoice),
    Remove(JobRequestChoice),
}

fuzz_target!(|data: &[u8]| {
    let (choices, wire) = split_input(data);
    let mut u = Unstructured::new(choices);
    let setup = Setup::arbitrary(&mut u).unwrap_or(Setup {
        window: 0,
        max_args: 0,
        drain_limit: 0,
        long_version: false,
        insecure: false,
        keepalive: 0,
        max_list_bytes: 0,
        max_arg_len: 0,
        max_path: 0,
        max_user: 0,
        idle: 0,
    });
    let steps: Vec<Step> = arbitrary_steps(&mut u);
    let mut run = Run::new(&setup, wire);
    for step in steps {
        run.step(step);
    }
    // Then as a well-behaved driver would end it: take the rest, run the command, end.
    for step in [
        Step::Receive { len: 0 },
        Step::Transmit { room: 0 },
        Step::Started { pid: 7 },
        Step::FileReady {
            size: 3,
            mode: 0o100644,
            uid: 0,
        },
        Step::EncodeInfo {
            kind: 0,
            times: 0,
            room: 0,
        },
        Step::EncodeInfo {
            kind: 1,
            times: 1,
            room: 0,
        },
        Step::Detached { id: 3, pid: 40 },
        Step::Attached {
            stdin: true,
            running: true,
            from: 0,
            lost: 0,
            ago: 500,
        },
        Step::Waiting,
        Step::EncodeJob {
            times: 1,
            room: 0,
            ended: false,
        },
        Step::Done { count: 1 },
        Step::ClockSet { secs: 5, nanos: 0 },
        Step::StdinConsumed { share: 255 },
        Step::Transmit { room: 0 },
        Step::FileData { len: 3 },
        Step::Output { kind: 0, len: 3 },
        Step::Advance { micros: 1 << 20 },
        Step::Dropped {
            stderr: false,
            bytes: 1000,
            room: 0,
        },
        Step::Output { kind: 0, len: 2 },
        Step::ChildExited {
            code: 0,
            signal: None,
        },
        Step::Output { kind: 1, len: 5 },
        Step::JobEnded {
            code: 3,
            facts: Facts {
                ending: 0,
                tree_kill: 0,
                pipes_held: false,
                oom_killed: false,
                peak_memory: 0,
            },
        },
        Step::Finish {
            facts: Some(Facts {
                ending: 1,
                tree_kill: 1,
                pipes_held: true,
                oom_killed: false,
                peak_memory: 1 << 20,
            }),
        },
        Step::FileDone {
            bytes: 3,
            digest: 1,
        },
        Step::Transmit { room: 0 },
        // A kept connection takes its next request (pipelined ones wait in the inbox).
        Step::NextOperation,
        Step::Receive { len: 0 },
        Step::Transmit { room: 0 },
        Step::Eof,
    ] {
        run.step(step);
    }
    run.end();
});

const START: Micros = 1_000;
/// The golden transcripts' secret and agent nonce (`wire/src/session/transcripts.rs`), so that
/// the seeded client streams prove the secret to an agent in its default setup.
const SECRET: &[u8] = b"ferry golden transcript secret";
const AGENT_NONCE: [u8; NONCE_LEN] = {
    let mut nonce = [0u8; NONCE_LEN];
    let mut i = 0;
    while i < NONCE_LEN {
        nonce[i] = i as u8;
        i += 1;
    }
    nonce
};
const LONG_VERSION: &str = "a-version-string-well-beyond-thirty-two-bytes";
/// Two-byte characters, so a cut to [`MAX_MESSAGE`] must find a character boundary.
const LONG_MESSAGE: &str = "ééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééé";

/// The model's view of the agent's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitHello,
    /// The client's hello is in; its proof must come next (a secure agent).
    AwaitAuth,
    AwaitRequest,
    /// A kill-all, a shutdown, a reseed, an info or a time sync was handed to the driver.
    Operating,
    Starting,
    Running,
    Closing,
    /// The final frame went and the connection stays (protocol 5): `next_operation` next.
    Ended,
    Closed,
}

struct Run<'a> {
    session: AgentSession,
    config: AgentConfig,
    now: Micros,
    wire: &'a [u8],
    /// Bytes of `wire` received so far.
    received: usize,
    /// Received and not consumed by the session.
    inbox: Vec<u8>,
    model: Model,
    /// Everything the agent sent, and how much of it was checked.
    sent: Vec<u8>,
    checked: usize,
    stream: StreamCheck,
    /// The agent's secret (`None`: insecure).
    secret: Option<Secret>,
    /// The agent's hello frame, as a client receives it.
    agent_hello: Vec<u8>,
    /// The client's hello body as received.
    client_hello: Vec<u8>,
    /// A client session that made the same (right) proof: it checks the agent's.
    prover: Option<ClientSession>,
    /// An operation was served (protocol 5): the deadline while awaiting a request is the
    /// idle one.
    served: bool,
}

/// Which operation the connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    None,
    Exec,
    Put,
    Get,
    /// Kill-all, shutdown, reseed: answered with `done`.
    Simple,
    Info,
    Clock,
    /// A detached job's exec, answered with `detached`.
    Job,
    /// A job listing: records, then `done` counting them.
    JobList,
    /// `attached`, output, then `job_ended` or `done`.
    Attach,
    /// `waiting`, then `job_ended`.
    Wait,
}

/// What the protocol says the session must be doing.
struct Model {
    state: State,
    op: Op,
    /// A put's digest came.
    put_ended: bool,
    /// A file header is owed (not yet sent).
    file_ready_owed: Option<FileHeader>,
    /// Info frames encoded (the system's included).
    info_items: usize,
    /// The handshake or final-send deadline.
    deadline: Option<Micros>,
    stdin_piped: bool,
    stdin_eof: bool,
    /// Stdin bytes handed to the driver, and not yet written by it.
    stdin_received: u64,
    stdin_unconsumed: u64,
    started_at: Micros,
    exit: Option<(ExitStatus, Micros)>,
    drained: u64,
    dropped: bool,
    /// The final frame the session owes: an error (with its code, errno and message) or the
    /// termination record.
    owed_final: Option<AgentFrame<'static>>,
    /// The hello is owed (not yet sent).
    hello_owed: bool,
    /// The agent's proof is owed (not yet sent).
    proof_owed: bool,
    /// A started record is owed (not yet sent).
    started_owed: Option<u32>,
    /// The client half-closed: the driver reads nothing more.
    input_closed: bool,
    /// When the next keepalive is due, while the command runs.
    next_keepalive: Option<Micros>,
    /// A keepalive is owed (not yet sent).
    keepalive_owed: bool,
    /// The end of the post-exit grace period was handled.
    grace_over: bool,
    /// What each stream produced and dropped, as the driver reported it.
    stdout: StreamRecord,
    stderr: StreamRecord,
    /// The pieces of the request received so far.
    argv_parts: Vec<u8>,
    env_parts: Vec<u8>,
    /// Any piece came (even an empty one): only the exec request may follow.
    parts_seen: bool,
    /// The job requests' part of the model.
    job: JobModel,
    /// The final frame leaves the connection open for another operation (protocol 5).
    keep: bool,
}

impl Model {
    /// The model as a connection (or, after `next_operation`, an operation) begins.
    fn new(state: State, deadline: Option<Micros>) -> Model {
        Model {
            state,
            op: Op::None,
            put_ended: false,
            file_ready_owed: None,
            info_items: 0,
            deadline,
            stdin_piped: false,
            stdin_eof: false,
            stdin_received: 0,
            stdin_unconsumed: 0,
            started_at: START,
            exit: None,
            drained: 0,
            dropped: false,
            owed_final: None,
            hello_owed: state == State::AwaitHello,
            proof_owed: false,
            started_owed: None,
            input_closed: false,
            next_keepalive: None,
            keepalive_owed: false,
            grace_over: false,
            stdout: StreamRecord::default(),
            stderr: StreamRecord::default(),
            argv_parts: Vec::new(),
            parts_seen: false,
            env_parts: Vec::new(),
            job: JobModel::default(),
            keep: false,
        }
    }
}

/// What the model knows of a job operation.
#[derive(Default)]
struct JobModel {
    /// A job start came: only its exec request (in one frame) may follow.
    start: bool,
    /// Job records encoded.
    items: usize,
    /// An attachment header is owed (not yet sent).
    attached_owed: Option<AttachHeader>,
}

/// The agent's stream as a client sees it.
#[derive(Default)]
struct StreamCheck {
    frames: usize,
    hello: bool,
    started: bool,
    authenticated: bool,
    final_seen: bool,
    credit_total: u64,
    /// A file header went out.
    file_ready: bool,
    /// Info frames sent.
    info_frames: usize,
    /// An attachment header went out.
    attached: bool,
    /// Job records sent.
    job_records: usize,
}

impl<'a> Run<'a> {
    fn new(setup: &Setup, wire: &'a [u8]) -> Self {
        let mut limits = Limits::CURRENT;
        if setup.window != 0 {
            limits.stdin_window = u32::from(setup.window);
        }
        if setup.max_args != 0 {
            limits.max_args = u32::from(setup.max_args);
        }
        limits.keepalive_ms = match setup.keepalive {
            0 => limits.keepalive_ms,
            255 => 0,
            n => u32::from(n),
        };
        if setup.max_list_bytes != 0 {
            limits.max_argv_bytes = u32::from(setup.max_list_bytes) * 8;
            limits.max_env_bytes = u32::from(setup.max_list_bytes) * 8;
        }
        if setup.max_arg_len != 0 {
            limits.max_arg_len = u32::from(setup.max_arg_len);
        }
        if setup.max_path != 0 {
            limits.max_path = u32::from(setup.max_path) * 16;
        }
        if setup.max_user != 0 {
            limits.max_user = u32::from(setup.max_user);
        }
        limits.idle_ms = u32::from(setup.idle) * 4;
        let config = AgentConfig {
            agent_version: if setup.long_version {
                LONG_VERSION
            } else {
                "golden"
            },
            limits,
            drain_limit: match setup.drain_limit {
                0 => AgentConfig::DEFAULT.drain_limit,
                n => usize::from(n),
            },
            ..AgentConfig::DEFAULT
        };
        let secret = (!setup.insecure).then(|| Secret::new(SECRET).expect("a valid secret"));
        let auth = AgentAuth {
            nonce: AGENT_NONCE,
            secret: secret.clone(),
        };
        let session = AgentSession::new(config, START, auth);
        // The hello it queued, taken from a copy.
        let mut agent_hello = vec![0u8; MAX_FRAME];
        let n = session
            .clone()
            .poll_transmit(&mut agent_hello)
            .expect("the hello");
        agent_hello.truncate(n);
        Run {
            session,
            config,
            now: START,
            wire,
            received: 0,
            inbox: Vec::new(),
            model: Model::new(State::AwaitHello, Some(START + config.handshake_timeout)),
            sent: Vec::new(),
            checked: 0,
            stream: StreamCheck::default(),
            secret,
            agent_hello,
            client_hello: Vec::new(),
            prover: None,
            served: false,
        }
    }

    fn window(&self) -> u64 {
        u64::from(self.config.limits.stdin_window).min(STDIN_WINDOW as u64)
    }

    fn closing(&self) -> bool {
        matches!(self.model.state, State::Closing | State::Closed)
    }

    fn phase(&self) -> Phase {
        match self.model.state {
            State::AwaitHello | State::AwaitAuth => Phase::Hello,
            State::AwaitRequest => Phase::Idle,
            State::Starting | State::Operating => Phase::Starting,
            State::Running => Phase::Running,
            State::Closing | State::Ended | State::Closed => Phase::Done,
        }
    }

    fn step(&mut self, step: Step) {
        assert_eq!(self.session.phase(), self.phase(), "phase before {step:?}");
        assert_eq!(self.session.is_closing(), self.closing());
        match step {
            Step::Receive { len } => self.receive(len),
            Step::Transmit { room } => self.transmit(room),
            Step::Started { pid } => {
                let result = self.session.started(pid, self.now);
                if self.model.state == State::Starting && self.model.op == Op::Exec {
                    assert_eq!(result, Ok(()));
                    self.model.state = State::Running;
                    self.model.started_at = self.now;
                    self.model.started_owed = Some(pid);
                    self.model.next_keepalive = self.keepalive_after(self.now);
                } else {
                    assert_eq!(result, Err(SessionError::InvalidState));
                }
            }
            Step::Done { count } => {
                let result = self.session.done(count, self.now);
                // A kill-all, a shutdown, a reseed, a job's kill or removal; an info once its
                // system frame went; a job listing (counting its records, whatever the driver
                // says); an attachment that does not follow (count 0).
                let (answers, count) = match (self.model.state, self.model.op) {
                    (State::Operating, Op::Simple) => (true, count),
                    (State::Operating, Op::Info) => (self.model.info_items > 0, count),
                    (State::Operating, Op::JobList) => (true, self.model.job.items as u32),
                    (State::Running, Op::Attach) => (true, 0),
                    _ => (false, count),
                };
                if answers {
                    assert_eq!(result, Ok(()));
                    self.model.owed_final = Some(AgentFrame::Done(DoneReport { count }));
                    self.enter_closing();
                } else {
                    assert_eq!(result, Err(SessionError::InvalidState));
                }
            }
            Step::Refuse { code, errno, long } => {
                let code = error_code(code);
                let message = if long { LONG_MESSAGE } else { "refused" };
                let refusal = Refusal::os(code, errno, message);
                let result = self.session.refuse(refusal, self.now);
                if self.closing() || self.model.state == State::Ended {
                    assert_eq!(result, Err(SessionError::InvalidState));
                } else {
                    // A request refused before it started leaves the connection open.
                    // A wait sends nothing after its request: its refusal keeps the
                    // connection whenever it comes.
                    let before_start =
                        matches!(self.model.state, State::Starting | State::Operating)
                            || self.model.op == Op::Wait;
                    assert_eq!(result, Ok(()));
                    self.fail(code, errno, message);
                    self.model.keep = before_start && self.config.limits.idle_ms > 0;
                }
            }
            Step::StdinConsumed { share } => {
                // Any time, before `started` too: the session holds the credit back until
                // `Started` has gone out (once a bug this target found).
                let n = self.model.stdin_unconsumed * (u64::from(share) + 1) / 256;
                self.session.stdin_consumed(n as usize);
                self.model.stdin_unconsumed -= n;
            }
            Step::ChildExited { code, signal } => {
                let status = match signal {
                    Some(number) => ExitStatus::Signal {
                        number,
                        core_dumped: code & 1 == 1,
                    },
                    None => ExitStatus::Code(code),
                };
                let result = self.session.child_exited(status, self.now);
                if self.model.state == State::Running
                    && self.model.op == Op::Exec
                    && self.model.exit.is_none()
                {
                    assert_eq!(result, Ok(()));
                    self.model.exit = Some((status, self.now));
                } else {
                    assert_eq!(result, Err(SessionError::InvalidState));
                }
            }
            Step::Output { kind, len } => self.output(kind, len),
            Step::Dropped {
                stderr,
                bytes,
                room,
            } => self.dropped(stderr, bytes, room),
            Step::NoteDropped => {
                self.session.note_output_dropped();
                self.model.dropped = true;
            }
            Step::Finish { facts } => {
                let end_facts = facts.map_or(EndFacts::EXITED, Facts::end_facts);
                let result = match facts {
                    None => self.session.finish(self.now),
                    Some(_) => self.session.finish_with(self.now, end_facts),
                };
                match (self.model.state, self.model.op, self.model.exit) {
                    (State::Running, Op::Exec, Some((status, ended))) => {
                        assert_eq!(result, Ok(()));
                        self.model.owed_final = Some(AgentFrame::Exited(Termination {
                            status,
                            duration_us: ended.saturating_sub(self.model.started_at),
                            output_dropped: self.model.dropped,
                            ending: end_facts.ending,
                            tree_kill: end_facts.tree_kill,
                            stdout: self.model.stdout,
                            stderr: self.model.stderr,
                            pipes_held: end_facts.pipes_held,
                            oom_killed: end_facts.oom_killed,
                            peak_memory: end_facts.peak_memory,
                        }));
                        self.enter_closing();
                    }
                    _ => assert_eq!(result, Err(SessionError::InvalidState)),
                }
            }
            Step::Advance { micros } => self.advance(micros),
            Step::Eof => {
                let result = self.session.handle_eof();
                if self.model.op == Op::Put
                    && !self.model.put_ended
                    && !self.closing()
                    && self.model.state != State::Ended
                {
                    // The put's content is incomplete without its digest: abandoned. Nothing
                    // is written and nothing more is sent (a hello or proof not sent yet
                    // aside, as for any client that is gone).
                    assert_eq!(
                        result,
                        Err(SessionError::Disconnected {
                            phase: self.phase(),
                            mid_frame: false
                        })
                    );
                    self.model.state = State::Closed;
                    self.model.file_ready_owed = None;
                    self.model.keepalive_owed = false;
                    self.model.stdin_unconsumed = 0;
                    assert!(self.session.is_closed());
                    self.end_checks();
                    return;
                }
                assert_eq!(result, Ok(()), "an end of stream is never an error");
                match self.model.state {
                    // Mid-operation: no more input (stdin ends with it), the command runs on,
                    // its output and its record are still owed. While closing, the final frame
                    // already queued is still owed (within the final-send deadline).
                    State::Starting | State::Running | State::Operating | State::Closing => {
                        self.model.input_closed = true;
                        self.model.stdin_eof = true;
                    }
                    // Before a request, a health check: the end. Nothing is owed to a client
                    // that is gone, but the session may still offer what it had queued; the
                    // stream check below holds whatever it sends.
                    _ => self.model.state = State::Closed,
                }
            }
            Step::Send(frame) => self.send(frame),
            Step::FileReady { size, mode, uid } => {
                let header = FileHeader {
                    size,
                    mode,
                    mtime: Timestamp { secs: 1, nanos: 2 },
                    uid,
                    gid: uid ^ 1,
                };
                let result = self.session.file_ready(header, self.now);
                if self.model.state == State::Starting && matches!(self.model.op, Op::Put | Op::Get)
                {
                    assert_eq!(result, Ok(()));
                    self.model.state = State::Running;
                    self.model.file_ready_owed = Some(header);
                    self.model.started_at = self.now;
                    self.model.next_keepalive = self.keepalive_after(self.now);
                } else {
                    assert_eq!(result, Err(SessionError::InvalidState));
                }
            }
            Step::FileData { len } => self.file_data(len),
            Step::Skipped {
                path_len,
                reason,
                room,
            } => self.skipped(path_len, reason, room),
            Step::FileDone { bytes, digest } => {
                let summary = FileSummary {
                    bytes,
                    sha256: ByteArray([digest; 32]),
                };
                let result = self.session.file_done(summary, self.now);
                let complete = match self.model.op {
                    Op::Put => self.model.put_ended,
                    Op::Get => true,
                    _ => false,
                };
                if self.model.state == State::Running && complete {
                    assert_eq!(result, Ok(()));
                    self.model.owed_final = Some(AgentFrame::FileDone(summary));
                    self.enter_closing();
                } else {
                    assert_eq!(result, Err(SessionError::InvalidState));
                }
            }
            Step::EncodeInfo { kind, times, room } => {
                for _ in 0..=times {
                    if !self.encode_info(kind, room) {
                        break;
                    }
                }
            }
            Step::NextOperation => self.next_operation(),
            step @ (Step::Detached { .. }
            | Step::EncodeJob { .. }
            | Step::Attached { .. }
            | Step::Waiting
            | Step::JobEnded { .. }) => self.job_step(step),
            Step::ClockSet { secs, nanos } => {
                let previous = Timestamp { secs, nanos };
                let result = self.session.clock_set(previous, self.now);
                if self.model.state == State::Operating && self.model.op == Op::Clock {
                    assert_eq!(result, Ok(()));
                    self.model.owed_final = Some(AgentFrame::ClockSet(previous));
                    self.enter_closing();
                } else {
                    assert_eq!(result, Err(SessionError::InvalidState));
                }
            }
        }
        self.end_checks();
    }

    /// What holds after every step.
    fn end_checks(&mut self) {
        assert_eq!(self.session.input_closed(), self.model.input_closed);
        assert_eq!(
            self.session.stdin_open(),
            self.model.stdin_piped && !self.model.stdin_eof
        );
        assert_eq!(self.session.poll_timeout(), self.expected_timeout());
        self.check_output_phase();
    }

    /// The final frame is queued: a success (`enter_closing`) leaves the connection open when
    /// the agent keeps connections.
    fn enter_closing(&mut self) {
        self.enter_closing_keep(true);
    }

    fn enter_closing_keep(&mut self, reusable: bool) {
        self.model.keep = reusable && self.config.limits.idle_ms > 0;
        self.model.state = State::Closing;
        self.model.deadline = Some(self.now.saturating_add(self.config.final_send_timeout));
        self.model.keepalive_owed = false;
        self.model.next_keepalive = None;
    }

    fn keepalive_after(&self, now: Micros) -> Option<Micros> {
        let interval = u64::from(self.config.limits.keepalive_ms) * 1000;
        (interval > 0).then(|| now.saturating_add(interval))
    }

    /// The end of the post-exit grace period, until it was handled.
    fn grace_deadline(&self) -> Option<Micros> {
        match self.model.exit {
            Some((_, ended)) if !self.model.grace_over => {
                Some(ended.saturating_add(self.config.drain_grace))
            }
            _ => None,
        }
    }

    /// What `poll_timeout` must say: the handshake's or the final send's deadline, or while
    /// the command runs the earlier of the grace period's end and the next keepalive.
    fn expected_timeout(&self) -> Option<Micros> {
        match self.model.state {
            State::Running => match (self.grace_deadline(), self.model.next_keepalive) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            State::Starting | State::Operating | State::Closed => None,
            _ => self.model.deadline,
        }
    }

    /// A breach, a refusal or a handshake timeout: one error frame, then nothing.
    fn fail(&mut self, code: ErrorCode, errno: u32, message: &'static str) {
        self.model.owed_final = Some(AgentFrame::Error(ferry_wire::ErrorFrame {
            code,
            errno,
            message,
        }));
        self.model.started_owed = None;
        self.model.file_ready_owed = None;
        self.model.job.attached_owed = None;
        self.model.stdin_unconsumed = 0;
        self.enter_closing_keep(false);
    }

    fn receive(&mut self, len: u16) {
        let rest = &self.wire[self.received..];
        let take = if len == 0 {
            rest.len()
        } else {
            usize::from(len).min(rest.len())
        };
        self.inbox.extend_from_slice(&rest[..take]);
        self.received += take;
        self.handle_inbox();
    }

    /// Hands the session every whole frame received, as the driver does.
    fn handle_inbox(&mut self) {
        if self.model.state == State::Closed || self.model.input_closed {
            // The driver stopped reading.
            return;
        }
        loop {
            let inbox = std::mem::take(&mut self.inbox);
            let expected = self.expect_input(&inbox);
            let result = self.session.handle_input(&inbox, self.now);
            let used = match (result, expected) {
                (Ok(input), Expect::NeedMore) => {
                    assert_eq!((input.consumed, input.event.is_none()), (0, true));
                    None
                }
                (Ok(input), Expect::Consume(used)) => {
                    assert_eq!(input.consumed, used);
                    assert!(input.event.is_none(), "an event while closing");
                    Some(used)
                }
                (Ok(input), Expect::Event(used)) => {
                    assert_eq!(input.consumed, used);
                    if self.model.state == State::AwaitHello {
                        self.client_hello = inbox[HEADER_LEN..used].to_vec();
                    }
                    self.on_event(input.event.expect("an event"));
                    Some(used)
                }
                (Err(err), Expect::Breach(expected, code)) => {
                    assert_eq!(err, expected);
                    if code == ErrorCode::Unauthenticated {
                        self.prover = None;
                    }
                    // The message is the session's; the code is the protocol's.
                    self.fail(code, 0, "");
                    None
                }
                (got, expected) => {
                    panic!("{got:?}, expected {expected:?} in {:?}", self.model.state)
                }
            };
            self.inbox = inbox;
            match used {
                Some(n) => {
                    self.inbox.drain(..n);
                }
                None => return,
            }
        }
    }

    /// What the session must do with the front of the inbox.
    fn expect_input(&mut self, inbox: &[u8]) -> Expect {
        if self.model.state == State::Ended {
            // The next request waits until the driver has released the last operation.
            return Expect::NeedMore;
        }
        let split = split_frame(inbox, MAX_FRAME_BODY);
        if self.closing() {
            return match split {
                Ok(Some((_, used))) => Expect::Consume(used),
                _ => Expect::NeedMore,
            };
        }
        let (body, used) = match split {
            Ok(Some(split)) => split,
            Ok(None) => return Expect::NeedMore,
            // Before the proof, anything but a right one is refused alike.
            Err(_) if self.model.state == State::AwaitAuth => return unauthenticated(),
            Err(err) => {
                return Expect::Breach(
                    SessionError::FrameTooLarge {
                        declared: err.declared,
                    },
                    ErrorCode::FrameTooLarge,
                )
            }
        };
        let Ok(frame) = decode_client_frame(body) else {
            if self.model.state == State::AwaitAuth {
                return unauthenticated();
            }
            return Expect::Breach(SessionError::Malformed, ErrorCode::Malformed);
        };
        let phase = self.phase();
        let unexpected = |kind| {
            Expect::Breach(
                SessionError::Unexpected { frame: kind, phase },
                ErrorCode::ProtocolViolation,
            )
        };
        let kind = FrameKind::of_client(&frame);
        let stdin_open = self.model.stdin_piped && !self.model.stdin_eof;
        match (self.model.state, frame) {
            (State::AwaitHello, ClientFrame::Hello(hello)) => {
                let low = hello.min_version.max(ferry_wire::MIN_PROTOCOL_VERSION);
                let high = hello.max_version.min(ferry_wire::PROTOCOL_VERSION);
                if hello.magic != MAGIC {
                    Expect::Breach(SessionError::NotFerry, ErrorCode::UnsupportedVersion)
                } else if low > high {
                    Expect::Breach(
                        SessionError::UnsupportedVersion { chosen: 0 },
                        ErrorCode::UnsupportedVersion,
                    )
                } else {
                    Expect::Event(used)
                }
            }
            (State::AwaitAuth, ClientFrame::Auth(proof)) => {
                if self.right_proof(&proof) {
                    Expect::Event(used)
                } else {
                    unauthenticated()
                }
            }
            (State::AwaitAuth, _) => unauthenticated(),
            // After pieces (or a job start), only their exec request.
            (
                State::AwaitRequest,
                ClientFrame::KillAll
                | ClientFrame::Put(_)
                | ClientFrame::Get(_)
                | ClientFrame::Info
                | ClientFrame::Shutdown(_)
                | ClientFrame::TimeSync(_)
                | ClientFrame::Reseed(_)
                | ClientFrame::StartJob(_)
                | ClientFrame::Jobs(_)
                | ClientFrame::Attach(_)
                | ClientFrame::Wait(_)
                | ClientFrame::Kill(_)
                | ClientFrame::Remove(_),
            ) if self.model.parts_seen || self.model.job.start => unexpected(kind),
            // A job's request comes whole.
            (State::AwaitRequest, ClientFrame::ExecPart(_)) if self.model.job.start => {
                request_breach((
                    ErrorCode::InvalidRequest,
                    "a job's request must fit in one exec frame",
                ))
            }
            (
                State::AwaitRequest,
                request @ (ClientFrame::StartJob(_)
                | ClientFrame::Jobs(_)
                | ClientFrame::Attach(_)
                | ClientFrame::Wait(_)
                | ClientFrame::Kill(_)
                | ClientFrame::Remove(_)),
            ) => refused_or(self.job_request_refusal(&request), used),
            (State::AwaitRequest, ClientFrame::KillAll | ClientFrame::Info) => Expect::Event(used),
            (State::AwaitRequest, ClientFrame::Put(put)) => {
                refused_or(put_refusal(&put, &self.config.limits), used)
            }
            (State::AwaitRequest, ClientFrame::Get(get)) => {
                refused_or(get_refusal(&get, &self.config.limits), used)
            }
            (State::AwaitRequest, ClientFrame::Shutdown(request)) => {
                refused_or(shutdown_refusal(&request), used)
            }
            (State::AwaitRequest, ClientFrame::TimeSync(time)) => {
                refused_or(time_sync_refusal(&time), used)
            }
            (State::AwaitRequest, ClientFrame::Reseed(random)) => {
                refused_or(reseed_refusal(random.0), used)
            }
            (State::AwaitRequest, ClientFrame::ExecPart(part)) => {
                let limits = ListLimits::new(part.list, &self.config.limits);
                let before = match part.list {
                    ListKind::Argv => &self.model.argv_parts,
                    ListKind::Env => &self.model.env_parts,
                };
                match limits.check(before, part.data.0, false) {
                    Ok(()) => Expect::Event(used),
                    Err(err) => request_breach(err),
                }
            }
            (State::AwaitRequest, ClientFrame::Exec(request)) => {
                match self.request_error(&request) {
                    None => Expect::Event(used),
                    Some(err) => request_breach(err),
                }
            }
            (State::Starting | State::Running, ClientFrame::Stdin(data)) if stdin_open => {
                let outstanding = self.model.stdin_received - self.stream.credit_total;
                if outstanding + data.0.len() as u64 > self.window() {
                    Expect::Breach(SessionError::CreditExceeded, ErrorCode::ProtocolViolation)
                } else {
                    Expect::Event(used)
                }
            }
            // A put's content ends with its digest, an exec's (or an attachment's) stdin with
            // an EOF.
            (State::Starting | State::Running, ClientFrame::StdinEof)
                if stdin_open && matches!(self.model.op, Op::Exec | Op::Attach) =>
            {
                Expect::Event(used)
            }
            (State::Starting | State::Running, ClientFrame::PutEnd(_))
                if stdin_open && self.model.op == Op::Put =>
            {
                Expect::Event(used)
            }
            // Controls are for commands alone (a job's, through an attachment).
            (State::Starting | State::Running, _)
                if !matches!(self.model.op, Op::Exec | Op::Attach) =>
            {
                unexpected(kind)
            }
            (State::Starting | State::Running, ClientFrame::Signal(number)) => {
                if (1..=64).contains(&number) {
                    Expect::Event(used)
                } else {
                    request_breach((ErrorCode::InvalidRequest, "no such signal"))
                }
            }
            (State::Starting | State::Running, ClientFrame::Resize(_) | ClientFrame::Cancel(_)) => {
                Expect::Event(used)
            }
            _ => unexpected(kind),
        }
    }

    /// Whether `proof` is the one a client with the agent's secret makes after the hello
    /// received: a `ClientSession` with that secret and the proof's nonce computes it. Keeps
    /// that session, which then checks the agent's proof.
    fn right_proof(&mut self, proof: &ClientProof<'_>) -> bool {
        let Some(secret) = &self.secret else {
            return false;
        };
        let mut hello = [0u8; 64];
        let n = encode_client_frame(&ClientFrame::Hello(ClientHello::CURRENT), &mut hello)
            .expect("our hello");
        if self.client_hello != hello[HEADER_LEN..n] {
            // Another hello is hashed into the transcript: a proof over it cannot be made here.
            return false;
        }
        let mut prover = ClientSession::new(
            0,
            None,
            ClientAuth {
                nonce: proof.nonce.0,
                secret: Some(secret.clone()),
            },
        );
        let step = prover
            .handle_input(&self.agent_hello)
            .expect("the agent's hello");
        assert!(matches!(step.event, Some(ClientEvent::HelloAccepted(_))));
        let mut out = vec![0u8; MAX_FRAME];
        let n = prover.poll_transmit(&mut out).expect("hello and proof");
        let (frames, _) = whole_frames(&out[..n]);
        let Ok(ClientFrame::Auth(right)) = decode_client_frame(frames[1]) else {
            panic!("no proof from a client with a secret");
        };
        let right = right.mac.0 == proof.mac.0;
        if right {
            self.prover = Some(prover);
        }
        right
    }

    fn on_event(&mut self, event: AgentEvent<'_>) {
        match event {
            AgentEvent::Hello => {
                assert_eq!(self.model.state, State::AwaitHello);
                self.model.state = if self.secret.is_some() {
                    State::AwaitAuth
                } else {
                    State::AwaitRequest
                };
            }
            AgentEvent::Authenticated => {
                assert_eq!(self.model.state, State::AwaitAuth);
                assert!(
                    self.prover.is_some(),
                    "authenticated without the right proof"
                );
                self.model.state = State::AwaitRequest;
                self.model.proof_owed = true;
            }
            AgentEvent::KillAll => self.begin(State::Operating, Op::Simple),
            AgentEvent::Put(put) => {
                assert_eq!(put_refusal(&put, &self.config.limits), None);
                self.begin(State::Starting, Op::Put);
                self.model.stdin_piped = true;
            }
            AgentEvent::PutEnd(_) => {
                assert_eq!(self.model.op, Op::Put);
                assert!(self.model.stdin_piped && !self.model.stdin_eof && !self.model.put_ended);
                self.model.stdin_eof = true;
                self.model.put_ended = true;
            }
            AgentEvent::Get(get) => {
                assert_eq!(get_refusal(&get, &self.config.limits), None);
                self.begin(State::Starting, Op::Get);
            }
            AgentEvent::Info => self.begin(State::Operating, Op::Info),
            AgentEvent::Shutdown(request) => {
                assert!(request.grace_ms <= ferry_wire::limits::MAX_SHUTDOWN_GRACE_MS);
                self.begin(State::Operating, Op::Simple);
            }
            AgentEvent::TimeSync(time) => {
                assert!(time.nanos < 1_000_000_000);
                self.begin(State::Operating, Op::Clock);
            }
            AgentEvent::Reseed(random) => {
                assert!((1..=ferry_wire::limits::MAX_RESEED).contains(&random.len()));
                self.begin(State::Operating, Op::Simple);
            }
            AgentEvent::Exec(valid) => {
                assert_eq!(self.model.state, State::AwaitRequest);
                let request = valid.request();
                assert_eq!(
                    valid.has_parts(),
                    !self.model.argv_parts.is_empty() || !self.model.env_parts.is_empty()
                );
                // The whole request (the pieces, then the exec's own lists) is valid by ours.
                let argv = [&self.model.argv_parts[..], request.argv.as_bytes()].concat();
                let env = [&self.model.env_parts[..], request.env.as_bytes()].concat();
                let whole = ExecRequest {
                    argv: ferry_wire::StrList::new(&argv),
                    env: ferry_wire::StrList::new(&env),
                    ..*request
                };
                assert!(
                    whole.validate().is_ok(),
                    "a valid exec is valid by ours too"
                );
                if self.model.job.start {
                    // The job's stdin is for whoever attaches to it, not its starter.
                    assert!(!valid.has_parts(), "a job's request in pieces");
                    assert!(self.session.is_job());
                    self.begin(State::Starting, Op::Job);
                } else {
                    assert!(!self.session.is_job());
                    self.begin(State::Starting, Op::Exec);
                    self.model.stdin_piped = request.stdin == StdinMode::Pipe;
                }
            }
            AgentEvent::Stdin(data) => {
                assert!(self.model.stdin_piped && !self.model.stdin_eof);
                self.model.stdin_received += data.len() as u64;
                self.model.stdin_unconsumed += data.len() as u64;
                // Stdin never exceeds the credit the agent granted.
                assert!(self.model.stdin_received <= self.window() + self.stream.credit_total);
            }
            AgentEvent::StdinEof => {
                assert!(matches!(self.model.op, Op::Exec | Op::Attach));
                assert!(self.model.stdin_piped && !self.model.stdin_eof);
                self.model.stdin_eof = true;
            }
            AgentEvent::ExecPart { list, data } => {
                assert_eq!(self.model.state, State::AwaitRequest);
                self.model.parts_seen = true;
                match list {
                    ListKind::Argv => self.model.argv_parts.extend_from_slice(data),
                    ListKind::Env => self.model.env_parts.extend_from_slice(data),
                }
            }
            AgentEvent::Signal(number) => {
                assert!(matches!(self.model.op, Op::Exec | Op::Attach));
                assert!(matches!(self.model.state, State::Starting | State::Running));
                assert!((1..=64).contains(&number), "signal {number}");
            }
            AgentEvent::Resize(_) | AgentEvent::Cancel { .. } => {
                assert!(matches!(self.model.op, Op::Exec | Op::Attach));
                assert!(matches!(self.model.state, State::Starting | State::Running));
            }
            event @ (AgentEvent::StartJob(_)
            | AgentEvent::Jobs(_)
            | AgentEvent::Attach(_)
            | AgentEvent::Wait(_)
            | AgentEvent::Kill(_)
            | AgentEvent::Remove(_)) => self.on_job_event(event),
        }
    }

    /// A request was handed to the driver: the handshake deadline is over.
    fn begin(&mut self, state: State, op: Op) {
        assert_eq!(self.model.state, State::AwaitRequest);
        assert_eq!(self.model.op, Op::None);
        self.model.state = state;
        self.model.op = op;
        self.model.deadline = None;
    }

    fn transmit(&mut self, room: u16) {
        let room = if room == 0 {
            MAX_FRAME
        } else {
            usize::from(room)
        };
        let mut out = vec![0u8; room];
        match self.session.poll_transmit(&mut out) {
            Ok(n) => {
                assert!(n <= room);
                self.sent.extend_from_slice(&out[..n]);
                self.check_stream();
                if n == 0 {
                    // Nothing queued, so nothing owed.
                    assert!(!self.model.hello_owed && self.model.started_owed.is_none());
                    assert!(
                        self.model.file_ready_owed.is_none(),
                        "a file header withheld"
                    );
                    assert!(!self.model.proof_owed, "a proof withheld");
                    assert!(
                        self.model.job.attached_owed.is_none(),
                        "an attachment header withheld"
                    );
                    assert!(!self.model.keepalive_owed, "a keepalive withheld");
                    assert!(self.model.owed_final.is_none(), "a final frame withheld");
                }
                // With room for everything, consumed stdin is credited back in full once all of
                // it is consumed (no stall waiting for a batch that cannot fill).
                if room == MAX_FRAME
                    && self.model.state == State::Running
                    && self.model.stdin_unconsumed == 0
                {
                    assert_eq!(
                        self.stream.credit_total, self.model.stdin_received,
                        "credit held back"
                    );
                }
            }
            Err(err) => {
                assert_eq!(err, SessionError::BufferTooSmall);
                assert!(room < 512, "a small buffer only");
            }
        }
    }

    fn output(&mut self, kind: u8, len: u32) {
        // Like the pump: control frames first, one frame in flight.
        let before = self.sent.len();
        self.transmit(0);
        if self.sent.len() > before {
            return;
        }
        let len = (len as usize) % (MAX_DATA + 2);
        let kind = match kind % 4 {
            0 => DataKind::Stdout,
            1 => DataKind::Stderr,
            2 => DataKind::Stdin,
            _ => DataKind::FileData,
        };
        let mut buf = vec![0u8; DATA_HEADROOM + len];
        for (i, byte) in buf[DATA_HEADROOM..].iter_mut().enumerate() {
            *byte = i as u8;
        }
        let result = self.session.frame_output(&mut buf, kind, len, self.now);
        let output = matches!(kind, DataKind::Stdout | DataKind::Stderr);
        let op = matches!(self.model.op, Op::Exec | Op::Attach);
        if self.model.state != State::Running || !op || !output {
            assert_eq!(result, Err(SessionError::InvalidState));
            return;
        }
        if len > MAX_DATA {
            assert!(result.is_err(), "{len} bytes framed");
            return;
        }
        let start = result.expect("output while running");
        // Stamped with the time since the command started.
        let (body, used) = split_frame(&buf[start..], MAX_FRAME_BODY)
            .expect("within the limit")
            .expect("a whole frame");
        assert_eq!(used, buf.len() - start);
        let at_us = self.now.saturating_sub(self.model.started_at);
        match decode_agent_frame(body).expect("an output frame") {
            AgentFrame::Stdout(out) if kind == DataKind::Stdout => {
                assert_eq!((out.at_us, out.data.0.len()), (at_us, len))
            }
            AgentFrame::Stderr(out) if kind == DataKind::Stderr => {
                assert_eq!((out.at_us, out.data.0.len()), (at_us, len))
            }
            other => panic!("{kind:?} framed as {other:?}"),
        }
        self.sent.extend_from_slice(&buf[start..]);
        let record = match kind {
            DataKind::Stderr => &mut self.model.stderr,
            _ => &mut self.model.stdout,
        };
        record.bytes = record.bytes.saturating_add(len as u64);
        if self.model.exit.is_some() {
            self.model.drained += len as u64;
            if self.model.drained > self.config.drain_limit as u64 {
                self.model.dropped = true;
            }
        }
        self.check_stream();
    }

    fn dropped(&mut self, stderr: bool, bytes: u64, room: u8) {
        // In order with the data: after the control frames, one frame in flight.
        let before = self.sent.len();
        self.transmit(0);
        if self.sent.len() > before {
            return;
        }
        let stream = if stderr {
            Stream::Stderr
        } else {
            Stream::Stdout
        };
        let room = if room == 0 {
            MAX_FRAME
        } else {
            usize::from(room % 16)
        };
        let mut out = vec![0u8; room];
        let result = self.session.encode_output_dropped(stream, bytes, &mut out);
        if self.model.state != State::Running || !matches!(self.model.op, Op::Exec | Op::Attach) {
            assert_eq!(result, Err(SessionError::InvalidState));
            return;
        }
        let n = match result {
            Ok(n) => n,
            Err(err) => {
                // Nothing counted when nothing was encoded.
                assert_eq!(err, SessionError::BufferTooSmall);
                assert!(room < 16);
                return;
            }
        };
        self.sent.extend_from_slice(&out[..n]);
        let record = match stream {
            Stream::Stderr => &mut self.model.stderr,
            Stream::Stdout => &mut self.model.stdout,
        };
        record.bytes = record.bytes.saturating_add(bytes);
        record.dropped = record.dropped.saturating_add(bytes);
        self.model.dropped |= bytes > 0;
        self.check_stream();
    }

    fn advance(&mut self, micros: u32) {
        // Mostly small steps, sometimes past every deadline.
        self.now = self.now.saturating_add(u64::from(micros) * 16);
        let expired = self
            .model
            .deadline
            .is_some_and(|deadline| self.now >= deadline);
        let result = self.session.handle_timeout(self.now);
        match self.model.state {
            // The idle deadline after an operation: closed without a word.
            State::AwaitRequest if expired && self.served => {
                assert_eq!(result, Err(SessionError::TimedOut { phase: Phase::Idle }));
                self.model.state = State::Closed;
            }
            State::AwaitHello | State::AwaitAuth | State::AwaitRequest if expired => {
                assert_eq!(
                    result,
                    Err(SessionError::TimedOut {
                        phase: self.phase()
                    })
                );
                self.fail(ErrorCode::ProtocolViolation, 0, "");
            }
            State::Closing | State::Ended if expired => {
                assert_eq!(result, Err(SessionError::TimedOut { phase: Phase::Done }));
                self.model.state = State::Closed;
            }
            State::Running => {
                assert_eq!(result, Ok(()));
                if let Some((_, ended)) = self.model.exit {
                    self.model.grace_over |=
                        self.now >= ended.saturating_add(self.config.drain_grace);
                }
                if self.model.next_keepalive.is_some_and(|due| self.now >= due) {
                    self.model.keepalive_owed = true;
                    self.model.next_keepalive = self.keepalive_after(self.now);
                }
            }
            _ => assert_eq!(result, Ok(())),
        }
        if let Some(deadline) = self.session.poll_timeout() {
            assert!(deadline > self.now, "a spent deadline is still reported");
        }
    }

    fn check_output_phase(&self) {
        let phase = self.session.output_phase(self.now);
        let expected = match self.model.exit {
            _ if self.model.dropped && self.model.drained > self.config.drain_limit as u64 => {
                OutputPhase::Closed
            }
            None => OutputPhase::Open,
            Some((_, ended)) if self.now < ended.saturating_add(self.config.drain_grace) => {
                OutputPhase::Grace
            }
            Some(_) => OutputPhase::Drain,
        };
        assert_eq!(phase, expected);
    }

    /// Checks every new frame of the agent's stream against the protocol and the model.
    fn check_stream(&mut self) {
        let (frames, used) = whole_frames(&self.sent[self.checked..]);
        let frames: Vec<Vec<u8>> = frames.into_iter().map(<[u8]>::to_vec).collect();
        assert_eq!(
            self.checked + used,
            self.sent.len(),
            "the agent sent part of a frame"
        );
        self.checked += used;
        for body in frames {
            let frame = decode_agent_frame(&body).expect("the agent's frames decode");
            assert!(!self.stream.final_seen, "{frame:?} after the final frame");
            let first = self.stream.frames == 0;
            self.stream.frames += 1;
            match frame {
                AgentFrame::Hello(hello) => {
                    assert!(first, "a hello that is not the first frame");
                    assert!(self.model.hello_owed);
                    self.model.hello_owed = false;
                    self.stream.hello = true;
                    assert_eq!(hello.magic, MAGIC);
                    assert_eq!(hello.limits, self.config.limits);
                    assert!(self.config.agent_version.starts_with(hello.agent_version));
                    assert!(hello.agent_version.len() <= ferry_wire::limits::MAX_VERSION_STRING);
                }
                AgentFrame::Authenticated(proof) => {
                    assert!(self.stream.hello && !self.stream.authenticated);
                    assert!(self.model.proof_owed, "a proof nobody earned");
                    self.model.proof_owed = false;
                    self.stream.authenticated = true;
                    // The client that made the right proof takes the agent's.
                    let prover = self.prover.as_mut().expect("the prover");
                    let mut buf = [0u8; 128];
                    let n =
                        ferry_wire::encode_agent_frame(&AgentFrame::Authenticated(proof), &mut buf)
                            .expect("a proof frame");
                    let step = prover
                        .handle_input(&buf[..n])
                        .expect("the agent's proof is right");
                    assert_eq!(step.event, Some(ClientEvent::Authenticated));
                }
                AgentFrame::Done(report) => {
                    assert!(
                        self.stream.hello && (self.stream.authenticated || self.secret.is_none())
                    );
                    match self.model.op {
                        Op::Simple => {}
                        Op::Info => assert!(self.stream.info_frames > 0, "done before the system"),
                        Op::JobList => assert_eq!(
                            report.count as usize, self.stream.job_records,
                            "a listing's count is its records"
                        ),
                        Op::Attach => {
                            assert!(self.stream.attached, "done before Attached");
                            assert_eq!(report.count, 0);
                        }
                        op => panic!("done for {op:?}"),
                    }
                    let owed = self.model.owed_final.take();
                    assert_eq!(owed, Some(AgentFrame::Done(report)));
                    self.stream.final_seen = true;
                    self.operation_over();
                }
                AgentFrame::Started(started) => {
                    assert!(self.stream.hello && !self.stream.started);
                    assert!(self.stream.authenticated || self.secret.is_none());
                    assert_eq!(Some(started.pid), self.model.started_owed.take());
                    self.stream.started = true;
                }
                AgentFrame::Stdout(_) | AgentFrame::Stderr(_) => {
                    assert!(
                        self.stream.started || self.stream.attached,
                        "output before Started or Attached"
                    );
                }
                AgentFrame::OutputDropped(_) => {
                    assert!(
                        self.stream.started || self.stream.attached,
                        "an output-dropped notice before Started or Attached"
                    );
                }
                AgentFrame::Keepalive => {
                    // A wait's keepalives come with nothing before them.
                    assert!(
                        self.stream.started
                            || self.stream.file_ready
                            || self.stream.attached
                            || self.model.op == Op::Wait,
                        "a keepalive before Started, FileReady or Attached"
                    );
                    assert!(self.stream.authenticated || self.secret.is_none());
                    assert!(self.model.keepalive_owed, "a keepalive that was not due");
                    self.model.keepalive_owed = false;
                }
                AgentFrame::StdinCredit(n) => {
                    assert!(
                        self.stream.started
                            || self.stream.attached
                            || (self.stream.file_ready && self.model.op == Op::Put),
                        "credit before Started, Attached or a put's FileReady"
                    );
                    assert!(n > 0, "empty credit");
                    self.stream.credit_total += u64::from(n);
                    let consumed = self.model.stdin_received - self.model.stdin_unconsumed;
                    assert!(
                        self.stream.credit_total <= consumed,
                        "credit beyond consumption"
                    );
                }
                AgentFrame::Exited(end) => {
                    // An exec's after Started, an attachment's after Attached; a wait's alone.
                    assert!(
                        self.stream.started
                            || self.stream.attached
                            || (self.model.op == Op::Wait
                                && (self.stream.authenticated || self.secret.is_none()))
                    );
                    if self.model.stdin_unconsumed == 0 {
                        assert_eq!(self.stream.credit_total, self.model.stdin_received);
                    }
                    let owed = self.model.owed_final.take();
                    assert_eq!(owed, Some(AgentFrame::Exited(end)));
                    self.stream.final_seen = true;
                    self.operation_over();
                }
                AgentFrame::Error(err) => {
                    assert!(!self.model.hello_owed, "the owed hello goes first");
                    assert!(
                        !self.model.proof_owed,
                        "an earned proof goes before the error"
                    );
                    let Some(AgentFrame::Error(owed)) = self.model.owed_final.take() else {
                        panic!("an error frame nobody caused: {err:?}");
                    };
                    assert_eq!(err.code, owed.code);
                    assert_eq!(err.errno, owed.errno);
                    assert!(err.message.len() <= MAX_MESSAGE);
                    if !owed.message.is_empty() {
                        assert!(owed.message.starts_with(err.message));
                    }
                    self.stream.final_seen = true;
                    self.operation_over();
                }
                AgentFrame::Ready(_) => panic!("a readiness report on an exec connection"),
                AgentFrame::FileReady(header) => {
                    assert!(self.stream.authenticated || self.secret.is_none());
                    assert!(
                        self.stream.hello && !self.stream.file_ready,
                        "a second header"
                    );
                    assert!(matches!(self.model.op, Op::Put | Op::Get));
                    assert_eq!(Some(header), self.model.file_ready_owed.take());
                    self.stream.file_ready = true;
                }
                AgentFrame::FileData(_) => {
                    assert!(self.stream.file_ready, "content before FileReady");
                    assert_eq!(
                        self.model.op,
                        Op::Get,
                        "file content for {:?}",
                        self.model.op
                    );
                }
                AgentFrame::Skipped(skipped) => {
                    assert!(self.stream.file_ready, "a skipped entry before FileReady");
                    assert!(skipped.path.0.len() <= ferry_wire::limits::MAX_PATH);
                }
                AgentFrame::FileDone(summary) => {
                    assert!(self.stream.file_ready, "a summary before FileReady");
                    if self.model.op == Op::Put {
                        assert!(self.model.put_ended, "a put's summary before its digest");
                    }
                    if self.model.stdin_unconsumed == 0 {
                        assert_eq!(self.stream.credit_total, self.model.stdin_received);
                    }
                    let owed = self.model.owed_final.take();
                    assert_eq!(owed, Some(AgentFrame::FileDone(summary)));
                    self.stream.final_seen = true;
                    self.operation_over();
                }
                AgentFrame::SystemInfo(_) => {
                    assert!(self.stream.authenticated || self.secret.is_none());
                    assert_eq!(self.model.op, Op::Info);
                    assert_eq!(
                        self.stream.info_frames, 0,
                        "the system is the first info frame"
                    );
                    self.stream.info_frames += 1;
                }
                AgentFrame::Mount(_) | AgentFrame::Interface(_) => {
                    assert_eq!(self.model.op, Op::Info);
                    assert!(self.stream.info_frames > 0, "a mount or interface first");
                    self.stream.info_frames += 1;
                    assert!(
                        self.stream.info_frames <= MAX_INFO_ITEMS + 1,
                        "too many items"
                    );
                }
                frame
                @ (AgentFrame::Detached(_) | AgentFrame::Job(_) | AgentFrame::Attached(_)) => {
                    self.check_job_frame(frame)
                }
                AgentFrame::ClockSet(previous) => {
                    assert!(self.stream.authenticated || self.secret.is_none());
                    assert_eq!(self.model.op, Op::Clock);
                    let owed = self.model.owed_final.take();
                    assert_eq!(owed, Some(AgentFrame::ClockSet(previous)));
                    self.stream.final_seen = true;
                    self.operation_over();
                }
            }
        }
    }

    /// The end of the run: drain what is queued; whatever was owed must have gone out.
    fn end(&mut self) {
        for _ in 0..8 {
            self.transmit(0);
        }
        assert!(
            self.model.owed_final.is_none(),
            "a final frame owed and never sent"
        );
        assert!(!self.model.hello_owed && self.model.started_owed.is_none());
        assert!(
            self.model.file_ready_owed.is_none(),
            "a file header never sent"
        );
        assert!(!self.model.proof_owed);
        assert!(
            self.model.job.attached_owed.is_none(),
            "an attachment header never sent"
        );
        assert!(
            !self.model.keepalive_owed,
            "a keepalive owed and never sent"
        );
        assert!(
            self.session.is_closed() || !self.closing(),
            "closing with nothing to send"
        );
    }
}

/// A request the model refuses, or its event.
fn refused_or(refusal: Option<RequestRefusal>, used: usize) -> Expect {
    match refusal {
        Some(refusal) => request_breach(refusal),
        None => Expect::Event(used),
    }
}
const NOT_KEY_VALUE: RequestRefusal = (
    ErrorCode::InvalidRequest,
    "environment entry is not KEY=VALUE",
);

fn request_breach((code, message): RequestRefusal) -> Expect {
    Expect::Breach(SessionError::InvalidRequest { message }, code)
}

/// The rules of a packed list, written apart from `ListCheck` (which checks as pieces arrive):
/// here the whole list so far is scanned again at every piece, and the first rule broken, in
/// the list's order, is the answer.
struct ListLimits {
    kind: ListKind,
    bytes: usize,
    entries: usize,
    entry: usize,
}

impl ListLimits {
    fn new(kind: ListKind, limits: &Limits) -> ListLimits {
        let within = |limit: u32, ours: usize| (limit as usize).min(ours);
        let (bytes, entries) = match kind {
            ListKind::Argv => (
                within(limits.max_argv_bytes, MAX_ARGV_BYTES),
                within(limits.max_args, MAX_ARGS),
            ),
            ListKind::Env => (
                within(limits.max_env_bytes, MAX_ENV_BYTES),
                within(limits.max_env_vars, MAX_ENV_VARS),
            ),
        };
        ListLimits {
            kind,
            bytes,
            entries,
            entry: within(limits.max_arg_len, MAX_ARG_LEN),
        }
    }

    /// Whether `piece` after `before` (which passed) keeps the list within the rules; with
    /// `last`, the list ends with it.
    fn check(&self, before: &[u8], piece: &[u8], last: bool) -> Result<(), RequestRefusal> {
        // The byte count is checked before the piece is looked at.
        if before.len() + piece.len() > self.bytes {
            return Err(LIMIT);
        }
        let whole = [before, piece].concat();
        let mut entries = 0;
        for entry in whole.split_inclusive(|b| *b == 0) {
            let (text, ended) = match entry.split_last() {
                Some((0, text)) => (text, true),
                _ => (entry, false),
            };
            entries += 1;
            if entries > self.entries {
                return Err(LIMIT);
            }
            if self.kind == ListKind::Env && text.first() == Some(&b'=') {
                return Err(NOT_KEY_VALUE);
            }
            if text.len() + usize::from(ended) > self.entry {
                return Err(LIMIT);
            }
            if ended && self.kind == ListKind::Argv && entries == 1 && text.is_empty() {
                return Err((ErrorCode::InvalidRequest, "argv[0] is empty"));
            }
            if ended && self.kind == ListKind::Env && !text.contains(&b'=') {
                return Err(NOT_KEY_VALUE);
            }
        }
        if last && whole.last().is_some_and(|b| *b != 0) {
            return Err((
                ErrorCode::InvalidRequest,
                "list entry without NUL terminator",
            ));
        }
        if last && self.kind == ListKind::Argv && entries == 0 {
            return Err((ErrorCode::InvalidRequest, "argv is empty"));
        }
        Ok(())
    }
}

impl Run<'_> {
    /// The client sends `frame`: it joins the client's stream after what came before.
    fn send(&mut self, frame: Frame) {
        let data: Vec<u8> = (0..u16::MAX).map(|i| i as u8).collect();
        let bytes = match frame {
            Frame::Proof { nonce } => self.proof([nonce; NONCE_LEN]),
            Frame::Put(choice) => {
                let parts = choice.parts();
                encode(&ClientFrame::Put(choice.request(&parts)))
            }
            Frame::Get(choice) => {
                let path = choice.path.bytes();
                let user = choice.user.bytes();
                encode(&ClientFrame::Get(choice.request(&path, user.as_deref())))
            }
            Frame::Hello => encode(&ClientFrame::Hello(ClientHello::CURRENT)),
            Frame::Exec { pipe } => encode(&ClientFrame::Exec(ExecRequest {
                argv: StrList::new(b"cat\0"),
                env: StrList::new(b""),
                clean_env: false,
                cwd: None,
                stdin: if pipe {
                    StdinMode::Pipe
                } else {
                    StdinMode::Null
                },
                user: None,
                pty: None,
                timeout_ms: 0,
                kill_grace_ms: None,
                kill_tree_on_exit: false,
                max_output: 0,
            })),
            Frame::KillAll => encode(&ClientFrame::KillAll),
            Frame::PutEnd { digest } => encode(&ClientFrame::PutEnd(ByteArray([digest; 32]))),
            Frame::Info => encode(&ClientFrame::Info),
            Frame::Shutdown { reboot, grace_ms } => {
                encode(&ClientFrame::Shutdown(ShutdownRequest { reboot, grace_ms }))
            }
            Frame::TimeSync { secs, nanos } => {
                encode(&ClientFrame::TimeSync(Timestamp { secs, nanos }))
            }
            Frame::Reseed { len } => {
                encode(&ClientFrame::Reseed(Bytes(&data[..usize::from(len) % 600])))
            }
            Frame::Stdin { len } => encode(&ClientFrame::Stdin(Bytes(
                &data[..usize::from(len).min(MAX_DATA)],
            ))),
            Frame::StdinEof => encode(&ClientFrame::StdinEof),
            Frame::Signal(number) => encode(&ClientFrame::Signal(number)),
            Frame::Cancel(grace_ms) => encode(&ClientFrame::Cancel(Cancel { grace_ms })),
            Frame::ExecPart { env, len } => {
                let entries: Vec<u8> = (0..len)
                    .map(|i| if i % 4 == 3 { 0 } else { b'a' + i % 26 })
                    .collect();
                let (list, data) = if env {
                    (ListKind::Env, [&b"K="[..], &entries].concat())
                } else {
                    (ListKind::Argv, entries)
                };
                encode(&ClientFrame::ExecPart(ferry_wire::ExecPart {
                    list,
                    data: Bytes(&data),
                }))
            }
            Frame::Resize => encode(&ClientFrame::Resize(WindowSize { rows: 24, cols: 80 })),
            Frame::StartJob(name) => {
                let name = name.bytes();
                encode(&ClientFrame::StartJob(ferry_wire::JobStart {
                    name: name.as_deref().map(Bytes),
                }))
            }
            Frame::Jobs(choice) => {
                let parts = choice.parts();
                encode(&ClientFrame::Jobs(choice.query(&parts)))
            }
            Frame::Attach(choice) => {
                let parts = choice.parts();
                encode(&ClientFrame::Attach(choice.attach(&parts)))
            }
            Frame::Wait(choice) => {
                let parts = choice.parts();
                encode(&ClientFrame::Wait(choice.request(&parts)))
            }
            Frame::Kill(choice) => {
                let parts = choice.parts();
                encode(&ClientFrame::Kill(choice.kill(&parts)))
            }
            Frame::Remove(choice) => {
                let parts = choice.parts();
                encode(&ClientFrame::Remove(choice.request(&parts)))
            }
        };
        self.inbox.extend_from_slice(&bytes);
        self.handle_inbox();
    }

    /// The proof a client with the agent's secret (or, for an insecure agent, another secret)
    /// makes after our hello.
    fn proof(&self, nonce: [u8; NONCE_LEN]) -> Vec<u8> {
        let secret = self
            .secret
            .clone()
            .unwrap_or_else(|| Secret::new(b"not the agent's secret").expect("a secret"));
        let mut client = ClientSession::new(
            0,
            None,
            ClientAuth {
                nonce,
                secret: Some(secret),
            },
        );
        let mut hello = self.agent_hello.clone();
        if self.secret.is_none() {
            // An insecure agent's hello is refused by a client with a secret: take a proof
            // over a secure one (wrong for this agent either way).
            hello = secure_hello(&self.config);
        }
        client.handle_input(&hello).expect("the agent's hello");
        let mut out = vec![0u8; MAX_FRAME];
        let n = client.poll_transmit(&mut out).expect("hello and proof");
        let (frames, used) = whole_frames(&out[..n]);
        let hello_len = HEADER_LEN + frames[0].len();
        assert_eq!(used, n);
        out[hello_len..n].to_vec()
    }

    /// A get's content (control frames first, like output).
    fn file_data(&mut self, len: u32) {
        let before = self.sent.len();
        self.transmit(0);
        if self.sent.len() > before {
            return;
        }
        let len = (len as usize) % (MAX_DATA + 2);
        let mut buf = vec![0u8; DATA_HEADROOM + len];
        for (i, byte) in buf[DATA_HEADROOM..].iter_mut().enumerate() {
            *byte = (i as u8) ^ 0x5a;
        }
        let result = self.session.frame_file_data(&mut buf, len);
        if self.model.state != State::Running || self.model.op != Op::Get {
            assert_eq!(result, Err(SessionError::InvalidState));
            return;
        }
        if len > MAX_DATA {
            assert!(result.is_err(), "{len} bytes framed");
            return;
        }
        let start = result.expect("content while a get runs");
        let (body, used) = split_frame(&buf[start..], MAX_FRAME_BODY)
            .expect("within the limit")
            .expect("a whole frame");
        assert_eq!(used, buf.len() - start);
        match decode_agent_frame(body).expect("a content frame") {
            AgentFrame::FileData(data) => assert_eq!(data.0, &buf[DATA_HEADROOM..]),
            other => panic!("content framed as {other:?}"),
        }
        self.sent.extend_from_slice(&buf[start..]);
        self.check_stream();
    }

    /// A tree's entry left out (in order with the content).
    fn skipped(&mut self, path_len: u16, reason: u8, room: u8) {
        let before = self.sent.len();
        self.transmit(0);
        if self.sent.len() > before {
            return;
        }
        let path = vec![b's'; usize::from(path_len) % (ferry_wire::limits::MAX_PATH + 100)];
        let reason = match reason % 3 {
            0 => SkipReason::Special,
            1 => SkipReason::HardLink,
            _ => SkipReason::UnknownType,
        };
        let room = if room == 0 {
            MAX_FRAME
        } else {
            usize::from(room % 32)
        };
        let mut out = vec![0u8; room];
        let result = self.session.encode_skipped(&path, reason, &mut out);
        if self.model.state != State::Running || !matches!(self.model.op, Op::Put | Op::Get) {
            assert_eq!(result, Err(SessionError::InvalidState));
            return;
        }
        let n = match result {
            Ok(n) => n,
            Err(err) => {
                assert_eq!(err, SessionError::BufferTooSmall);
                assert!(room < 32);
                return;
            }
        };
        let (body, _) = split_frame(&out[..n], MAX_FRAME_BODY)
            .expect("within the limit")
            .expect("a whole frame");
        match decode_agent_frame(body).expect("a skipped entry") {
            // A path too long for the protocol is cut, never refused.
            AgentFrame::Skipped(skipped) => {
                let kept = path.len().min(ferry_wire::limits::MAX_PATH);
                assert_eq!(skipped.path.0, &path[..kept]);
                assert_eq!(skipped.reason, reason);
            }
            other => panic!("a skipped entry encoded as {other:?}"),
        }
        self.sent.extend_from_slice(&out[..n]);
        self.check_stream();
    }

    /// One frame of an info operation; returns whether it was encoded.
    fn encode_info(&mut self, kind: u8, room: u8) -> bool {
        let before = self.sent.len();
        self.transmit(0);
        if self.sent.len() > before {
            return false;
        }
        let system = SystemInfo {
            kernel_release: "6.1",
            kernel_version: "#1 SMP",
            machine: "x86_64",
            hostname: "guest",
            uptime_ms: 1,
            now: Timestamp { secs: 2, nanos: 3 },
            cpus: 1,
            cpu_model: "",
            load: [1, 2, 3],
            memory_total: 4,
            memory_available: 5,
            processes: 6,
            agent_pid: 1,
            agent_rss: 7,
        };
        let frame = match kind % 4 {
            0 => AgentFrame::SystemInfo(system),
            1 => AgentFrame::Mount(MountInfo {
                source: Bytes(b"/dev/vda"),
                target: Bytes(b"/"),
                fstype: "ext4",
                read_only: false,
                total: 8,
                free: 9,
                available: 10,
            }),
            2 => AgentFrame::Interface(InterfaceInfo {
                name: "eth0",
                up: true,
                mtu: 1500,
                mac: Bytes(&[2, 0, 0, 0, 0, 1]),
                addresses: StrList::new(b"10.0.0.2/24\0"),
                rx_bytes: 11,
                tx_bytes: 12,
            }),
            _ => AgentFrame::Done(DoneReport { count: 1 }),
        };
        let room = if room == 0 {
            MAX_FRAME
        } else {
            usize::from(room)
        };
        let mut out = vec![0u8; room];
        let result = self.session.encode_info(&frame, &mut out);
        let items = self.model.info_items;
        let allowed = match frame {
            AgentFrame::SystemInfo(_) => items == 0,
            AgentFrame::Mount(_) | AgentFrame::Interface(_) => {
                (1..=MAX_INFO_ITEMS).contains(&items)
            }
            _ => false,
        };
        if self.model.state != State::Operating || self.model.op != Op::Info || !allowed {
            assert_eq!(result, Err(SessionError::InvalidState));
            return false;
        }
        let n = match result {
            Ok(n) => n,
            Err(err) => {
                // Nothing counted when nothing was encoded.
                assert_eq!(err, SessionError::BufferTooSmall);
                assert!(room < 256);
                return false;
            }
        };
        let (body, used) = split_frame(&out[..n], MAX_FRAME_BODY)
            .expect("within the limit")
            .expect("a whole frame");
        assert_eq!(used, n);
        assert_eq!(decode_agent_frame(body), Ok(frame));
        self.model.info_items += 1;
        self.sent.extend_from_slice(&out[..n]);
        self.check_stream();
        true
    }

    /// Why the agent must refuse `request` after the pieces received, if it must: its lists
    /// (argv, then the environment), then the user, then the working directory.
    fn request_error(&self, request: &ExecRequest<'_>) -> Option<RequestRefusal> {
        let limits = &self.config.limits;
        let argv = ListLimits::new(ListKind::Argv, limits);
        let env = ListLimits::new(ListKind::Env, limits);
        if let Err(err) = argv.check(&self.model.argv_parts, request.argv.as_bytes(), true) {
            return Some(err);
        }
        if let Err(err) = env.check(&self.model.env_parts, request.env.as_bytes(), true) {
            return Some(err);
        }
        let within = |limit: u32, ours: usize| (limit as usize).min(ours);
        if let Some(Bytes(user)) = request.user {
            if user.len() > within(limits.max_user, MAX_USER) {
                return Some(LIMIT);
            }
            if user.is_empty() || user.contains(&0) {
                return Some((ErrorCode::InvalidRequest, "user is empty or contains NUL"));
            }
        }
        if let Some(Bytes(cwd)) = request.cwd {
            if cwd.len() > within(limits.max_path, MAX_PATH) {
                return Some(LIMIT);
            }
            if cwd.is_empty() || cwd.contains(&0) {
                return Some((ErrorCode::InvalidRequest, "cwd is empty or contains NUL"));
            }
        }
        None
    }
}

fn encode(frame: &ClientFrame<'_>) -> Vec<u8> {
    let mut out = vec![0u8; MAX_FRAME];
    let n = encode_client_frame(frame, &mut out).expect("a client frame");
    out.truncate(n);
    out
}

/// The hello of a secure agent with `config` (for a proof to send an insecure one).
fn secure_hello(config: &AgentConfig) -> Vec<u8> {
    let auth = AgentAuth {
        nonce: AGENT_NONCE,
        secret: Some(Secret::new(SECRET).expect("a valid secret")),
    };
    let mut session = AgentSession::new(*config, START, auth);
    let mut out = vec![0u8; MAX_FRAME];
    let n = session.poll_transmit(&mut out).expect("the hello");
    out.truncate(n);
    out
}

fn unauthenticated() -> Expect {
    Expect::Breach(SessionError::Unauthenticated, ErrorCode::Unauthenticated)
}

/// What the session must do with the input.
#[derive(Debug)]
enum Expect {
    NeedMore,
    /// Drop a frame without an event (the session is closing).
    Consume(usize),
    Event(usize),
    Breach(SessionError, ErrorCode),
}

fn error_code(n: u8) -> ErrorCode {
    const CODES: [ErrorCode; 28] = [
        ErrorCode::UnsupportedVersion,
        ErrorCode::Malformed,
        ErrorCode::FrameTooLarge,
        ErrorCode::ProtocolViolation,
        ErrorCode::LimitExceeded,
        ErrorCode::InvalidRequest,
        ErrorCode::NotFound,
        ErrorCode::PermissionDenied,
        ErrorCode::ExecFormat,
        ErrorCode::BadCwd,
        ErrorCode::SpawnFailed,
        ErrorCode::ResourceExhausted,
        ErrorCode::Busy,
        ErrorCode::Internal,
        ErrorCode::Unauthenticated,
        ErrorCode::Unsupported,
        ErrorCode::ArgumentsTooLong,
        ErrorCode::AlreadyExists,
        ErrorCode::WrongFileType,
        ErrorCode::FileTooLarge,
        ErrorCode::NoSpace,
        ErrorCode::IntegrityMismatch,
        ErrorCode::PathEscape,
        ErrorCode::Io,
        ErrorCode::BadArchive,
        ErrorCode::NoSuchJob,
        ErrorCode::JobRunning,
        ErrorCode::JobEnded,
    ];
    CODES[usize::from(n) % CODES.len()]
}

/// Protocol 5's detached jobs: their requests, events, driver calls and frames.
impl Run<'_> {
    /// Why the agent must refuse a job request, if it must (the model's own rules).
    fn job_request_refusal(&self, frame: &ClientFrame<'_>) -> Option<RequestRefusal> {
        let limits = &self.config.limits;
        match frame {
            ClientFrame::StartJob(start) => start_refusal(start.name.map(|name| name.0)),
            ClientFrame::Jobs(query) => query_refusal(query, limits),
            ClientFrame::Attach(request) => attach_refusal(request, limits),
            ClientFrame::Wait(request) | ClientFrame::Remove(request) => {
                request_refusal(request, limits)
            }
            ClientFrame::Kill(kill) => kill_refusal(kill, limits),
            other => panic!("{other:?} is no job request"),
        }
    }

    fn on_job_event(&mut self, event: AgentEvent<'_>) {
        let limits = self.config.limits;
        match event {
            AgentEvent::StartJob(start) => {
                // The exec follows; nothing has begun yet (the handshake deadline runs on).
                assert_eq!(self.model.state, State::AwaitRequest);
                assert!(!self.model.job.start && !self.model.parts_seen);
                assert_eq!(start_refusal(start.name.map(|name| name.0)), None);
                self.model.job.start = true;
            }
            AgentEvent::Jobs(query) => {
                assert_eq!(query_refusal(&query, &limits), None);
                self.begin(State::Operating, Op::JobList);
            }
            AgentEvent::Attach(request) => {
                assert_eq!(attach_refusal(&request, &limits), None);
                self.begin(State::Starting, Op::Attach);
            }
            AgentEvent::Wait(request) => {
                assert_eq!(request_refusal(&request, &limits), None);
                self.begin(State::Starting, Op::Wait);
            }
            AgentEvent::Kill(kill) => {
                assert_eq!(kill_refusal(&kill, &limits), None);
                self.begin(State::Operating, Op::Simple);
            }
            AgentEvent::Remove(request) => {
                assert_eq!(request_refusal(&request, &limits), None);
                self.begin(State::Operating, Op::Simple);
            }
            other => panic!("{other:?} is no job event"),
        }
    }

    /// The driver's job calls: each allowed in one state of one operation only.
    fn job_step(&mut self, step: Step) {
        let (state, op) = (self.model.state, self.model.op);
        match step {
            Step::Detached { id, pid } => {
                let job = JobStarted { id, pid };
                let result = self.session.detached(job, self.now);
                if (state, op) == (State::Starting, Op::Job) {
                    assert_eq!(result, Ok(()));
                    self.model.owed_final = Some(AgentFrame::Detached(job));
                    self.enter_closing();
                } else {
                    assert_eq!(result, Err(SessionError::InvalidState));
                }
            }
            Step::EncodeJob { times, room, ended } => {
                for _ in 0..=times {
                    if !self.encode_job(room, ended) {
                        break;
                    }
                }
            }
            Step::Attached {
                stdin,
                running,
                from,
                lost,
                ago,
            } => {
                let header = AttachHeader {
                    id: 1,
                    stdout: Resume { from, lost },
                    stderr: Resume {
                        from: lost,
                        lost: from,
                    },
                    stdin,
                    running,
                };
                let job_started_at = self.now.saturating_sub(u64::from(ago));
                let result = self.session.attached(header, job_started_at, self.now);
                if (state, op) == (State::Starting, Op::Attach) {
                    assert_eq!(result, Ok(()));
                    self.model.state = State::Running;
                    self.model.job.attached_owed = Some(header);
                    self.model.stdin_piped = stdin;
                    self.model.started_at = job_started_at;
                    self.model.next_keepalive = self.keepalive_after(self.now);
                } else {
                    assert_eq!(result, Err(SessionError::InvalidState));
                }
            }
            Step::Waiting => {
                let result = self.session.waiting(self.now);
                if (state, op) == (State::Starting, Op::Wait) {
                    assert_eq!(result, Ok(()));
                    self.model.state = State::Running;
                    self.model.next_keepalive = self.keepalive_after(self.now);
                } else {
                    assert_eq!(result, Err(SessionError::InvalidState));
                }
            }
            Step::JobEnded { code, facts } => {
                let facts = facts.end_facts();
                let end = Termination {
                    status: ExitStatus::Code(code),
                    duration_us: u64::from(code) * 1000,
                    output_dropped: code & 1 == 1,
                    ending: facts.ending,
                    tree_kill: facts.tree_kill,
                    stdout: StreamRecord {
                        bytes: u64::from(code),
                        dropped: 0,
                    },
                    stderr: StreamRecord::default(),
                    pipes_held: facts.pipes_held,
                    oom_killed: facts.oom_killed,
                    peak_memory: facts.peak_memory,
                };
                let result = self.session.job_ended(end, self.now);
                let allowed = match op {
                    Op::Attach => state == State::Running,
                    Op::Wait => matches!(state, State::Starting | State::Running),
                    _ => false,
                };
                if allowed {
                    assert_eq!(result, Ok(()));
                    self.model.owed_final = Some(AgentFrame::Exited(end));
                    self.enter_closing();
                } else {
                    assert_eq!(result, Err(SessionError::InvalidState));
                }
            }
            other => panic!("{other:?} is no job step"),
        }
    }

    /// One record of a job listing; returns whether it was encoded.
    fn encode_job(&mut self, room: u8, ended: bool) -> bool {
        let before = self.sent.len();
        self.transmit(0);
        if self.sent.len() > before {
            return false;
        }
        let termination = ended.then(|| Termination {
            status: ExitStatus::Signal {
                number: 9,
                core_dumped: false,
            },
            duration_us: 7,
            output_dropped: false,
            ending: Ending::Cancelled,
            tree_kill: TreeKill::ProcessGroup,
            stdout: StreamRecord::default(),
            stderr: StreamRecord::default(),
            pipes_held: false,
            oom_killed: false,
            peak_memory: 0,
        });
        let record = JobRecord {
            id: self.model.job.items as u32 + 1,
            name: ended.then_some(Bytes(b"web")),
            argv: StrList::new(b"sleep\09\0"),
            uid: 1000,
            gid: 1000,
            pid: 40,
            state: if ended {
                JobState::Killed
            } else {
                JobState::Running
            },
            started: Timestamp { secs: 1, nanos: 2 },
            duration_us: 3,
            stdout_bytes: 4,
            stderr_bytes: 5,
            termination,
        };
        let room = if room == 0 {
            MAX_FRAME
        } else {
            usize::from(room)
        };
        let mut out = vec![0u8; room];
        let result = self.session.encode_job(&record, &mut out);
        let allowed = self.model.state == State::Operating
            && self.model.op == Op::JobList
            && self.model.job.items < MAX_JOBS;
        if !allowed {
            assert_eq!(result, Err(SessionError::InvalidState));
            return false;
        }
        let n = match result {
            Ok(n) => n,
            Err(err) => {
                // Nothing counted when nothing was encoded.
                assert_eq!(err, SessionError::BufferTooSmall);
                assert!(room < 128);
                return false;
            }
        };
        let (body, used) = split_frame(&out[..n], MAX_FRAME_BODY)
            .expect("within the limit")
            .expect("a whole frame");
        assert_eq!(used, n);
        assert_eq!(decode_agent_frame(body), Ok(AgentFrame::Job(record)));
        self.model.job.items += 1;
        self.sent.extend_from_slice(&out[..n]);
        self.check_stream();
        true
    }

    /// A job frame of the agent's stream.
    fn check_job_frame(&mut self, frame: AgentFrame<'_>) {
        assert!(self.stream.authenticated || self.secret.is_none());
        match frame {
            AgentFrame::Detached(job) => {
                assert_eq!(self.model.op, Op::Job);
                let owed = self.model.owed_final.take();
                assert_eq!(owed, Some(AgentFrame::Detached(job)));
                self.stream.final_seen = true;
                self.operation_over();
            }
            AgentFrame::Job(_) => {
                assert_eq!(self.model.op, Op::JobList);
                self.stream.job_records += 1;
                assert!(self.stream.job_records <= MAX_JOBS, "too many records");
            }
            AgentFrame::Attached(header) => {
                assert_eq!(self.model.op, Op::Attach);
                assert!(!self.stream.attached, "a second header");
                assert_eq!(Some(header), self.model.job.attached_owed.take());
                self.stream.attached = true;
            }
            other => panic!("{other:?} is no job frame"),
        }
    }
}

/// Protocol 5's keep-alive connections: after an operation's final frame the connection may
/// carry another.
impl Run<'_> {
    /// The final frame is encoded: the connection goes on if the operation ended so and the
    /// client's stream has not ended.
    fn operation_over(&mut self) {
        if self.model.state == State::Closing && self.model.keep && !self.model.input_closed {
            self.model.state = State::Ended;
        }
    }

    /// `next_operation`: only once the final frame went on a connection that stays; then every
    /// per-operation fact starts over, and the idle deadline runs.
    fn next_operation(&mut self) {
        let result = self.session.next_operation(self.now);
        if self.model.state != State::Ended {
            assert_eq!(result, Err(SessionError::InvalidState));
            return;
        }
        assert_eq!(result, Ok(()));
        let idle = u64::from(self.config.limits.idle_ms) * 1000;
        self.model = Model::new(State::AwaitRequest, Some(self.now.saturating_add(idle)));
        self.served = true;
        self.stream = StreamCheck {
            frames: self.stream.frames,
            hello: self.stream.hello,
            authenticated: self.stream.authenticated,
            ..StreamCheck::default()
        };
    }
}
