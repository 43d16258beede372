//! The agent's side of a conversation: open with a hello and a challenge, check the client's
//! proof, take a request, account stdin credit, and end it with exactly one final frame after
//! all output; then (protocol 5, `Limits::idle_ms`) take the next request on the same
//! connection, or close.

use crate::frame::{decode_client_frame, encode_agent_frame, frame_data_in_place, split_frame};
use crate::jobs::{
    AttachHeader, AttachRequest, JobQuery, JobRecord, JobRequest, JobStart, JobStarted, KillJob,
};
use crate::limits::HEADER_LEN;
use crate::limits::{MAC_LEN, MAX_FRAME_BODY, MAX_MESSAGE, NONCE_LEN, STDIN_WINDOW};
use crate::limits::{MAX_INFO_ITEMS, MAX_JOBS, MAX_RESEED, MAX_SIGNAL};
use crate::msg::{
    AgentFrame, AgentHello, AgentProof, Bounds, ClientFrame, DoneReport, Dropped, Ending,
    ErrorCode, ErrorFrame, ExitStatus, Limits, ListCheck, ListKind, Security, Started, StdinMode,
    Stream, StreamRecord, Termination, TreeKill, ValidExec, WindowSize, MAGIC,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use crate::ops::{
    FileHeader, FileSummary, GetRequest, PutRequest, ShutdownRequest, SkipReason, Skipped,
    Timestamp, DIGEST_LEN,
};
use crate::{ByteArray, Bytes, DataKind};

use super::auth::{Secret, Transcript};
use super::{truncate_str, FrameKind, Input, Micros, Phase, SessionError};

/// The agent's timing and output policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentConfig {
    /// The agent's own version, sent in its hello (at most [`crate::limits::MAX_VERSION_STRING`]).
    pub agent_version: &'static str,
    /// The limits announced in the hello and enforced.
    pub limits: Limits,
    /// How commands are bounded, announced in the hello (the driver enforces them).
    pub bounds: Bounds,
    /// How long a client may take to send its hello and its request.
    pub handshake_timeout: Micros,
    /// How long the final frame (an error, the termination record) may wait for a client that
    /// does not read.
    pub final_send_timeout: Micros,
    /// After the command exits, how long output from processes that inherited its pipes is
    /// still awaited before idle pipes are closed.
    pub drain_grace: Micros,
    /// After the command exits, how many more output bytes are forwarded before the rest is
    /// dropped (and the termination record says so): what a full pipe held, with room to spare,
    /// but never an endless stream.
    pub drain_limit: usize,
}

impl AgentConfig {
    /// ferry's policy.
    pub const DEFAULT: AgentConfig = AgentConfig {
        agent_version: "",
        limits: Limits::CURRENT,
        bounds: Bounds {
            max_runtime_s: 0,
            max_output: 0,
            max_file_size: 0,
            max_connections: 64,
            handshake_timeout_ms: 5_000,
            memory_max: 0,
            pids_max: 0,
            cgroup: false,
            default_uid: 65534,
            default_gid: 65534,
        },
        handshake_timeout: 5_000_000,
        final_send_timeout: 30_000_000,
        drain_grace: 200_000,
        drain_limit: 4 << 20,
    };
}

/// What authenticates one connection on the agent's side.
#[derive(Debug, Clone)]
pub struct AgentAuth {
    /// Fresh random bytes for this connection alone (`getrandom`): never reuse them.
    pub nonce: [u8; NONCE_LEN],
    /// The per-VM secret every client must prove; `None` for an insecure agent (announced in
    /// its hello).
    pub secret: Option<Secret>,
}

/// The refusal of every failed authentication, whatever failed: a client learns nothing about
/// which part of its proof was wrong.
const UNAUTHENTICATED: Refusal = Refusal::new(ErrorCode::Unauthenticated, "authentication failed");

/// Credit is returned in batches so a byte-at-a-time writer does not cost a frame per byte.
const CREDIT_BATCH: usize = STDIN_WINDOW / 4;

/// A failure the agent reports to the client in an error frame before closing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// What went wrong.
    pub code: ErrorCode,
    /// The errno behind it, 0 when none applies.
    pub errno: u32,
    /// For people; cut to [`MAX_MESSAGE`] bytes on the wire.
    pub message: &'static str,
}

impl Refusal {
    /// A refusal without an errno.
    pub const fn new(code: ErrorCode, message: &'static str) -> Refusal {
        Refusal {
            code,
            errno: 0,
            message,
        }
    }

    /// A refusal caused by the OS error `errno`.
    pub const fn os(code: ErrorCode, errno: u32, message: &'static str) -> Refusal {
        Refusal {
            code,
            errno,
            message,
        }
    }
}

/// What the client asked of the agent. Data borrows from the input.
#[derive(Debug, Clone, Copy)]
pub enum AgentEvent<'a> {
    /// The client's hello was accepted (a proof comes next, unless the agent is insecure).
    Hello,
    /// The client proved the secret; the agent's own proof is queued.
    Authenticated,
    /// End every command the agent runs; answer with [`AgentSession::done`] or
    /// [`AgentSession::refuse`].
    KillAll,
    /// Run this validated request; answer with [`AgentSession::started`] or
    /// [`AgentSession::refuse`].
    Exec(ValidExec<'a>),
    /// Bytes for the command's stdin, within credit. Report them with
    /// [`AgentSession::stdin_consumed`] once written (or discarded).
    Stdin(&'a [u8]),
    /// The client will send no more stdin: close the pipe once what is buffered is written.
    StdinEof,
    /// A piece of the request's argv or environment: append it to that list (the request that
    /// follows carries the last piece).
    ExecPart {
        /// Which list.
        list: ListKind,
        /// The bytes, to append as they are.
        data: &'a [u8],
    },
    /// Send this signal (1–64, checked) to the command's process group; ignore it once the
    /// command has ended.
    Signal(u8),
    /// Set the command's terminal to this size; ignore it without a terminal.
    Resize(WindowSize),
    /// End the command's tree: `SIGTERM` now, `SIGKILL` after `grace_ms` (`None`: the
    /// request's grace). A later cancel may only bring the `SIGKILL` closer.
    Cancel {
        /// Milliseconds to the `SIGKILL`.
        grace_ms: Option<u32>,
    },
    /// Write this file or unpack this tree (validated): check it and open the destination,
    /// then [`AgentSession::file_ready`] (or [`AgentSession::refuse`]). The content arrives as
    /// [`AgentEvent::Stdin`] within credit (it may come before `file_ready`: hold or write it,
    /// never before the checks passed), then [`AgentEvent::PutEnd`].
    Put(PutRequest<'a>),
    /// The put's content is complete and should have this SHA-256: check it, commit, and
    /// answer with [`AgentSession::file_done`] (or refuse).
    PutEnd([u8; DIGEST_LEN]),
    /// Read this file or tree (validated): [`AgentSession::file_ready`], the content with
    /// [`AgentSession::frame_file_data`], then [`AgentSession::file_done`].
    Get(GetRequest<'a>),
    /// Describe the guest: [`AgentSession::encode_info`] for the system, each mount and each
    /// interface, then [`AgentSession::done`] with their count.
    Info,
    /// Power off or reboot (validated): answer with [`AgentSession::done`], send it, then act.
    Shutdown(ShutdownRequest),
    /// Set the realtime clock to this (validated): [`AgentSession::clock_set`] with the clock
    /// as it was.
    TimeSync(Timestamp),
    /// Add these bytes (1 to [`MAX_RESEED`]) to the entropy pool: [`AgentSession::done`].
    Reseed(&'a [u8]),
    /// The exec that follows starts a detached job (keep the name: the event borrows the
    /// input). Its [`AgentEvent::Exec`] comes next with [`AgentSession::is_job`]; answer it
    /// with [`AgentSession::detached`] or [`AgentSession::refuse`].
    StartJob(JobStart<'a>),
    /// List the jobs the request's user may see: [`AgentSession::encode_job`] each, then
    /// [`AgentSession::done`].
    Jobs(JobQuery<'a>),
    /// Attach to a job: [`AgentSession::attached`] (or refuse), then its output with
    /// [`AgentSession::frame_output`] and [`AgentSession::encode_output_dropped`], stdin and
    /// controls as for an exec, and last [`AgentSession::job_ended`] or (not following, the
    /// retained output sent) [`AgentSession::done`].
    Attach(AttachRequest<'a>),
    /// Wait for a job: [`AgentSession::waiting`] while it runs (keepalives flow), then
    /// [`AgentSession::job_ended`]; or refuse.
    Wait(JobRequest<'a>),
    /// Signal a job's tree: [`AgentSession::done`] or refuse.
    Kill(KillJob<'a>),
    /// Forget an ended job: [`AgentSession::done`] or refuse.
    Remove(JobRequest<'a>),
}

/// What only the driver knows about a command's end, for its termination record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndFacts {
    /// What ended it.
    pub ending: Ending,
    /// How its tree was killed, if it was.
    pub tree_kill: TreeKill,
    /// Other processes held its output pipes when the drain stopped waiting.
    pub pipes_held: bool,
    /// The OOM killer hit its tree.
    pub oom_killed: bool,
    /// Its tree's peak memory in bytes (0: unknown).
    pub peak_memory: u64,
}

impl EndFacts {
    /// A command that ended by itself, nothing killed, nothing known about memory.
    pub const EXITED: EndFacts = EndFacts {
        ending: Ending::Exited,
        tree_kill: TreeKill::None,
        pipes_held: false,
        oom_killed: false,
        peak_memory: 0,
    };
}

/// How the driver should treat the command's output pipes now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputPhase {
    /// The command runs: read the pipes when they are readable.
    Open,
    /// The command exited, its grace period runs: keep reading while readable.
    Grace,
    /// Past the grace period: read what is there, close a pipe as soon as it is idle.
    Drain,
    /// Past the drain limit: close the pipes; the termination record says output was dropped.
    Closed,
}

/// Which operation a connection carries.
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
    JobList,
    Attach,
    Wait,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitHello,
    /// The client's hello is in; its proof must come next.
    AwaitAuth,
    AwaitRequest,
    /// An operation without output (kill-all) was handed to the driver; `done` or `refuse`.
    Operating,
    /// The request was handed to the driver; `started` or `refuse` comes next.
    Starting,
    Running,
    /// The final frame is queued or being sent.
    Closing,
    /// The operation's final frame is encoded and the connection stays open (protocol 5): the
    /// driver sends it, releases the operation's resources, then calls
    /// [`AgentSession::next_operation`]. Input waits in the driver's buffer meanwhile.
    Ended,
    /// Nothing more to do (the client left, or the final send timed out).
    Closed,
}

/// The agent's protocol state: no buffers, no I/O, no clock.
///
/// ```text
///  (hello queued) AwaitHello ─Hello─► AwaitAuth ─Auth─► AwaitRequest ─Exec─► Starting ─started─► Running
///        (insecure agent: Hello ──────────────────────►)    └─KillAll─► Operating ─done─► Closing
///  Running ─child_exited…finish─► Closing;  any breach, refuse, handshake timeout ─► Closing
///  Closing ─final frame encoded─► Ended ─next_operation─► AwaitRequest (idle deadline) ─► …
///     (idle_ms 0, a breach, the client's EOF: Closing ─► closed; the idle deadline: closed, silently)
/// ```
#[derive(Debug, Clone)]
pub struct AgentSession {
    config: AgentConfig,
    state: State,
    /// Handshake deadline before the request; final-send deadline while closing.
    deadline: Option<Micros>,
    nonce: [u8; NONCE_LEN],
    secret: Option<Secret>,
    transcript: Transcript,
    // Queued frames, sent by `poll_transmit` in this order.
    hello: bool,
    authenticated: Option<[u8; MAC_LEN]>,
    error: Option<Refusal>,
    /// The code of the error frame the conversation ended with (kept for the driver's audit).
    refused: Option<ErrorCode>,
    started: Option<u32>,
    exited: Option<Termination>,
    done: Option<DoneReport>,
    stdin_piped: bool,
    stdin_eof: bool,
    /// Stdin bytes received and not yet credited back.
    in_window: usize,
    /// Of those, bytes consumed (written or discarded) and owed back as credit.
    owed: usize,
    started_at: Micros,
    exit: Option<(ExitStatus, Micros)>,
    /// The end of the post-exit grace period was handled: that deadline is spent.
    grace_over: bool,
    drained: usize,
    dropped: bool,
    /// The pieces of a request's lists received so far.
    argv_check: ListCheck,
    env_check: ListCheck,
    /// `ExecPart` pieces came: only their exec request may follow.
    parts_seen: bool,
    /// The client half-closed its side: no more input, the command runs on.
    input_closed: bool,
    /// When the next keepalive is due, while a command runs.
    next_keepalive: Option<Micros>,
    keepalive_queued: bool,
    stdout: StreamRecord,
    stderr: StreamRecord,
    op: Op,
    file_ready: Option<FileHeader>,
    file_done: Option<FileSummary>,
    clock_set: Option<Timestamp>,
    /// A put's end (its digest) arrived.
    put_ended: bool,
    /// Info frames encoded so far.
    info_items: usize,
    /// A `StartJob` came: only its exec request may follow.
    job_start: bool,
    detached: Option<JobStarted>,
    attached: Option<AttachHeader>,
    /// Job records encoded so far.
    job_items: usize,
    /// The final frame leaves the connection open for another operation (protocol 5): a
    /// success, or a request refused before it started, with `idle_ms` > 0.
    keep: bool,
    /// An operation was served: an expired deadline while awaiting a request is the idle
    /// deadline (closed silently), not the handshake's.
    served: bool,
}

impl AgentSession {
    /// A session for a connection just accepted: its hello (with `auth.nonce`) is queued, and
    /// the handshake deadline starts at `now`.
    pub fn new(config: AgentConfig, now: Micros, auth: AgentAuth) -> AgentSession {
        let mut session = AgentSession {
            state: State::AwaitHello,
            deadline: Some(now.saturating_add(config.handshake_timeout)),
            nonce: auth.nonce,
            secret: auth.secret,
            hello: true,
            ..AgentSession::fresh(config, now)
        };
        // The transcript starts with our hello, hashed now, so the order of hashing never
        // depends on when the driver sends it. It always fits: its strings are bounded.
        let mut body = [0u8; AGENT_HELLO_MAX];
        if let Ok(n) = encode_agent_frame(&AgentFrame::Hello(session.agent_hello()), &mut body) {
            session
                .transcript
                .update(body.get(HEADER_LEN..n).unwrap_or(&[]));
        }
        session
    }

    /// A session with every per-operation field as an operation begins; the connection's own
    /// fields (state, deadline, nonce, secret, transcript, `served`) are set by the caller.
    ///
    /// NOTE: every field of the session gets its value for a new operation here, and
    /// [`AgentSession::next_operation`] starts each operation from it: a new per-operation
    /// field is reset by being given its initial value here; a field that must outlive an
    /// operation is carried over in `next_operation`, by name.
    fn fresh(config: AgentConfig, now: Micros) -> AgentSession {
        AgentSession {
            config,
            state: State::AwaitRequest,
            deadline: None,
            nonce: [0; NONCE_LEN],
            secret: None,
            transcript: Transcript::default(),
            hello: false,
            authenticated: None,
            error: None,
            refused: None,
            started: None,
            exited: None,
            done: None,
            stdin_piped: false,
            stdin_eof: false,
            in_window: 0,
            owed: 0,
            started_at: now,
            exit: None,
            grace_over: false,
            drained: 0,
            dropped: false,
            argv_check: ListCheck::new(ListKind::Argv, &config.limits),
            env_check: ListCheck::new(ListKind::Env, &config.limits),
            parts_seen: false,
            input_closed: false,
            next_keepalive: None,
            keepalive_queued: false,
            stdout: StreamRecord::default(),
            stderr: StreamRecord::default(),
            op: Op::None,
            file_ready: None,
            file_done: None,
            clock_set: None,
            put_ended: false,
            info_items: 0,
            job_start: false,
            detached: None,
            attached: None,
            job_items: 0,
            keep: false,
            served: false,
        }
    }

    /// Whether the operation's final frame is encoded and the connection may carry another
    /// (protocol 5): send what the outbox holds, release everything the operation held, then
    /// call [`AgentSession::next_operation`].
    pub fn can_continue(&self) -> bool {
        self.state == State::Ended
    }

    /// Begins the wait for the next request on this connection, at `now`: every
    /// per-operation field is reset, and the connection closes (silently: no error frame, a
    /// request that crossed it would read one as its answer) unless a request begins within
    /// `idle_ms`. Only after [`AgentSession::can_continue`].
    pub fn next_operation(&mut self, now: Micros) -> Result<(), SessionError> {
        if self.state != State::Ended {
            return Err(SessionError::InvalidState);
        }
        let idle = u64::from(self.config.limits.idle_ms).saturating_mul(1000);
        let fresh = AgentSession::fresh(self.config, now);
        *self = AgentSession {
            state: State::AwaitRequest,
            deadline: Some(now.saturating_add(idle)),
            nonce: self.nonce,
            secret: self.secret.take(),
            transcript: core::mem::take(&mut self.transcript),
            served: true,
            ..fresh
        };
        Ok(())
    }

    /// Whether clients must prove the secret.
    pub fn security(&self) -> Security {
        if self.secret.is_some() {
            Security::Authenticated
        } else {
            Security::Insecure
        }
    }

    /// Where the conversation stands.
    pub fn phase(&self) -> Phase {
        match self.state {
            State::AwaitHello | State::AwaitAuth => Phase::Hello,
            State::AwaitRequest => Phase::Idle,
            State::Starting | State::Operating => Phase::Starting,
            State::Running => Phase::Running,
            State::Closing | State::Ended | State::Closed => Phase::Done,
        }
    }

    /// Whether the connection is ending: send what [`AgentSession::poll_transmit`] gives, then
    /// close. Client input is ignored from here on.
    pub fn is_closing(&self) -> bool {
        matches!(self.state, State::Closing | State::Closed)
    }

    /// Whether nothing is left to send: close now.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed || (self.state == State::Closing && !self.has_queued())
    }

    /// Whether frames are queued for [`AgentSession::poll_transmit`].
    pub fn has_queued(&self) -> bool {
        self.hello
            || self.authenticated.is_some()
            || self.error.is_some()
            || self.done.is_some()
            || self.started.is_some()
            || self.file_ready.is_some()
            || self.file_done.is_some()
            || self.clock_set.is_some()
            || self.detached.is_some()
            || self.attached.is_some()
            || self.exited.is_some()
            || self.keepalive_queued
            || self.credit_due()
    }

    /// Whether the client half-closed its side ([`AgentSession::handle_eof`] while the
    /// command runs): read nothing more from it.
    pub fn input_closed(&self) -> bool {
        self.input_closed
    }

    /// Whether the command was given a stdin pipe that the client has not closed.
    pub fn stdin_open(&self) -> bool {
        self.stdin_piped && !self.stdin_eof
    }

    /// When the driver must call [`AgentSession::handle_timeout`] at the latest.
    pub fn poll_timeout(&self) -> Option<Micros> {
        let grace = match self.exit {
            Some((_, ended)) if !self.grace_over => {
                Some(ended.saturating_add(self.config.drain_grace))
            }
            _ => None,
        };
        match self.state {
            State::Running => match (grace, self.next_keepalive) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            State::Starting | State::Operating | State::Closed => None,
            // Ended: the final frame's send deadline still holds until `next_operation`.
            _ => self.deadline,
        }
    }

    /// Checks the deadlines against `now`. An expired handshake queues an error frame for the
    /// client; an expired final send closes the session.
    pub fn handle_timeout(&mut self, now: Micros) -> Result<(), SessionError> {
        let expired = self.deadline.is_some_and(|deadline| now >= deadline);
        match self.state {
            // The idle deadline after an operation: closed without a word.
            State::AwaitRequest if expired && self.served => {
                self.state = State::Closed;
                Err(SessionError::TimedOut { phase: Phase::Idle })
            }
            State::AwaitHello | State::AwaitAuth | State::AwaitRequest if expired => {
                let phase = self.phase();
                let refusal = Refusal::new(ErrorCode::ProtocolViolation, "handshake timed out");
                self.close_with(refusal, now);
                Err(SessionError::TimedOut { phase })
            }
            State::Closing | State::Ended if expired => {
                self.state = State::Closed;
                Err(SessionError::TimedOut { phase: Phase::Done })
            }
            // The grace period's end needs nothing but `output_phase`; once handled, its
            // deadline is no longer reported (a driver polling with it would spin).
            State::Running => {
                if let Some((_, ended)) = self.exit {
                    self.grace_over |= now >= ended.saturating_add(self.config.drain_grace);
                }
                if self.next_keepalive.is_some_and(|due| now >= due) {
                    self.keepalive_queued = true;
                    self.next_keepalive = self.keepalive_after(now);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Parses at most one frame from the front of `input`. A breach of the protocol queues an
    /// error frame for the client and is returned: kill the command, send, close.
    pub fn handle_input<'a>(
        &mut self,
        input: &'a [u8],
        now: Micros,
    ) -> Result<Input<AgentEvent<'a>>, SessionError> {
        if self.state == State::Ended {
            // The next request waits until the driver has released the last one.
            return Ok(Input::NEED_MORE);
        }
        let split = match split_frame(input, MAX_FRAME_BODY) {
            Ok(split) => split,
            Err(_) if self.state == State::AwaitAuth => {
                self.close_with(UNAUTHENTICATED, now);
                return Err(SessionError::Unauthenticated);
            }
            Err(err) if !self.is_closing() => {
                let refusal = Refusal::new(ErrorCode::FrameTooLarge, "frame exceeds the limit");
                self.close_with(refusal, now);
                return Err(err.into());
            }
            // Closing: nothing more is read, so nothing more can be wrong.
            Err(_) => return Ok(Input::NEED_MORE),
        };
        let Some((body, consumed)) = split else {
            return Ok(Input::NEED_MORE);
        };
        if self.is_closing() {
            return Ok(Input {
                consumed,
                event: None,
            });
        }
        let event = match decode_client_frame(body) {
            Ok(frame) => self.handle_frame(frame, body),
            // Before the proof, anything but a right one is refused alike.
            Err(_) if self.state == State::AwaitAuth => {
                Err((UNAUTHENTICATED, SessionError::Unauthenticated))
            }
            Err(_) => Err((
                Refusal::new(ErrorCode::Malformed, "bad frame"),
                SessionError::Malformed,
            )),
        };
        match event {
            Ok(event) => Ok(Input {
                consumed,
                event: Some(event),
            }),
            Err((refusal, err)) => {
                self.close_with(refusal, now);
                Err(err)
            }
        }
    }

    fn handle_frame<'a>(
        &mut self,
        frame: ClientFrame<'a>,
        body: &[u8],
    ) -> Result<AgentEvent<'a>, (Refusal, SessionError)> {
        let unexpected = |message| {
            (
                Refusal::new(ErrorCode::ProtocolViolation, message),
                SessionError::Unexpected {
                    frame: FrameKind::of_client(&frame),
                    phase: self.phase(),
                },
            )
        };
        match (self.state, frame) {
            (State::AwaitHello, ClientFrame::Hello(hello)) => {
                let Some(_version) = hello.negotiate() else {
                    let refusal = Refusal::new(ErrorCode::UnsupportedVersion, "no common version");
                    let err = if hello.magic == MAGIC {
                        SessionError::UnsupportedVersion { chosen: 0 }
                    } else {
                        SessionError::NotFerry
                    };
                    return Err((refusal, err));
                };
                self.transcript.update(body);
                self.state = if self.secret.is_some() {
                    State::AwaitAuth
                } else {
                    State::AwaitRequest
                };
                Ok(AgentEvent::Hello)
            }
            (State::AwaitHello, _) => Err(unexpected("expected hello")),
            (State::AwaitAuth, ClientFrame::Auth(proof)) => {
                let transcript = self.transcript.digest();
                let proven = self.secret.as_ref().is_some_and(|secret| {
                    secret.verify_client_proof(&transcript, &proof.nonce.0, proof.mac.0)
                });
                let secret = self.secret.as_ref().filter(|_| proven);
                let Some(secret) = secret else {
                    return Err((UNAUTHENTICATED, SessionError::Unauthenticated));
                };
                self.authenticated = Some(secret.agent_proof(&transcript, &proof.nonce.0));
                self.state = State::AwaitRequest;
                Ok(AgentEvent::Authenticated)
            }
            // A request, a second hello, garbage: before the proof, all alike.
            (State::AwaitAuth, _) => Err((UNAUTHENTICATED, SessionError::Unauthenticated)),
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
            ) if self.parts_seen || self.job_start => {
                Err(unexpected("expected the exec request its pieces belong to"))
            }
            (State::AwaitRequest, ClientFrame::ExecPart(_)) if self.job_start => Err(
                invalid_message("a job's request must fit in one exec frame"),
            ),
            (State::AwaitRequest, ClientFrame::StartJob(start)) => {
                start.validate().map_err(invalid_request)?;
                self.job_start = true;
                Ok(AgentEvent::StartJob(start))
            }
            (State::AwaitRequest, ClientFrame::Jobs(query)) => {
                query
                    .validate_within(&self.config.limits)
                    .map_err(invalid_request)?;
                self.begin(State::Operating, Op::JobList);
                Ok(AgentEvent::Jobs(query))
            }
            (State::AwaitRequest, ClientFrame::Attach(request)) => {
                request
                    .validate_within(&self.config.limits)
                    .map_err(invalid_request)?;
                self.begin(State::Starting, Op::Attach);
                Ok(AgentEvent::Attach(request))
            }
            (State::AwaitRequest, ClientFrame::Wait(request)) => {
                request
                    .validate_within(&self.config.limits)
                    .map_err(invalid_request)?;
                self.begin(State::Starting, Op::Wait);
                Ok(AgentEvent::Wait(request))
            }
            (State::AwaitRequest, ClientFrame::Kill(kill)) => {
                kill.validate_within(&self.config.limits)
                    .map_err(invalid_request)?;
                self.begin(State::Operating, Op::Simple);
                Ok(AgentEvent::Kill(kill))
            }
            (State::AwaitRequest, ClientFrame::Remove(request)) => {
                request
                    .validate_within(&self.config.limits)
                    .map_err(invalid_request)?;
                self.begin(State::Operating, Op::Simple);
                Ok(AgentEvent::Remove(request))
            }
            (State::AwaitRequest, ClientFrame::KillAll) => {
                self.begin(State::Operating, Op::Simple);
                Ok(AgentEvent::KillAll)
            }
            (State::AwaitRequest, ClientFrame::Put(put)) => {
                put.validate_within(&self.config.limits)
                    .map_err(invalid_request)?;
                self.begin(State::Starting, Op::Put);
                self.stdin_piped = true;
                Ok(AgentEvent::Put(put))
            }
            (State::AwaitRequest, ClientFrame::Get(get)) => {
                get.validate_within(&self.config.limits)
                    .map_err(invalid_request)?;
                self.begin(State::Starting, Op::Get);
                Ok(AgentEvent::Get(get))
            }
            (State::AwaitRequest, ClientFrame::Info) => {
                self.begin(State::Operating, Op::Info);
                Ok(AgentEvent::Info)
            }
            (State::AwaitRequest, ClientFrame::Shutdown(request)) => {
                request.validate().map_err(invalid_request)?;
                self.begin(State::Operating, Op::Simple);
                Ok(AgentEvent::Shutdown(request))
            }
            (State::AwaitRequest, ClientFrame::TimeSync(time)) => {
                if !time.is_valid() {
                    return Err(invalid_message("nanoseconds out of range"));
                }
                self.begin(State::Operating, Op::Clock);
                Ok(AgentEvent::TimeSync(time))
            }
            (State::AwaitRequest, ClientFrame::Reseed(Bytes(bytes))) => {
                if bytes.is_empty() || bytes.len() > MAX_RESEED {
                    return Err(invalid_message("reseed needs 1 to 512 bytes"));
                }
                self.begin(State::Operating, Op::Simple);
                Ok(AgentEvent::Reseed(bytes))
            }
            (State::AwaitRequest, ClientFrame::ExecPart(part)) => {
                self.parts_seen = true;
                let check = match part.list {
                    ListKind::Argv => &mut self.argv_check,
                    ListKind::Env => &mut self.env_check,
                };
                check.feed(part.data.0).map_err(invalid_request)?;
                Ok(AgentEvent::ExecPart {
                    list: part.list,
                    data: part.data.0,
                })
            }
            (State::AwaitRequest, ClientFrame::Exec(exec)) => {
                let valid = exec
                    .validate_after(&self.config.limits, self.argv_check, self.env_check)
                    .map_err(invalid_request)?;
                if self.job_start {
                    // The job's stdin is for whoever attaches to it, not its starter.
                    self.begin(State::Starting, Op::Job);
                } else {
                    self.begin(State::Starting, Op::Exec);
                    self.stdin_piped = exec.stdin == StdinMode::Pipe;
                }
                Ok(AgentEvent::Exec(valid))
            }
            (State::AwaitRequest, _) => Err(unexpected("expected a request")),
            (State::Starting | State::Running, ClientFrame::Stdin(data)) if self.stdin_open() => {
                if self.in_window + data.0.len() > self.window() {
                    return Err((
                        Refusal::new(ErrorCode::ProtocolViolation, "stdin beyond credit"),
                        SessionError::CreditExceeded,
                    ));
                }
                self.in_window += data.0.len();
                Ok(AgentEvent::Stdin(data.0))
            }
            (State::Starting | State::Running, ClientFrame::StdinEof)
                if self.stdin_open() && matches!(self.op, Op::Exec | Op::Attach) =>
            {
                self.stdin_eof = true;
                Ok(AgentEvent::StdinEof)
            }
            (State::Starting | State::Running, ClientFrame::PutEnd(digest))
                if self.stdin_open() && self.op == Op::Put =>
            {
                self.stdin_eof = true;
                self.put_ended = true;
                Ok(AgentEvent::PutEnd(digest.0))
            }
            // Controls are for commands alone (a job's, through an attachment).
            (State::Starting | State::Running, _) if !matches!(self.op, Op::Exec | Op::Attach) => {
                Err(unexpected("unexpected frame"))
            }
            (State::Starting | State::Running, ClientFrame::Signal(number)) => {
                if number == 0 || number > MAX_SIGNAL {
                    let message = "no such signal";
                    return Err((
                        Refusal::new(ErrorCode::InvalidRequest, message),
                        SessionError::InvalidRequest { message },
                    ));
                }
                Ok(AgentEvent::Signal(number))
            }
            (State::Starting | State::Running, ClientFrame::Resize(size)) => {
                Ok(AgentEvent::Resize(size))
            }
            (State::Starting | State::Running, ClientFrame::Cancel(cancel)) => {
                Ok(AgentEvent::Cancel {
                    grace_ms: cancel.grace_ms,
                })
            }
            _ => Err(unexpected("unexpected frame")),
        }
    }

    fn begin(&mut self, state: State, op: Op) {
        self.state = state;
        self.op = op;
        self.deadline = None;
    }

    fn keepalive_after(&self, now: Micros) -> Option<Micros> {
        let interval = u64::from(self.config.limits.keepalive_ms).saturating_mul(1000);
        (interval > 0).then(|| now.saturating_add(interval))
    }

    fn window(&self) -> usize {
        (self.config.limits.stdin_window as usize).min(STDIN_WINDOW)
    }

    /// The client's stream ended. Before a request (a hello alone is a health check) or while
    /// closing, the conversation is over. While an operation runs it means "no more input", as
    /// `shutdown(SHUT_WR)` does (`nc -N`): stdin is closed, nothing more is read from the
    /// client, and the command runs on; its output and its record are still sent. A client that
    /// is really gone shows as a failed send (a keepalive at the latest), which is the driver's
    /// to treat as a disconnect.
    ///
    /// A put's content is only complete with its digest: a client that closes before it has
    /// abandoned the put ([`SessionError::Disconnected`]; nothing is written, nothing is sent).
    pub fn handle_eof(&mut self) -> Result<(), SessionError> {
        if self.op == Op::Put && !self.put_ended && !self.is_closing() && self.state != State::Ended
        {
            let phase = self.phase();
            self.state = State::Closed;
            self.clear_queue();
            return Err(SessionError::Disconnected {
                phase,
                mid_frame: false,
            });
        }
        match self.state {
            // What is owed (the record, or the final frame already queued) still goes out,
            // within the final-send deadline.
            State::Starting | State::Operating | State::Running | State::Closing => {
                self.input_closed = true;
                self.stdin_eof = true;
                Ok(())
            }
            State::AwaitHello
            | State::AwaitAuth
            | State::AwaitRequest
            | State::Ended
            | State::Closed => {
                self.state = State::Closed;
                Ok(())
            }
        }
    }

    /// The transfer asked for by [`AgentEvent::Put`] or [`AgentEvent::Get`] was checked and
    /// begins: queues [`AgentFrame::FileReady`]. A put's content is credited from here on.
    pub fn file_ready(&mut self, header: FileHeader, now: Micros) -> Result<(), SessionError> {
        if self.state != State::Starting || !matches!(self.op, Op::Put | Op::Get) {
            return Err(SessionError::InvalidState);
        }
        self.state = State::Running;
        self.file_ready = Some(header);
        self.started_at = now;
        self.next_keepalive = self.keepalive_after(now);
        Ok(())
    }

    /// Frames `len` bytes of a get's content that the driver read to `buf[DATA_HEADROOM..]`,
    /// as [`AgentSession::frame_output`] does; returns where the frame starts.
    pub fn frame_file_data(&mut self, buf: &mut [u8], len: usize) -> Result<usize, SessionError> {
        if self.state != State::Running || self.op != Op::Get {
            return Err(SessionError::InvalidState);
        }
        Ok(frame_data_in_place(buf, DataKind::FileData, len, 0)?)
    }

    /// Encodes [`AgentFrame::Skipped`] into `out` (a tree transfer left `path` out); the driver
    /// sends it in order with the content. Returns the bytes written.
    pub fn encode_skipped(
        &mut self,
        path: &[u8],
        reason: SkipReason,
        out: &mut [u8],
    ) -> Result<usize, SessionError> {
        if self.state != State::Running || !matches!(self.op, Op::Put | Op::Get) {
            return Err(SessionError::InvalidState);
        }
        let path = path
            .get(..path.len().min(crate::limits::MAX_PATH))
            .unwrap_or(&[]);
        let frame = AgentFrame::Skipped(Skipped {
            path: Bytes(path),
            reason,
        });
        Ok(encode_agent_frame(&frame, out)?)
    }

    /// The transfer is complete (a put: committed, after its [`AgentEvent::PutEnd`]): queues
    /// [`AgentFrame::FileDone`], the last frame.
    pub fn file_done(&mut self, summary: FileSummary, now: Micros) -> Result<(), SessionError> {
        let complete = match self.op {
            Op::Put => self.put_ended,
            Op::Get => true,
            _ => false,
        };
        if self.state != State::Running || !complete {
            return Err(SessionError::InvalidState);
        }
        self.file_done = Some(summary);
        self.enter_closing(now, true);
        Ok(())
    }

    /// Encodes one frame of an info operation into `out`: [`AgentFrame::SystemInfo`] first,
    /// then [`AgentFrame::Mount`] and [`AgentFrame::Interface`] frames (at most
    /// [`MAX_INFO_ITEMS`]); any other frame is refused. Returns the bytes written.
    pub fn encode_info(
        &mut self,
        frame: &AgentFrame<'_>,
        out: &mut [u8],
    ) -> Result<usize, SessionError> {
        let first = self.info_items == 0;
        let allowed = match frame {
            AgentFrame::SystemInfo(_) => first,
            AgentFrame::Mount(_) | AgentFrame::Interface(_) => {
                !first && self.info_items <= MAX_INFO_ITEMS
            }
            _ => false,
        };
        if self.state != State::Operating || self.op != Op::Info || !allowed {
            return Err(SessionError::InvalidState);
        }
        let n = encode_agent_frame(frame, out)?;
        self.info_items += 1;
        Ok(n)
    }

    /// The clock was set as [`AgentEvent::TimeSync`] asked; `previous` is what it said before.
    /// Queues [`AgentFrame::ClockSet`], the last frame.
    pub fn clock_set(&mut self, previous: Timestamp, now: Micros) -> Result<(), SessionError> {
        if self.state != State::Operating || self.op != Op::Clock {
            return Err(SessionError::InvalidState);
        }
        self.clock_set = Some(previous);
        self.enter_closing(now, true);
        Ok(())
    }

    /// Whether the exec of [`AgentEvent::Exec`] starts a detached job ([`AgentEvent::StartJob`]
    /// came first): answer with [`AgentSession::detached`].
    pub fn is_job(&self) -> bool {
        self.op == Op::Job
    }

    /// The job's command started and the job is registered: queues [`AgentFrame::Detached`],
    /// the last frame of the job's start.
    pub fn detached(&mut self, job: JobStarted, now: Micros) -> Result<(), SessionError> {
        if self.state != State::Starting || self.op != Op::Job {
            return Err(SessionError::InvalidState);
        }
        self.detached = Some(job);
        self.enter_closing(now, true);
        Ok(())
    }

    /// Encodes one [`AgentFrame::Job`] of a listing into `out` (at most [`MAX_JOBS`]); returns
    /// the bytes written. [`AgentSession::done`] ends the listing.
    pub fn encode_job(
        &mut self,
        job: &JobRecord<'_>,
        out: &mut [u8],
    ) -> Result<usize, SessionError> {
        if self.state != State::Operating || self.op != Op::JobList || self.job_items >= MAX_JOBS {
            return Err(SessionError::InvalidState);
        }
        let n = encode_agent_frame(&AgentFrame::Job(*job), out)?;
        self.job_items += 1;
        Ok(n)
    }

    /// The attachment begins: queues [`AgentFrame::Attached`]. `job_started_at` is when the
    /// job started on the driver's clock (output carries its time since then); stdin is
    /// credited from here on when `header.stdin`.
    pub fn attached(
        &mut self,
        header: AttachHeader,
        job_started_at: Micros,
        now: Micros,
    ) -> Result<(), SessionError> {
        if self.state != State::Starting || self.op != Op::Attach {
            return Err(SessionError::InvalidState);
        }
        self.state = State::Running;
        self.attached = Some(header);
        self.stdin_piped = header.stdin;
        self.started_at = job_started_at;
        self.next_keepalive = self.keepalive_after(now);
        Ok(())
    }

    /// The job waited for still runs: keepalives flow until [`AgentSession::job_ended`].
    pub fn waiting(&mut self, now: Micros) -> Result<(), SessionError> {
        if self.state != State::Starting || self.op != Op::Wait {
            return Err(SessionError::InvalidState);
        }
        self.state = State::Running;
        self.next_keepalive = self.keepalive_after(now);
        Ok(())
    }

    /// The job attached to (after its output) or waited for has ended: queues its
    /// [`AgentFrame::Exited`], the last frame.
    pub fn job_ended(&mut self, end: Termination, now: Micros) -> Result<(), SessionError> {
        let allowed = match self.op {
            Op::Attach => self.state == State::Running,
            Op::Wait => matches!(self.state, State::Starting | State::Running),
            _ => false,
        };
        if !allowed {
            return Err(SessionError::InvalidState);
        }
        self.exited = Some(end);
        self.enter_closing(now, true);
        Ok(())
    }

    /// The requested command was executed as `pid`; `started_at` is when spawning began (the
    /// termination record's duration counts from it).
    pub fn started(&mut self, pid: u32, started_at: Micros) -> Result<(), SessionError> {
        if self.state != State::Starting || self.op != Op::Exec {
            return Err(SessionError::InvalidState);
        }
        self.state = State::Running;
        self.started = Some(pid);
        self.started_at = started_at;
        self.next_keepalive = self.keepalive_after(started_at);
        Ok(())
    }

    /// Ends the conversation with an error frame (a request that could not run, a failure in the
    /// agent). Not after the final frame is queued.
    pub fn refuse(&mut self, refusal: Refusal, now: Micros) -> Result<(), SessionError> {
        if self.is_closing() || self.state == State::Ended {
            return Err(SessionError::InvalidState);
        }
        // A request refused before it started leaves the connection open; a failure while it
        // runs ends it. A wait sends nothing after its request, so nothing of it can still be
        // on its way: its refusal (the job is unknown, the supervisor went away) keeps the
        // connection whenever it comes, as the client sees it (its wait never "starts").
        let before_start =
            matches!(self.state, State::Starting | State::Operating) || self.op == Op::Wait;
        self.close_with(refusal, now);
        self.keep = before_start && self.config.limits.idle_ms > 0;
        Ok(())
    }

    /// The operation asked for by [`AgentEvent::KillAll`] is done; `count` processes were
    /// affected (0 when unknown). Queues the last frame.
    /// A job listing's count is the records encoded, whatever `count` says; an attachment that
    /// does not follow ends with it (count 0) once the retained output is sent.
    pub fn done(&mut self, count: u32, now: Micros) -> Result<(), SessionError> {
        let info_complete = self.op == Op::Info && self.info_items > 0;
        let (allowed, count) = match (self.state, self.op) {
            (State::Operating, Op::Simple) => (true, count),
            (State::Operating, Op::Info) => (info_complete, count),
            (State::Operating, Op::JobList) => (true, self.job_items as u32),
            (State::Running, Op::Attach) => (true, 0),
            _ => (false, count),
        };
        if !allowed {
            return Err(SessionError::InvalidState);
        }
        self.done = Some(DoneReport { count });
        self.enter_closing(now, true);
        Ok(())
    }

    /// How the command ended, once it has.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.exit.map(|(status, _)| status)
    }

    /// The code of the error frame the conversation ended with, if it ended with one.
    pub fn refusal_code(&self) -> Option<ErrorCode> {
        self.refused
    }

    fn close_with(&mut self, refusal: Refusal, now: Micros) {
        self.error = Some(refusal);
        self.refused = Some(refusal.code);
        // Nothing else is owed once the conversation failed, but a proof already earned is
        // still sent (it comes before the error): the client can then tell a refusal from
        // this agent from an impostor's, whatever the driver's schedule was.
        self.clear_queue();
        self.enter_closing(now, false);
    }

    /// Nothing but a proof already earned is owed once the conversation failed (or a put was
    /// abandoned): not even a keepalive that fell due.
    fn clear_queue(&mut self) {
        self.keepalive_queued = false;
        self.started = None;
        self.file_ready = None;
        self.file_done = None;
        self.clock_set = None;
        self.detached = None;
        self.attached = None;
        self.in_window = 0;
        self.owed = 0;
    }

    /// The final frame is queued; with `reusable`, the connection may carry another operation
    /// once it is sent (when the agent allows that at all).
    fn enter_closing(&mut self, now: Micros, reusable: bool) {
        self.state = State::Closing;
        self.keep = reusable && self.config.limits.idle_ms > 0;
        self.keepalive_queued = false;
        self.next_keepalive = None;
        self.deadline = Some(now.saturating_add(self.config.final_send_timeout));
    }

    /// `n` stdin bytes were written to the command (or discarded because nobody reads them):
    /// they are owed back to the client as credit.
    pub fn stdin_consumed(&mut self, n: usize) {
        self.owed = (self.owed + n).min(self.in_window);
    }

    /// The command exited at `now`. Output still flows until the driver calls
    /// [`AgentSession::finish`], as [`AgentSession::output_phase`] directs.
    pub fn child_exited(&mut self, status: ExitStatus, now: Micros) -> Result<(), SessionError> {
        if self.state != State::Running || self.op != Op::Exec || self.exit.is_some() {
            return Err(SessionError::InvalidState);
        }
        self.exit = Some((status, now));
        Ok(())
    }

    /// How the driver should treat the output pipes at `now`.
    pub fn output_phase(&self, now: Micros) -> OutputPhase {
        match self.exit {
            _ if self.dropped && self.drained > self.config.drain_limit => OutputPhase::Closed,
            None => OutputPhase::Open,
            Some((_, ended)) if now < ended.saturating_add(self.config.drain_grace) => {
                OutputPhase::Grace
            }
            Some(_) => OutputPhase::Drain,
        }
    }

    /// Frames `len` output bytes that the driver read to `buf[DATA_HEADROOM..]` at `now`,
    /// without a copy; returns where the frame starts (send `buf[start..DATA_HEADROOM + len]`).
    /// Only while the command runs (or drains), never after the final frame.
    pub fn frame_output(
        &mut self,
        buf: &mut [u8],
        kind: DataKind,
        len: usize,
        now: Micros,
    ) -> Result<usize, SessionError> {
        // NOTE: a command's output only: during a transfer it would reach a client that
        // refuses it (found by the protocol-4 fuzz model).
        let output = matches!(kind, DataKind::Stdout | DataKind::Stderr);
        let op = matches!(self.op, Op::Exec | Op::Attach);
        if self.state != State::Running || !op || !output {
            return Err(SessionError::InvalidState);
        }
        let at_us = now.saturating_sub(self.started_at);
        let start = frame_data_in_place(buf, kind, len, at_us)?;
        let record = match kind {
            DataKind::Stderr => &mut self.stderr,
            _ => &mut self.stdout,
        };
        record.bytes = record.bytes.saturating_add(len as u64);
        self.note_drained(len);
        Ok(start)
    }

    /// `len` output bytes were read and not framed (kept back for a capped stream's tail).
    /// After the command exited they count toward the drain limit like framed ones: a writer
    /// that outlives its command is cut off either way ([`OutputPhase::Closed`]).
    pub fn note_drained(&mut self, len: usize) {
        if self.exit.is_some() {
            self.drained = self.drained.saturating_add(len);
            if self.drained > self.config.drain_limit {
                // Someone keeps the pipes busy long after the command ended.
                self.dropped = true;
            }
        }
    }

    /// Encodes [`AgentFrame::OutputDropped`] into `out`: `bytes` of `stream` were dropped
    /// between the head already sent and the tail the driver sends next (the output cap).
    /// The driver sends it in order with the stream's data. Returns the bytes written.
    pub fn encode_output_dropped(
        &mut self,
        stream: Stream,
        bytes: u64,
        out: &mut [u8],
    ) -> Result<usize, SessionError> {
        if self.state != State::Running || !matches!(self.op, Op::Exec | Op::Attach) {
            return Err(SessionError::InvalidState);
        }
        let n = encode_agent_frame(&AgentFrame::OutputDropped(Dropped { stream, bytes }), out)?;
        let record = match stream {
            Stream::Stdout => &mut self.stdout,
            Stream::Stderr => &mut self.stderr,
        };
        record.bytes = record.bytes.saturating_add(bytes);
        record.dropped = record.dropped.saturating_add(bytes);
        self.dropped |= bytes > 0;
        Ok(n)
    }

    /// Some output was lost (a pipe failed, or was closed while it still held data).
    pub fn note_output_dropped(&mut self) {
        self.dropped = true;
    }

    /// The output is done (pipes closed): queue the termination record, the last frame, for a
    /// command that ended by itself with nothing else known.
    pub fn finish(&mut self, now: Micros) -> Result<(), SessionError> {
        self.finish_with(now, EndFacts::EXITED)
    }

    /// Like [`AgentSession::finish`], with what the driver knows about the command's end.
    pub fn finish_with(&mut self, now: Micros, facts: EndFacts) -> Result<(), SessionError> {
        let (State::Running, Op::Exec, Some((status, ended))) = (self.state, self.op, self.exit)
        else {
            return Err(SessionError::InvalidState);
        };
        self.exited = Some(Termination {
            status,
            duration_us: ended.saturating_sub(self.started_at),
            output_dropped: self.dropped,
            ending: facts.ending,
            tree_kill: facts.tree_kill,
            stdout: self.stdout,
            stderr: self.stderr,
            pipes_held: facts.pipes_held,
            oom_killed: facts.oom_killed,
            peak_memory: facts.peak_memory,
        });
        self.enter_closing(now, true);
        Ok(())
    }

    fn credit_due(&self) -> bool {
        // NOTE: never before `Started`: stdin consumed while the command is still starting (a
        // driver may discard it early) is credited once the command runs (found by fuzzing).
        let running = matches!(self.state, State::Running | State::Closing)
            && self.started.is_none()
            && self.file_ready.is_none();
        running
            && !self.is_closing_with_error()
            && (self.owed >= CREDIT_BATCH || (self.owed > 0 && self.owed == self.in_window))
    }

    fn is_closing_with_error(&self) -> bool {
        self.error.is_some()
    }

    /// Writes the queued control frames into `out`, in the protocol's order (hello, started,
    /// credit, then the final frame); returns the bytes written, 0 when nothing is queued. What
    /// does not fit stays queued.
    pub fn poll_transmit(&mut self, out: &mut [u8]) -> Result<usize, SessionError> {
        let mut written = 0;
        loop {
            let Some(frame) = self.next_queued() else {
                return Ok(written);
            };
            let rest = out.get_mut(written..).unwrap_or(&mut []);
            match encode_agent_frame(&frame, rest) {
                Ok(n) => written += n,
                Err(_) if written > 0 => return Ok(written),
                Err(err) => return Err(err.into()),
            }
            self.dequeue(&frame);
        }
    }

    fn next_queued(&self) -> Option<AgentFrame<'static>> {
        if self.hello {
            return Some(AgentFrame::Hello(self.agent_hello()));
        }
        if let Some(mac) = self.authenticated {
            return Some(AgentFrame::Authenticated(AgentProof {
                mac: ByteArray(mac),
            }));
        }
        if let Some(refusal) = self.error {
            return Some(AgentFrame::Error(ErrorFrame {
                code: refusal.code,
                errno: refusal.errno,
                message: truncate_str(refusal.message, MAX_MESSAGE),
            }));
        }
        if let Some(pid) = self.started {
            return Some(AgentFrame::Started(Started { pid }));
        }
        if let Some(header) = self.file_ready {
            return Some(AgentFrame::FileReady(header));
        }
        if let Some(header) = self.attached {
            return Some(AgentFrame::Attached(header));
        }
        if self.credit_due() {
            return Some(AgentFrame::StdinCredit(self.owed as u32));
        }
        if self.keepalive_queued {
            return Some(AgentFrame::Keepalive);
        }
        if let Some(report) = self.done {
            return Some(AgentFrame::Done(report));
        }
        if let Some(summary) = self.file_done {
            return Some(AgentFrame::FileDone(summary));
        }
        if let Some(previous) = self.clock_set {
            return Some(AgentFrame::ClockSet(previous));
        }
        if let Some(job) = self.detached {
            return Some(AgentFrame::Detached(job));
        }
        self.exited.map(AgentFrame::Exited)
    }

    /// `sent` (what [`AgentSession::next_queued`] gave) is encoded: it is no longer owed.
    fn dequeue(&mut self, sent: &AgentFrame<'_>) {
        match sent {
            AgentFrame::Hello(_) => self.hello = false,
            AgentFrame::Authenticated(_) => self.authenticated = None,
            AgentFrame::Done(_) => {
                self.done = None;
                self.final_sent();
            }
            AgentFrame::Error(_) => {
                // The error is the last frame: drop anything else.
                self.error = None;
                self.exited = None;
                self.clear_queue();
                self.operation_over();
            }
            AgentFrame::FileReady(_) => self.file_ready = None,
            AgentFrame::FileDone(_) => {
                self.file_done = None;
                self.final_sent();
            }
            AgentFrame::ClockSet(_) => {
                self.clock_set = None;
                self.final_sent();
            }
            AgentFrame::Detached(_) => {
                self.detached = None;
                self.final_sent();
            }
            AgentFrame::Attached(_) => self.attached = None,
            AgentFrame::Started(_) => self.started = None,
            AgentFrame::StdinCredit(_) => {
                self.in_window -= self.owed;
                self.owed = 0;
            }
            AgentFrame::Exited(_) => {
                self.exited = None;
                self.final_sent();
            }
            AgentFrame::Keepalive => self.keepalive_queued = false,
            AgentFrame::Stdout(_)
            | AgentFrame::Stderr(_)
            | AgentFrame::Ready(_)
            | AgentFrame::OutputDropped(_)
            | AgentFrame::FileData(_)
            | AgentFrame::Skipped(_)
            | AgentFrame::SystemInfo(_)
            | AgentFrame::Mount(_)
            | AgentFrame::Interface(_)
            | AgentFrame::Job(_) => {}
        }
    }

    /// The final frame is encoded: stdin consumed from now on is owed to nobody. NOTE: credit
    /// after the final frame is a frame after the end, which a client refuses (found by the
    /// protocol-4 fuzz model; an exec's record had it too).
    fn final_sent(&mut self) {
        self.in_window = 0;
        self.owed = 0;
        self.operation_over();
    }

    /// The operation's final frame is encoded: the connection goes on (see
    /// [`AgentSession::can_continue`]) if the operation ended so and the client's stream has
    /// not ended; otherwise it closes once the frame is sent.
    fn operation_over(&mut self) {
        if self.state == State::Closing && self.keep && !self.input_closed {
            self.state = State::Ended;
        }
    }

    fn agent_hello(&self) -> AgentHello<'static> {
        agent_hello(
            self.config.agent_version,
            self.config.limits,
            self.config.bounds,
            self.nonce,
            self.security(),
        )
    }
}

fn invalid_message(message: &'static str) -> (Refusal, SessionError) {
    (
        Refusal::new(ErrorCode::InvalidRequest, message),
        SessionError::InvalidRequest { message },
    )
}

fn invalid_request(err: crate::RequestError) -> (Refusal, SessionError) {
    let message = err.message;
    (
        Refusal::new(err.code, message),
        SessionError::InvalidRequest { message },
    )
}

/// Encodes `refusal` as the one frame of a connection the agent will not serve (busy, out of
/// processes or descriptors): sent instead of a hello, then the connection is closed. A client
/// session takes it as [`super::ClientEvent::Refused`] before any hello.
pub fn encode_refusal(refusal: &Refusal, out: &mut [u8]) -> Result<usize, SessionError> {
    let frame = AgentFrame::Error(ErrorFrame {
        code: refusal.code,
        errno: refusal.errno,
        message: truncate_str(refusal.message, MAX_MESSAGE),
    });
    Ok(encode_agent_frame(&frame, out)?)
}

/// The largest agent hello body: its strings are bounded, the rest is fixed or a varint.
const AGENT_HELLO_MAX: usize = 256;

/// The agent's hello, on an exec connection or in the readiness announcement.
pub(super) fn agent_hello(
    agent_version: &str,
    limits: Limits,
    bounds: Bounds,
    nonce: [u8; NONCE_LEN],
    security: Security,
) -> AgentHello<'_> {
    AgentHello {
        magic: MAGIC,
        min_version: MIN_PROTOCOL_VERSION,
        version: PROTOCOL_VERSION,
        agent_version: truncate_str(agent_version, crate::limits::MAX_VERSION_STRING),
        limits,
        nonce: ByteArray(nonce),
        security,
        bounds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stdin the driver consumed while the command was still starting is credited after
    /// `Started`, never before it (a client refuses credit before the command started).
    #[test]
    fn credit_never_precedes_started() {
        use crate::frame::{decode_agent_frame, split_frame};
        use crate::limits::MAX_FRAME;
        let auth = AgentAuth {
            nonce: [0; NONCE_LEN],
            secret: None,
        };
        let mut session = AgentSession::new(AgentConfig::DEFAULT, 0, auth);
        let mut out = [0u8; MAX_FRAME];
        let mut input = [0u8; 512];
        let mut n = crate::encode_client_frame(
            &ClientFrame::Hello(crate::ClientHello::CURRENT),
            &mut input,
        )
        .unwrap();
        let exec = crate::ExecRequest {
            argv: crate::StrList::new(b"cat\0"),
            env: crate::StrList::new(b""),
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
        n += crate::encode_client_frame(&ClientFrame::Exec(exec), &mut input[n..]).unwrap();
        n += crate::encode_client_frame(&ClientFrame::Stdin(crate::Bytes(b"abc")), &mut input[n..])
            .unwrap();
        let mut rest = &input[..n];
        while !rest.is_empty() {
            let step = session.handle_input(rest, 0).unwrap();
            if let Some(AgentEvent::Stdin(data)) = step.event {
                // Discarded at once, before the command has started.
                session.stdin_consumed(data.len());
            }
            rest = &rest[step.consumed..];
        }
        let hello = session.poll_transmit(&mut out).unwrap();
        assert!(hello > 0);
        assert_eq!(session.poll_transmit(&mut out).unwrap(), 0, "no credit yet");
        session.started(7, 0).unwrap();
        let len = session.poll_transmit(&mut out).unwrap();
        let mut kinds = [None, None];
        let mut at = 0;
        for kind in kinds.iter_mut() {
            let (body, used) = split_frame(&out[at..len], MAX_FRAME).unwrap().unwrap();
            *kind = Some(FrameKind::of_agent(&decode_agent_frame(body).unwrap()));
            at += used;
        }
        assert_eq!(
            kinds,
            [Some(FrameKind::Started), Some(FrameKind::StdinCredit)]
        );
    }

    /// NOTE: the agent hashes its hello into the transcript from a buffer of `AGENT_HELLO_MAX`
    /// bytes; a hello that did not fit would silently break every proof. The largest one fits.
    #[test]
    fn the_largest_agent_hello_fits_its_transcript_buffer() {
        let limits = Limits {
            max_frame_body: u32::MAX,
            max_data: u32::MAX,
            max_argv_bytes: u32::MAX,
            max_args: u32::MAX,
            max_env_bytes: u32::MAX,
            max_env_vars: u32::MAX,
            max_path: u32::MAX,
            stdin_window: u32::MAX,
            max_user: u32::MAX,
            max_arg_len: u32::MAX,
            keepalive_ms: u32::MAX,
            idle_ms: u32::MAX,
        };
        let bounds = Bounds {
            max_runtime_s: u64::MAX,
            max_output: u64::MAX,
            max_file_size: u64::MAX,
            max_connections: u32::MAX,
            handshake_timeout_ms: u32::MAX,
            memory_max: u64::MAX,
            pids_max: u32::MAX,
            cgroup: true,
            default_uid: u32::MAX,
            default_gid: u32::MAX,
        };
        let version = "v".repeat(crate::limits::MAX_VERSION_STRING + 10);
        let hello = agent_hello(
            &version,
            limits,
            bounds,
            [0xff; NONCE_LEN],
            Security::Insecure,
        );
        let mut body = [0u8; AGENT_HELLO_MAX];
        let n = encode_agent_frame(&AgentFrame::Hello(hello), &mut body).expect("it fits");
        assert!(n < AGENT_HELLO_MAX, "{n}");
    }
}
