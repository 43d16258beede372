//! The client's session under arbitrary agent bytes, in arbitrary pieces, with the host's
//! commands (start an exec — sometimes one large enough to go in pieces —, send stdin by copy or
//! in place, close stdin, signal, resize, cancel, timeouts, EOF) in an order the fuzzer chooses.
//! Beside "no panic", a model of the protocol checks which frames are accepted and which are a
//! typed error, that every event says what its frame said (output's timestamp included), that
//! nothing is accepted after the end or after an error, the deadlines `poll_timeout` reports
//! (the handshake's, then the agent's liveness: three keepalive intervals after it was last
//! heard, `AgentSilent` when they pass), and the client's own stream: the hello (and its proof)
//! only after the agent's hello, and once, one operation, a request's pieces before it and
//! adding up to it byte for byte, controls only for a running exec, stdin only while piped and
//! open and never beyond the credit granted.
//!
//! The agent's stream is the fuzzer's. A secure client (the default) holds the golden
//! transcripts' secret and client nonce, so a seeded stream's hello and proof are the right ones;
//! a real `AgentSession` with that secret, fed what the client sends, says which proof is right
//! (only its own, after its own hello): any other must be refused. An insecure client takes
//! arbitrary hellos too.
//!
//! Protocol 4 in the model: `start_put` (content as stdin within credit, before `FileReady`
//! too, then `end_put` with its digest, never `close_stdin`), `start_get`, `start_info`,
//! `start_shutdown`, `start_time_sync`, `start_reseed`, each validated by rules of the model's
//! own; `FileReady` answers a put or a get, content only for a get, skipped entries for either,
//! `FileDone` last (for a put only after its digest was sent), the system first then at most
//! `MAX_INFO_ITEMS` mounts and interfaces then `Done` for an info, `ClockSet` for a time sync,
//! `Done` for the rest; output, `Started` and `Exited` for an exec alone; credit for an exec or a
//! put; liveness while an exec, a put or a get runs.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use ferry_wire::limits::{
    HEADER_LEN, MAX_DATA, MAX_FRAME, MAX_FRAME_BODY, NONCE_LEN, STDIN_WINDOW,
};
use ferry_wire::limits::{MAX_INFO_ITEMS, MAX_INLINE_LIST, MAX_JOBS};
use ferry_wire::session::{
    AgentAuth, AgentConfig, AgentEvent, AgentSession, ClientAuth, ClientEvent, ClientSession,
    FrameKind, Micros, Phase, Secret, SessionError,
};
use ferry_wire::{
    decode_agent_frame, decode_client_frame, encode_client_frame, split_frame, AgentFrame,
    ByteArray, Bytes, Cancel, ClientFrame, ClientHello, ExecRequest, Limits, ListKind, Security,
    ShutdownRequest, StdinMode, StrList, Timestamp, WindowSize, DATA_HEADROOM, MAGIC,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use ferry_wire_fuzz::jobs::{
    attach_refusal, kill_refusal, query_refusal, request_refusal, start_refusal, JobRequestChoice,
    NameChoice,
};
use ferry_wire_fuzz::ops::{
    get_refusal, put_refusal, reseed_refusal, shutdown_refusal, time_sync_refusal, GetChoice,
    PutChoice,
};
use ferry_wire_fuzz::{arbitrary_steps, split_input, whole_frames};
use libfuzzer_sys::fuzz_target;

/// One move of the host's driver.
#[derive(Arbitrary, Debug)]
enum Step {
    /// Receive the next `len` bytes of the agent's stream and handle every whole frame (`timed`:
    /// with `handle_input_at`, so the agent counts as heard now).
    Receive {
        len: u16,
        timed: bool,
    },
    /// Receive what the next whole frame needs, and handle it.
    ReceiveFrame,
    /// `poll_transmit` into a buffer of `room` bytes (0: a whole frame's).
    Transmit {
        room: u16,
    },
    /// Start an exec: which request, into a buffer of `room` bytes (0: what
    /// `exec_buffer_len` says). `size` and `shape` may make one list large (see
    /// `request_lists`); `shape` also picks the rest of the request (a terminal, timeouts).
    StartExec {
        request: u8,
        pipe: bool,
        room: u16,
        size: u16,
        shape: u8,
    },
    /// Start a kill-all into a buffer of `room` bytes (0: a whole frame's).
    StartKillAll {
        room: u16,
    },
    /// Send `len` bytes of stdin by copy into a buffer of `room` bytes (0: a whole frame's).
    SendStdin {
        len: u32,
        room: u16,
    },
    /// Frame `len` bytes of stdin in place.
    FrameStdin {
        len: u32,
    },
    /// Close stdin.
    CloseStdin,
    /// Send a signal into a buffer of `room` bytes (0: a whole frame's).
    Signal {
        number: u8,
        room: u8,
    },
    /// Send a new terminal size.
    Resize {
        rows: u16,
        cols: u16,
        room: u8,
    },
    /// Cancel the command.
    Cancel {
        grace_ms: Option<u32>,
        room: u8,
    },
    /// Time passes; the driver checks the deadline.
    Advance {
        micros: u32,
    },
    /// The agent's stream ended.
    Eof,
    /// Start a put into a buffer of `room` bytes (0: a whole frame's).
    StartPut {
        request: PutChoice,
        room: u16,
    },
    /// End the put's content with a digest into a buffer of `room` bytes.
    EndPut {
        digest: u8,
        room: u8,
    },
    /// Start a get.
    StartGet {
        request: GetChoice,
        room: u16,
    },
    /// Start an info, a shutdown, a time sync or a reseed (`len` random bytes).
    StartInfo {
        room: u16,
    },
    StartShutdown {
        reboot: bool,
        grace_ms: u32,
        room: u16,
    },
    StartTimeSync {
        secs: i64,
        nanos: u32,
        room: u16,
    },
    StartReseed {
        len: u16,
        room: u16,
    },
    /// Start a detached job: a name, and a request as `StartExec` builds it (one large enough
    /// to need pieces is refused: a job's request comes whole).
    StartJob {
        name: NameChoice,
        request: u8,
        pipe: bool,
        room: u16,
        size: u16,
        shape: u8,
    },
    /// Start a job listing, an attach, a wait, a kill or a removal.
    StartJobs {
        request: JobRequestChoice,
        room: u16,
    },
    StartAttach {
        request: JobRequestChoice,
        room: u16,
    },
    StartWait {
        request: JobRequestChoice,
        room: u16,
    },
    StartKill {
        request: JobRequestChoice,
        room: u16,
    },
    StartRemove {
        request: JobRequestChoice,
        room: u16,
    },
}

fuzz_target!(|data: &[u8]| {
    let (choices, wire) = split_input(data);
    let mut u = Unstructured::new(choices);
    let hello_timeout = match u.arbitrary::<u8>().unwrap_or(0) {
        0 => None,
        n => Some(u64::from(n) * 1_000),
    };
    let insecure = u.arbitrary::<bool>().unwrap_or(false);
    let steps: Vec<Step> = arbitrary_steps(&mut u);
    let mut run = Run::new(hello_timeout, insecure, wire);
    for step in steps {
        run.step(step);
    }
    // Then as the host library would go on: take the agent's hello (a seeded stream's first
    // frame), send, take the rest, write stdin, close, end.
    for step in [
        Step::ReceiveFrame,
        job_start_for(wire).unwrap_or(Step::StartExec {
            request: 0,
            pipe: true,
            room: 0,
            size: 0,
            shape: 0,
        }),
        Step::Transmit { room: 0 },
        Step::Receive {
            len: 0,
            timed: true,
        },
        Step::SendStdin { len: 10, room: 0 },
        Step::Signal { number: 2, room: 0 },
        Step::CloseStdin,
        Step::Transmit { room: 0 },
        Step::Advance { micros: 1 << 20 },
        Step::Cancel {
            grace_ms: None,
            room: 0,
        },
        Step::Eof,
    ] {
        run.step(step);
    }
});

const START: Micros = 1_000;
/// The golden transcripts' secret and nonces (`wire/src/session/transcripts.rs`).
const SECRET: &[u8] = b"ferry golden transcript secret";
const AGENT_NONCE: [u8; NONCE_LEN] = counting(0x00);
const CLIENT_NONCE: [u8; NONCE_LEN] = counting(0x80);
const AGENT_CONFIG: AgentConfig = AgentConfig {
    agent_version: "golden",
    ..AgentConfig::DEFAULT
};

const fn counting(start: u8) -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    let mut i = 0;
    while i < NONCE_LEN {
        nonce[i] = start + i as u8;
        i += 1;
    }
    nonce
}

/// Which operation a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Exec,
    Put,
    Get,
    /// Kill-all, shutdown, reseed: one `Done`.
    Simple,
    Info,
    Clock,
    /// A detached job's start: one `Detached`.
    Job,
    /// A job listing: records, then `Done` counting them.
    JobList,
    /// `Attached`, output, then `Exited` or `Done`.
    Attach,
    /// `Exited`.
    Wait,
}

/// Where the operation stands, as the model sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    None,
    /// Sent, not answered yet.
    Sent(Kind),
    /// Answered (`Started`, `FileReady`, the system's info).
    Running(Kind),
    Done,
}

struct Run<'a> {
    session: ClientSession,
    now: Micros,
    hello_deadline: Option<Micros>,
    wire: &'a [u8],
    received: usize,
    inbox: Vec<u8>,
    // The model.
    secure: bool,
    /// The agent proved the secret (or both ends are insecure).
    authenticated: bool,
    /// Our hello (and proof) are owed, once the agent's hello came.
    hello_owed: bool,
    hello_sent: bool,
    /// The body of the agent's hello the client accepted.
    agent_hello: Vec<u8>,
    /// The real agent with the client's secret: its hello body, and its proof once the
    /// client's hello and proof reached it.
    reference: AgentSession,
    reference_hello: Vec<u8>,
    right_proof: Option<Vec<u8>>,
    agent: Option<Limits>,
    op: Op,
    failed: bool,
    stdin_piped: bool,
    /// `close_stdin` was called while stdin was open.
    eof_queued: bool,
    eof_sent: bool,
    credit: u64,
    in_flight: u64,
    // The client's own stream, as the agent would see it.
    sent: Vec<u8>,
    checked: usize,
    stream_hello: bool,
    stream_auth: bool,
    stream_op: bool,
    stream_exec: Option<StdinMode>,
    stream_eof: bool,
    stdin_total: u64,
    credit_granted: u64,
    /// The running exec has a terminal.
    pty: bool,
    /// When the agent was last heard (`handle_input_at`).
    heard_at: Option<Micros>,
    /// The lists of the exec request started, to check the stream's pieces against.
    exec_lists: Option<(Vec<u8>, Vec<u8>)>,
    /// The pieces of each list seen on the stream so far.
    stream_argv: Vec<u8>,
    stream_env: Vec<u8>,
    /// A put's digest was sent (by `end_put`); seen on the stream.
    put_ended: bool,
    stream_put: bool,
    stream_put_end: bool,
    /// Mounts and interfaces accepted.
    info_items: usize,
    /// The job operations' part of the model.
    job: JobModel,
    /// The last operation ended and the agent keeps the connection (protocol 5).
    reusable: bool,
    /// Something beyond the request went for this operation (pieces, stdin, its end, a
    /// control): a refusal then ends the connection.
    op_traffic: bool,
}

/// What the model knows of a job operation, and of the client's stream for one.
#[derive(Default)]
struct JobModel {
    /// Job records accepted in a listing.
    items: usize,
    /// Stdin was granted to the attachment.
    stdin_granted: bool,
    /// A job start went on the stream: its exec must follow, whole.
    stream_start: bool,
    /// An attach request went on the stream.
    stream_attach: bool,
}

impl<'a> Run<'a> {
    fn new(hello_timeout: Option<Micros>, insecure: bool, wire: &'a [u8]) -> Self {
        let secret = Secret::new(SECRET).expect("a valid secret");
        let auth = ClientAuth {
            nonce: CLIENT_NONCE,
            secret: (!insecure).then(|| secret.clone()),
        };
        let auth_agent = AgentAuth {
            nonce: AGENT_NONCE,
            secret: Some(secret),
        };
        // The reference agent keeps connections as the stream's hello says (protocol 5), so a
        // seeded keep-alive conversation proves itself too.
        let idle_ms = whole_frames(wire)
            .0
            .first()
            .and_then(|body| match decode_agent_frame(body) {
                Ok(AgentFrame::Hello(hello)) => Some(hello.limits.idle_ms),
                _ => None,
            })
            .unwrap_or(0);
        let config = AgentConfig {
            limits: Limits {
                idle_ms,
                ..AGENT_CONFIG.limits
            },
            ..AGENT_CONFIG
        };
        let mut reference = AgentSession::new(config, START, auth_agent);
        let mut hello = vec![0u8; MAX_FRAME];
        let n = reference.poll_transmit(&mut hello).expect("the hello");
        Run {
            session: ClientSession::new(START, hello_timeout, auth),
            now: START,
            hello_deadline: hello_timeout.map(|t| START + t),
            wire,
            received: 0,
            inbox: Vec::new(),
            secure: !insecure,
            authenticated: false,
            hello_owed: false,
            hello_sent: false,
            agent_hello: Vec::new(),
            reference,
            reference_hello: hello[HEADER_LEN..n].to_vec(),
            right_proof: None,
            agent: None,
            op: Op::None,
            failed: false,
            stdin_piped: false,
            eof_queued: false,
            eof_sent: false,
            credit: 0,
            in_flight: 0,
            sent: Vec::new(),
            checked: 0,
            stream_hello: false,
            stream_auth: false,
            stream_op: false,
            stream_exec: None,
            stream_eof: false,
            stdin_total: 0,
            credit_granted: 0,
            pty: false,
            heard_at: None,
            exec_lists: None,
            stream_argv: Vec::new(),
            stream_env: Vec::new(),
            put_ended: false,
            stream_put: false,
            stream_put_end: false,
            info_items: 0,
            job: JobModel::default(),
            reusable: false,
            op_traffic: false,
        }
    }

    fn phase(&self) -> Phase {
        match (self.agent, self.op) {
            _ if self.failed => Phase::Done,
            (_, Op::Done) if self.reusable => Phase::Idle,
            (_, Op::Done) => Phase::Done,
            (None, _) => Phase::Hello,
            (_, Op::Running(_)) => Phase::Running,
            (_, Op::Sent(_)) => Phase::Starting,
            (Some(_), Op::None) if !self.authenticated => Phase::Hello,
            (Some(_), Op::None) => Phase::Idle,
        }
    }

    fn stdin_open(&self) -> bool {
        self.stdin_piped && !self.eof_queued && !self.finished()
    }

    /// The operation is over (its final frame came, or the connection failed).
    fn finished(&self) -> bool {
        self.failed || self.op == Op::Done
    }

    fn step(&mut self, step: Step) {
        assert_eq!(self.session.phase(), self.phase(), "phase before {step:?}");
        assert_eq!(self.session.stdin_open(), self.stdin_open());
        let credit = if self.stdin_piped && !self.eof_queued {
            self.credit
        } else {
            0
        };
        assert_eq!(self.session.stdin_credit() as u64, credit);
        assert_eq!(self.session.poll_timeout(), self.expected_timeout());
        match step {
            Step::Receive { len, timed } => self.receive(len, timed),
            Step::ReceiveFrame => self.receive_frame(),
            Step::Transmit { room } => self.transmit(room),
            Step::StartExec {
                request,
                pipe,
                room,
                size,
                shape,
            } => self.start_exec(request, pipe, room, size, shape),
            Step::Signal { number, room } => self.control(ClientFrame::Signal(number), room),
            Step::Resize { rows, cols, room } => {
                self.control(ClientFrame::Resize(WindowSize { rows, cols }), room)
            }
            Step::Cancel { grace_ms, room } => {
                self.control(ClientFrame::Cancel(Cancel { grace_ms }), room)
            }
            Step::StartKillAll { room } => self.start_kill_all(room),
            Step::SendStdin { len, room } => self.send_stdin(len, room),
            Step::FrameStdin { len } => self.frame_stdin(len),
            Step::CloseStdin => {
                let result = self.session.close_stdin();
                // A put's content ends with its digest, never a bare EOF.
                let put = matches!(self.op, Op::Sent(Kind::Put) | Op::Running(Kind::Put));
                if self.op == Op::None || put {
                    assert_eq!(result, Err(SessionError::InvalidState));
                } else {
                    assert_eq!(result, Ok(()));
                    if self.stdin_piped && !self.finished() {
                        self.eof_queued = true;
                        self.op_traffic = true;
                    }
                }
            }
            Step::Advance { micros } => {
                self.now = self.now.saturating_add(u64::from(micros) * 4);
                let expired = self.expected_timeout().is_some_and(|d| self.now >= d);
                let result = self.session.handle_timeout(self.now);
                if expired {
                    // The handshake's deadline until the agent proved itself, then its
                    // liveness: silent for three keepalive intervals.
                    let expected = if self.authenticated {
                        SessionError::AgentSilent
                    } else {
                        SessionError::TimedOut {
                            phase: Phase::Hello,
                        }
                    };
                    assert_eq!(result, Err(expected));
                    self.failed = true;
                    self.stdin_piped = false;
                    assert!(self.session.is_finished());
                } else {
                    assert_eq!(result, Ok(()));
                }
                assert_eq!(self.session.poll_timeout(), self.expected_timeout());
            }
            Step::StartPut { request, room } => {
                let parts = request.parts();
                let request = request.request(&parts);
                let refusal = self
                    .agent
                    .and_then(|limits| put_refusal(&request, &limits))
                    .map(|(_, message)| message);
                self.start(
                    Kind::Put,
                    &ClientFrame::Put(request),
                    refusal,
                    room,
                    |session, out| session.start_put(&request, out),
                );
            }
            Step::EndPut { digest, room } => {
                let room = if room == 0 {
                    MAX_FRAME
                } else {
                    usize::from(room % 64)
                };
                let mut out = vec![0u8; room];
                let result = self.session.end_put(&[digest; 32], &mut out);
                let put = matches!(self.op, Op::Sent(Kind::Put) | Op::Running(Kind::Put));
                let frame = encode(&ClientFrame::PutEnd(ByteArray([digest; 32])));
                if !put || self.put_ended || self.failed {
                    assert_eq!(result, Err(SessionError::InvalidState));
                } else if room < frame.len() {
                    assert_eq!(result, Err(SessionError::BufferTooSmall));
                } else {
                    assert_eq!(result, Ok(frame.len()));
                    assert_eq!(out[..frame.len()], frame[..]);
                    self.put_ended = true;
                    self.op_traffic = true;
                    self.stdin_piped = false;
                    self.sent.extend_from_slice(&frame);
                    self.check_stream();
                }
            }
            Step::StartGet { request, room } => {
                let path = request.path.bytes();
                let user = request.user.bytes();
                let request = request.request(&path, user.as_deref());
                let refusal = self
                    .agent
                    .and_then(|limits| get_refusal(&request, &limits))
                    .map(|(_, message)| message);
                self.start(
                    Kind::Get,
                    &ClientFrame::Get(request),
                    refusal,
                    room,
                    |session, out| session.start_get(&request, out),
                );
            }
            Step::StartInfo { room } => {
                self.start(
                    Kind::Info,
                    &ClientFrame::Info,
                    None,
                    room,
                    |session, out| session.start_info(out),
                );
            }
            Step::StartShutdown {
                reboot,
                grace_ms,
                room,
            } => {
                let request = ShutdownRequest { reboot, grace_ms };
                let refusal = shutdown_refusal(&request).map(|(_, message)| message);
                self.start(
                    Kind::Simple,
                    &ClientFrame::Shutdown(request),
                    refusal,
                    room,
                    |session, out| session.start_shutdown(request, out),
                );
            }
            Step::StartTimeSync { secs, nanos, room } => {
                let now = Timestamp { secs, nanos };
                let refusal = time_sync_refusal(&now).map(|(_, message)| message);
                self.start(
                    Kind::Clock,
                    &ClientFrame::TimeSync(now),
                    refusal,
                    room,
                    |session, out| session.start_time_sync(now, out),
                );
            }
            Step::StartReseed { len, room } => {
                let random: Vec<u8> = (0..usize::from(len) % 600).map(|i| i as u8).collect();
                let refusal = reseed_refusal(&random).map(|(_, message)| message);
                self.start(
                    Kind::Simple,
                    &ClientFrame::Reseed(Bytes(&random)),
                    refusal,
                    room,
                    |session, out| session.start_reseed(&random, out),
                );
            }
            step @ (Step::StartJob { .. }
            | Step::StartJobs { .. }
            | Step::StartAttach { .. }
            | Step::StartWait { .. }
            | Step::StartKill { .. }
            | Step::StartRemove { .. }) => self.job_step(step),
            Step::Eof => {
                let left = self.inbox.len();
                let phase = self.phase();
                let result = self.session.handle_eof(left);
                if matches!(phase, Phase::Done | Phase::Idle) && left == 0 {
                    assert_eq!(result, Ok(()));
                    self.failed |= phase == Phase::Idle;
                } else {
                    assert_eq!(
                        result,
                        Err(SessionError::Disconnected {
                            phase,
                            mid_frame: left > 0
                        })
                    );
                    self.failed = true;
                }
                self.stdin_piped = false;
                // The driver drops what it had.
                self.inbox.clear();
                self.received = self.wire.len();
            }
        }
    }

    /// What `poll_timeout` must say: the handshake's deadline until the agent proved itself,
    /// then (once it was heard with `handle_input_at`) three keepalive intervals after it was
    /// last heard, while an exec, a put, a get, an attachment or a wait runs (the others have no
    /// keepalives).
    fn expected_timeout(&self) -> Option<Micros> {
        if self.failed {
            return None;
        }
        if !self.authenticated {
            return self.hello_deadline;
        }
        let running = matches!(
            self.op,
            Op::Sent(Kind::Exec | Kind::Put | Kind::Get | Kind::Attach | Kind::Wait)
                | Op::Running(Kind::Exec | Kind::Put | Kind::Get | Kind::Attach | Kind::Wait)
        );
        let interval = u64::from(self.agent?.keepalive_ms) * 1000;
        let heard = self.heard_at.filter(|_| running && interval > 0)?;
        Some(heard.saturating_add(interval.saturating_mul(3)))
    }

    fn receive(&mut self, len: u16, timed: bool) {
        let rest = self.wire.len() - self.received;
        let take = if len == 0 {
            rest
        } else {
            usize::from(len).min(rest)
        };
        self.receive_bytes(take, timed);
    }

    /// Receives exactly what the next whole frame still needs (everything, when no whole frame
    /// is left), as a driver does that reads the agent's hello before it starts its operation.
    fn receive_frame(&mut self) {
        let pending = [&self.inbox[..], &self.wire[self.received..]].concat();
        let take = match split_frame(&pending, MAX_FRAME_BODY) {
            Ok(Some((_, used))) => used.saturating_sub(self.inbox.len()),
            _ => self.wire.len() - self.received,
        };
        self.receive_bytes(take, true);
    }

    fn receive_bytes(&mut self, take: usize, timed: bool) {
        let rest = &self.wire[self.received..];
        self.inbox.extend_from_slice(&rest[..take]);
        self.received += take;
        loop {
            let inbox = std::mem::take(&mut self.inbox);
            let result = if timed {
                if !inbox.is_empty() {
                    self.heard_at = Some(self.heard_at.map_or(self.now, |at| at.max(self.now)));
                }
                self.session.handle_input_at(&inbox, self.now)
            } else {
                self.session.handle_input(&inbox)
            };
            let used = self.expect(&inbox, result);
            self.inbox = inbox;
            match used {
                Some(n) if n > 0 => {
                    self.inbox.drain(..n);
                }
                _ => return,
            }
        }
    }

    /// Checks one `handle_input` answer against the model; returns the bytes to drop, `None` to
    /// stop reading.
    fn expect(
        &mut self,
        inbox: &[u8],
        result: Result<ferry_wire::session::Input<ClientEvent<'_>>, SessionError>,
    ) -> Option<usize> {
        if self.failed {
            assert_eq!(result.map(|_| ()), Err(SessionError::InvalidState));
            return None;
        }
        let fail = |run: &mut Self, result: Result<_, SessionError>, expected: SessionError| {
            assert_eq!(
                result.map(|_: ferry_wire::session::Input<ClientEvent<'_>>| ()),
                Err(expected)
            );
            run.failed = true;
            run.stdin_piped = false;
            assert!(run.session.is_finished());
            None
        };
        let (body, used) = match split_frame(inbox, MAX_FRAME_BODY) {
            Err(err) => {
                return fail(
                    self,
                    result,
                    SessionError::FrameTooLarge {
                        declared: err.declared,
                    },
                )
            }
            Ok(None) => {
                let input = result.expect("need more");
                assert_eq!((input.consumed, input.event.is_none()), (0, true));
                return None;
            }
            Ok(Some(split)) => split,
        };
        let Ok(frame) = decode_agent_frame(body) else {
            return fail(self, result, SessionError::Malformed);
        };
        let phase = self.phase();
        let unexpected = SessionError::Unexpected {
            frame: FrameKind::of_agent(&frame),
            phase,
        };
        let event = match (frame, phase) {
            (AgentFrame::Hello(hello), Phase::Hello) if self.agent.is_none() => {
                if hello.magic != MAGIC {
                    return fail(self, result, SessionError::NotFerry);
                }
                let low = hello.min_version.max(MIN_PROTOCOL_VERSION);
                let version = hello.version.min(PROTOCOL_VERSION);
                if low > version {
                    return fail(
                        self,
                        result,
                        SessionError::UnsupportedVersion {
                            chosen: hello.version,
                        },
                    );
                }
                match (hello.security, self.secure) {
                    (Security::Authenticated, false) => {
                        return fail(self, result, SessionError::SecretRequired)
                    }
                    (Security::Insecure, true) => {
                        return fail(self, result, SessionError::AgentInsecure)
                    }
                    _ => {}
                }
                let input = result.expect("the agent's hello");
                let Some(ClientEvent::HelloAccepted(info)) = input.event else {
                    panic!("{:?}", input.event);
                };
                assert_eq!(info.protocol_version, version);
                assert_eq!(info.agent_version, hello.agent_version);
                assert_eq!(info.limits, hello.limits);
                assert_eq!(info.security, hello.security);
                assert_eq!(info.bounds, hello.bounds);
                self.authenticated = !self.secure;
                self.hello_owed = true;
                self.agent_hello = body.to_vec();
                self.credit = u64::from(hello.limits.stdin_window)
                    .min(STDIN_WINDOW as u64)
                    .saturating_sub(self.in_flight);
                self.agent = Some(hello.limits);
                assert_eq!(self.session.agent_limits(), Some(hello.limits));
                input
            }
            (AgentFrame::Authenticated(proof), Phase::Hello | Phase::Starting)
                if self.hello_sent && !self.authenticated && self.agent.is_some() =>
            {
                // Only the real agent's proof, after the real agent's hello, is right.
                let right = self.agent_hello == self.reference_hello
                    && self.right_proof.as_deref() == Some(&proof.mac.0[..]);
                if !right {
                    return fail(self, result, SessionError::Unauthenticated);
                }
                let input = result.expect("the agent's proof");
                assert_eq!(input.event, Some(ClientEvent::Authenticated));
                self.authenticated = true;
                assert!(self.session.is_authenticated());
                input
            }
            // Nothing about an operation before the agent's proof (an error may come).
            (ref frame, _)
                if !self.authenticated
                    && self.op != Op::None
                    && !matches!(frame, AgentFrame::Error(_)) =>
            {
                return fail(self, result, unexpected)
            }
            // A job's frames, and a listing's or an attachment's end.
            (
                frame @ (AgentFrame::Done(_)
                | AgentFrame::Job(_)
                | AgentFrame::Detached(_)
                | AgentFrame::Attached(_)
                | AgentFrame::Exited(_)),
                _,
            ) if self.job_answer(&frame) => match self.job_frame_event(frame) {
                Ok(expected) => {
                    let input = result.expect("a job's frame");
                    assert_eq!(input.event, Some(expected));
                    input
                }
                Err(expected) => return fail(self, result, expected),
            },
            // An info's count must be the frames that came.
            (AgentFrame::Done(report), _)
                if self.op == Op::Running(Kind::Info)
                    && report.count as usize != self.info_items =>
            {
                return fail(
                    self,
                    result,
                    SessionError::InvalidRequest {
                        message: "info's count does not match its frames",
                    },
                )
            }
            (AgentFrame::Done(report), _)
                if matches!(self.op, Op::Sent(Kind::Simple) | Op::Running(Kind::Info)) =>
            {
                let input = result.expect("done");
                assert_eq!(input.event, Some(ClientEvent::Done(report)));
                self.op_done();
                input
            }
            (AgentFrame::Started(started), _) if self.op == Op::Sent(Kind::Exec) => {
                let input = result.expect("started");
                assert_eq!(input.event, Some(ClientEvent::Started { pid: started.pid }));
                self.op = Op::Running(Kind::Exec);
                input
            }
            (AgentFrame::FileReady(header), _)
                if matches!(self.op, Op::Sent(Kind::Put | Kind::Get)) =>
            {
                let input = result.expect("file ready");
                assert_eq!(input.event, Some(ClientEvent::FileReady(header)));
                if let Op::Sent(kind) = self.op {
                    self.op = Op::Running(kind);
                }
                input
            }
            (AgentFrame::FileData(data), _) if self.op == Op::Running(Kind::Get) => {
                let input = result.expect("file data");
                assert_eq!(input.event, Some(ClientEvent::FileData(data.0)));
                input
            }
            (AgentFrame::Skipped(skipped), _)
                if matches!(self.op, Op::Running(Kind::Put | Kind::Get)) =>
            {
                let input = result.expect("skipped");
                assert_eq!(input.event, Some(ClientEvent::Skipped(skipped)));
                input
            }
            // Last; a put's only once its digest went.
            (AgentFrame::FileDone(summary), _)
                if self.op == Op::Running(Kind::Get)
                    || (self.op == Op::Running(Kind::Put) && self.put_ended) =>
            {
                let input = result.expect("file done");
                assert_eq!(input.event, Some(ClientEvent::FileDone(summary)));
                self.op_done();
                self.stdin_piped = false;
                input
            }
            (AgentFrame::SystemInfo(info), _) if self.op == Op::Sent(Kind::Info) => {
                let input = result.expect("system info");
                assert_eq!(input.event, Some(ClientEvent::SystemInfo(info)));
                self.op = Op::Running(Kind::Info);
                input
            }
            (AgentFrame::Mount(_) | AgentFrame::Interface(_), _)
                if self.op == Op::Running(Kind::Info) && self.info_items >= MAX_INFO_ITEMS =>
            {
                return fail(
                    self,
                    result,
                    SessionError::InvalidRequest {
                        message: "too many info frames",
                    },
                );
            }
            (AgentFrame::Mount(mount), _) if self.op == Op::Running(Kind::Info) => {
                let input = result.expect("a mount");
                assert_eq!(input.event, Some(ClientEvent::Mount(mount)));
                self.info_items += 1;
                input
            }
            (AgentFrame::Interface(interface), _) if self.op == Op::Running(Kind::Info) => {
                let input = result.expect("an interface");
                assert_eq!(input.event, Some(ClientEvent::Interface(interface)));
                self.info_items += 1;
                input
            }
            (AgentFrame::ClockSet(previous), _) if self.op == Op::Sent(Kind::Clock) => {
                let input = result.expect("clock set");
                assert_eq!(input.event, Some(ClientEvent::ClockSet(previous)));
                self.op_done();
                input
            }
            (AgentFrame::Stdout(out), _)
                if matches!(self.op, Op::Running(Kind::Exec | Kind::Attach)) =>
            {
                let input = result.expect("stdout");
                assert_eq!(input.event, Some(ClientEvent::Stdout(out.data.0)));
                assert_eq!(self.session.last_output_at(), out.at_us);
                input
            }
            (AgentFrame::Stderr(out), _)
                if matches!(self.op, Op::Running(Kind::Exec | Kind::Attach)) =>
            {
                let input = result.expect("stderr");
                assert_eq!(input.event, Some(ClientEvent::Stderr(out.data.0)));
                assert_eq!(self.session.last_output_at(), out.at_us);
                input
            }
            (AgentFrame::OutputDropped(dropped), _)
                if matches!(self.op, Op::Running(Kind::Exec | Kind::Attach)) =>
            {
                let input = result.expect("output dropped");
                assert_eq!(input.event, Some(ClientEvent::OutputDropped(dropped)));
                input
            }
            (AgentFrame::Keepalive, Phase::Running | Phase::Starting) if self.authenticated => {
                let input = result.expect("keepalive");
                assert_eq!(input.event, None);
                input
            }
            (AgentFrame::StdinCredit(n), _)
                if matches!(self.op, Op::Running(Kind::Exec | Kind::Put | Kind::Attach)) =>
            {
                let n = u64::from(n);
                if n > self.in_flight {
                    return fail(self, result, SessionError::CreditExceeded);
                }
                self.in_flight -= n;
                self.credit += n;
                self.credit_granted += n;
                let input = result.expect("credit");
                let available = if self.stdin_piped && !self.eof_queued {
                    self.credit
                } else {
                    0
                };
                assert_eq!(
                    input.event,
                    Some(ClientEvent::StdinCredit {
                        available: available as usize
                    })
                );
                input
            }
            (AgentFrame::Exited(end), _)
                if matches!(self.op, Op::Running(Kind::Exec | Kind::Attach)) =>
            {
                let input = result.expect("exited");
                assert_eq!(input.event, Some(ClientEvent::Exited(end)));
                self.op_done();
                self.stdin_piped = false;
                input
            }
            // A request refused before it started leaves a kept connection open (protocol 5).
            (AgentFrame::Error(err), Phase::Starting) if self.refusal_keeps(&err) => {
                let input = result.expect("refused");
                assert_eq!(input.event, Some(ClientEvent::Refused(err)));
                self.op_done();
                assert!(self.session.is_reusable());
                input
            }
            (
                AgentFrame::Error(err),
                Phase::Hello | Phase::Idle | Phase::Starting | Phase::Running,
            ) => {
                let input = result.expect("refused");
                assert_eq!(input.event, Some(ClientEvent::Refused(err)));
                self.failed = true;
                self.stdin_piped = false;
                input
            }
            _ => return fail(self, result, unexpected),
        };
        assert_eq!(event.consumed, used);
        Some(used)
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
                self.sent.extend_from_slice(&out[..n]);
                self.hello_sent |= self.hello_owed;
                if self.eof_queued && self.stdin_piped && !self.eof_sent {
                    self.eof_sent = true;
                    self.stdin_piped = false;
                }
                self.check_stream();
            }
            Err(err) => assert_eq!(err, SessionError::BufferTooSmall),
        }
    }

    fn start_exec(&mut self, request: u8, pipe: bool, room: u16, size: u16, shape: u8) {
        self.reuse();
        // A session that may not start an operation refuses before it looks at the request:
        // no need to build a large one.
        let allowed = self.op == Op::None && !self.failed && self.agent.is_some();
        let size = if allowed { size } else { 0 };
        let (argv, env) = request_lists(request, size, shape);
        let request = ExecRequest {
            argv: StrList::new(&argv),
            env: StrList::new(&env),
            clean_env: request & 8 != 0,
            cwd: (request & 16 != 0).then_some(Bytes(b"/tmp")),
            stdin: if pipe {
                StdinMode::Pipe
            } else {
                StdinMode::Null
            },
            user: match request >> 5 {
                0 | 1 => None,
                2 => Some(Bytes(b"nobody")),
                3 => Some(Bytes(b"0:0")),
                4 => Some(Bytes(b"")),
                5 => Some(Bytes(b"a\0b")),
                _ => Some(Bytes(&[b'u'; 300])),
            },
            pty: (shape & 128 != 0).then_some(WindowSize {
                rows: u16::from(shape),
                cols: size,
            }),
            timeout_ms: u64::from(size) * 1000,
            kill_grace_ms: (shape & 1 != 0).then_some(u32::from(size)),
            kill_tree_on_exit: shape & 2 != 0,
            max_output: u64::from(shape) << 10,
        };
        let needed = ClientSession::exec_buffer_len(&request);
        assert!(needed >= MAX_FRAME);
        let room = if room == 0 { needed } else { usize::from(room) };
        let mut out = vec![0u8; room];
        let valid = request.validate_within(&self.agent.unwrap_or(Limits::CURRENT));
        match self.session.start_exec(&request, &mut out) {
            Ok(n) => {
                assert!(self.op == Op::None && !self.failed && self.agent.is_some());
                assert!(valid.is_ok());
                assert!(n <= needed, "{n} bytes beyond exec_buffer_len {needed}");
                self.hello_sent = true;
                self.op = Op::Sent(Kind::Exec);
                self.stdin_piped = pipe;
                self.pty = request.pty.is_some();
                self.exec_lists = Some((argv.clone(), env.clone()));
                // Pieces go before the request: a refusal may come before the agent read them.
                self.op_traffic |= argv.len() > MAX_INLINE_LIST || env.len() > MAX_INLINE_LIST;
                self.sent.extend_from_slice(&out[..n]);
                self.check_stream();
            }
            Err(SessionError::InvalidState) => {
                assert!(self.op != Op::None || self.failed || self.agent.is_none())
            }
            Err(SessionError::InvalidRequest { message }) => {
                assert!(self.agent.is_some() && self.op == Op::None && !self.failed);
                assert_eq!(valid.map(|_| ()).map_err(|err| err.message), Err(message));
            }
            // A valid request always fits a buffer of `exec_buffer_len`.
            Err(SessionError::BufferTooSmall) => assert!(room < needed && valid.is_ok()),
            Err(err) => panic!("start_exec: {err}"),
        }
    }

    /// A signal, a resize or a cancel: refused when the request is wrong (a signal outside
    /// 1–64, a resize without a terminal) whatever the state, else only while an exec runs.
    fn control(&mut self, frame: ClientFrame<'_>, room: u8) {
        let room = if room == 0 {
            MAX_FRAME
        } else {
            usize::from(room % 8)
        };
        let mut out = vec![0u8; room];
        let result = match frame {
            ClientFrame::Signal(number) => self.session.send_signal(number, &mut out),
            ClientFrame::Resize(size) => self.session.send_resize(size, &mut out),
            ClientFrame::Cancel(cancel) => self.session.send_cancel(cancel.grace_ms, &mut out),
            _ => unreachable!("not a control frame"),
        };
        let mut encoded = vec![0u8; 64];
        let n = encode_client_frame(&frame, &mut encoded).expect("a control frame");
        encoded.truncate(n);
        let expected = match frame {
            ClientFrame::Signal(number) if !(1..=64).contains(&number) => {
                Err(SessionError::InvalidRequest {
                    message: "no such signal",
                })
            }
            ClientFrame::Resize(_) if !self.pty => Err(SessionError::InvalidRequest {
                message: "the command has no terminal",
            }),
            _ if self.failed
                || !matches!(
                    self.op,
                    Op::Sent(Kind::Exec | Kind::Attach) | Op::Running(Kind::Exec | Kind::Attach)
                ) =>
            {
                Err(SessionError::InvalidState)
            }
            _ if encoded.len() > room => Err(SessionError::BufferTooSmall),
            _ => Ok(encoded.len()),
        };
        assert_eq!(result, expected, "{frame:?}");
        if let Ok(n) = result {
            self.op_traffic = true;
            assert_eq!(out[..n], encoded[..], "{frame:?} encoded as it is");
            self.sent.extend_from_slice(&out[..n]);
            self.check_stream();
        }
    }

    fn start_kill_all(&mut self, room: u16) {
        self.reuse();
        let room = if room == 0 {
            MAX_FRAME
        } else {
            usize::from(room)
        };
        let mut out = vec![0u8; room];
        match self.session.start_kill_all(&mut out) {
            Ok(n) => {
                assert!(self.op == Op::None && !self.failed && self.agent.is_some());
                self.sent.extend_from_slice(&out[..n]);
                self.hello_sent = true;
                self.op = Op::Sent(Kind::Simple);
                self.check_stream();
            }
            Err(SessionError::InvalidState) => {
                assert!(self.op != Op::None || self.failed || self.agent.is_none())
            }
            Err(SessionError::BufferTooSmall) => assert!(room < 512),
            Err(err) => panic!("start_kill_all: {err}"),
        }
    }

    /// Starts an operation other than an exec: refused in a session that may not start one
    /// (before anything else), then for a request the model refuses; what it sends ends with
    /// `frame`, behind our hello and proof when those are still owed.
    fn start(
        &mut self,
        kind: Kind,
        frame: &ClientFrame<'_>,
        refusal: Option<&'static str>,
        room: u16,
        start: impl FnOnce(&mut ClientSession, &mut [u8]) -> Result<usize, SessionError>,
    ) {
        self.reuse();
        let room = if room == 0 {
            MAX_FRAME
        } else {
            usize::from(room)
        };
        let mut out = vec![0u8; room];
        let result = start(&mut self.session, &mut out);
        let encoded = encode(frame);
        if self.op != Op::None || self.failed || self.agent.is_none() {
            assert_eq!(result, Err(SessionError::InvalidState), "{frame:?}");
            return;
        }
        if let Some(message) = refusal {
            assert_eq!(result, Err(SessionError::InvalidRequest { message }));
            return;
        }
        let n = match result {
            Ok(n) => n,
            Err(err) => {
                // Our hello and proof take at most 128 bytes.
                assert_eq!(err, SessionError::BufferTooSmall, "{frame:?}");
                assert!(room < encoded.len() + 128, "{frame:?} in {room} bytes");
                return;
            }
        };
        assert!(n >= encoded.len() && out[n - encoded.len()..n] == encoded[..]);
        self.sent.extend_from_slice(&out[..n]);
        self.hello_sent = true;
        self.op = Op::Sent(kind);
        if kind == Kind::Put {
            self.stdin_piped = true;
        }
        self.check_stream();
    }

    fn send_stdin(&mut self, len: u32, room: u16) {
        let len = len as usize % (2 * MAX_DATA);
        let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let room = if room == 0 {
            MAX_FRAME
        } else {
            usize::from(room)
        };
        let mut out = vec![0u8; room];
        let result = self.session.send_stdin(&data, &mut out);
        if !self.stdin_open() || self.op == Op::None {
            assert_eq!(result, Err(SessionError::InvalidState));
            return;
        }
        let Ok(sent) = result else {
            assert_eq!(result, Err(SessionError::BufferTooSmall));
            assert!(room <= DATA_HEADROOM + 8 && self.credit > 0);
            return;
        };
        assert!(sent.taken as u64 <= self.credit && sent.taken <= MAX_DATA && sent.taken <= len);
        if sent.taken > 0 {
            self.sent.extend_from_slice(&out[..sent.written]);
            self.charge(sent.taken as u64);
        } else {
            assert_eq!(sent.written, 0);
        }
    }

    fn frame_stdin(&mut self, len: u32) {
        let len = len as usize % (2 * MAX_DATA);
        let mut buf = vec![0x5a; DATA_HEADROOM + len];
        let result = self.session.frame_stdin_in_place(&mut buf, len);
        if !self.stdin_open() || self.op == Op::None {
            assert!(result.is_err());
            return;
        }
        if len == 0 || len as u64 > self.credit || len > MAX_DATA {
            assert_eq!(result, Err(SessionError::CreditExceeded));
            return;
        }
        let start = result.expect("stdin within credit");
        self.sent.extend_from_slice(&buf[start..]);
        self.charge(len as u64);
    }

    fn charge(&mut self, n: u64) {
        self.op_traffic = true;
        self.credit -= n;
        self.in_flight += n;
        self.check_stream();
    }

    /// The client's stream, as an agent checks it.
    fn check_stream(&mut self) {
        let (frames, used) = whole_frames(&self.sent[self.checked..]);
        let frames: Vec<Vec<u8>> = frames.into_iter().map(<[u8]>::to_vec).collect();
        assert_eq!(
            self.checked + used,
            self.sent.len(),
            "the client sent part of a frame"
        );
        self.checked += used;
        for body in frames {
            match decode_client_frame(&body).expect("the client's frames decode") {
                ClientFrame::Hello(hello) => {
                    assert!(!self.stream_hello, "a second hello");
                    assert!(self.agent.is_some(), "our hello before the agent's");
                    assert_eq!(hello, ClientHello::CURRENT);
                    self.stream_hello = true;
                    self.tell_reference(&body);
                }
                ClientFrame::Auth(proof) => {
                    assert!(self.secure, "a proof without a secret");
                    assert!(self.stream_hello && !self.stream_auth && !self.stream_op);
                    assert_eq!(proof.nonce.0, CLIENT_NONCE);
                    self.stream_auth = true;
                    self.tell_reference(&body);
                }
                ClientFrame::ExecPart(part) => {
                    assert!(self.stream_hello && !self.stream_op);
                    assert!(!self.job.stream_start, "a job's request in pieces");
                    assert!(self.stream_auth || !self.secure, "a piece before the proof");
                    assert!(!part.data.0.is_empty() && part.data.0.len() <= MAX_DATA);
                    match part.list {
                        ListKind::Argv => self.stream_argv.extend_from_slice(part.data.0),
                        ListKind::Env => self.stream_env.extend_from_slice(part.data.0),
                    }
                }
                ClientFrame::Exec(request) => {
                    assert!(self.stream_hello && !self.stream_op);
                    assert!(self.stream_auth || !self.secure, "an exec before the proof");
                    // The pieces, then the exec's own lists, are the request, byte for byte.
                    for (parts, inline) in [
                        (&self.stream_argv, request.argv.as_bytes()),
                        (&self.stream_env, request.env.as_bytes()),
                    ] {
                        assert!(inline.len() <= MAX_INLINE_LIST);
                        if !parts.is_empty() {
                            assert_eq!(inline.len(), MAX_INLINE_LIST, "pieces, then a full exec");
                        }
                    }
                    let argv = [&self.stream_argv[..], request.argv.as_bytes()].concat();
                    let env = [&self.stream_env[..], request.env.as_bytes()].concat();
                    let (sent_argv, sent_env) = self.exec_lists.as_ref().expect("started");
                    assert!(argv == *sent_argv && env == *sent_env, "reassembly differs");
                    let whole = ExecRequest {
                        argv: StrList::new(&argv),
                        env: StrList::new(&env),
                        ..request
                    };
                    assert!(whole.validate().is_ok());
                    self.stream_op = true;
                    if !self.job.stream_start {
                        self.stream_exec = Some(request.stdin);
                    }
                }
                ClientFrame::Signal(number) => {
                    assert!(
                        self.stream_exec.is_some() || self.job.stream_attach,
                        "a signal before the exec or attach"
                    );
                    assert!((1..=64).contains(&number));
                }
                ClientFrame::Resize(_) | ClientFrame::Cancel(_) => {
                    assert!(
                        self.stream_exec.is_some() || self.job.stream_attach,
                        "a control before the exec or attach"
                    );
                }
                ClientFrame::KillAll => {
                    assert!(self.stream_hello && !self.stream_op);
                    assert!(
                        self.stream_auth || !self.secure,
                        "a kill-all before the proof"
                    );
                    self.stream_op = true;
                }
                ClientFrame::Stdin(data) => {
                    assert!(
                        self.stream_exec == Some(StdinMode::Pipe)
                            || (self.stream_put && !self.stream_put_end)
                            || (self.job.stream_attach && self.job.stdin_granted),
                        "stdin without a pipe, after the put's digest, or not granted"
                    );
                    assert!(!self.stream_eof, "stdin after EOF");
                    assert!(!data.0.is_empty() && data.0.len() <= MAX_DATA);
                    self.stdin_total += data.0.len() as u64;
                    let window = self.agent.map_or(0, |limits| {
                        u64::from(limits.stdin_window).min(STDIN_WINDOW as u64)
                    });
                    assert!(
                        self.stdin_total <= window + self.credit_granted,
                        "beyond credit"
                    );
                }
                ClientFrame::StdinEof => {
                    assert!(
                        self.stream_exec == Some(StdinMode::Pipe)
                            || (self.job.stream_attach && self.job.stdin_granted),
                        "an EOF, not for an exec or a granted attachment"
                    );
                    assert!(!self.stream_eof, "a second EOF");
                    self.stream_eof = true;
                }
                ClientFrame::PutEnd(_) => {
                    assert!(self.stream_put, "a digest without a put");
                    assert!(!self.stream_put_end, "a second digest");
                    self.stream_put_end = true;
                }
                ClientFrame::Put(_)
                | ClientFrame::Get(_)
                | ClientFrame::Info
                | ClientFrame::Shutdown(_)
                | ClientFrame::TimeSync(_)
                | ClientFrame::Reseed(_) => {
                    assert!(self.stream_hello && !self.stream_op);
                    assert!(
                        self.stream_auth || !self.secure,
                        "a request before the proof"
                    );
                    let limits = self.agent.expect("the agent's hello came");
                    let refusal = match decode_client_frame(&body).expect("decodes") {
                        ClientFrame::Put(request) => {
                            self.stream_put = true;
                            put_refusal(&request, &limits)
                        }
                        ClientFrame::Get(request) => get_refusal(&request, &limits),
                        ClientFrame::Shutdown(request) => shutdown_refusal(&request),
                        ClientFrame::TimeSync(now) => time_sync_refusal(&now),
                        ClientFrame::Reseed(random) => reseed_refusal(random.0),
                        _ => None,
                    };
                    assert_eq!(refusal, None, "an invalid request sent");
                    self.stream_op = true;
                }
                frame @ (ClientFrame::StartJob(_)
                | ClientFrame::Jobs(_)
                | ClientFrame::Attach(_)
                | ClientFrame::Wait(_)
                | ClientFrame::Kill(_)
                | ClientFrame::Remove(_)) => self.check_job_request(frame),
            }
        }
    }
}

fn encode(frame: &ClientFrame<'_>) -> Vec<u8> {
    let mut out = vec![0u8; MAX_FRAME];
    let n = encode_client_frame(frame, &mut out).expect("a client frame");
    out.truncate(n);
    out
}

/// The lists of a request: a small one (`request` picks it), or with `shape & 32` and `size` >
/// 0 one list (`shape` picks which, and its entries' length) beyond the inline bound, so the
/// client sends it in pieces: just beyond, up to 64 KiB, 256 KiB or 2 MiB beyond (`size`'s top
/// bits pick). Some are beyond the limits (bytes, entries, entry length).
fn request_lists(request: u8, size: u16, shape: u8) -> (Vec<u8>, Vec<u8>) {
    let small: &[u8] = match request % 5 {
        0 => b"cat\0",
        1 => b"sh\0-c\0echo hi\0",
        2 => b"",
        3 => b"no-nul",
        _ => b"a\0b\0c\0d\0e\0f\0g\0h\0",
    };
    if size == 0 || shape & 32 == 0 {
        return (small.to_vec(), b"LANG=C\0".to_vec());
    }
    let beyond = usize::from(size & 0x3fff);
    let total = MAX_INLINE_LIST
        + match size >> 14 {
            0 => beyond % 256,
            1 => beyond * 4,
            2 => beyond * 16,
            _ => beyond * 128,
        };
    // Up to just past the longest entry allowed.
    let entry = 1 + usize::from(shape % 64) * 2_100;
    let env = shape & 64 != 0;
    let mut list = if env { Vec::new() } else { b"big\0".to_vec() };
    while list.len() < total {
        let len = entry.min(total - list.len()).max(2);
        if env {
            list.extend_from_slice(b"K=");
            list.resize(list.len() + len.saturating_sub(3), b'v');
        } else {
            list.resize(list.len() + len - 1, b'a');
        }
        list.push(0);
    }
    if env {
        (small.to_vec(), list)
    } else {
        (list, b"LANG=C\0".to_vec())
    }
}

impl Run<'_> {
    /// Hands one frame of the client's (hello, proof) to the reference agent; once it took the
    /// proof, its own is the right one.
    fn tell_reference(&mut self, body: &[u8]) {
        let mut frame = (body.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(body);
        let Ok(input) = self.reference.handle_input(&frame, START) else {
            return;
        };
        assert_eq!(input.consumed, frame.len());
        if let Some(AgentEvent::Authenticated) = input.event {
            let mut out = vec![0u8; MAX_FRAME];
            let n = self.reference.poll_transmit(&mut out).expect("the proof");
            let (frames, _) = whole_frames(&out[..n]);
            let Ok(AgentFrame::Authenticated(proof)) = decode_agent_frame(frames[0]) else {
                panic!("no proof from the reference agent");
            };
            self.right_proof = Some(proof.mac.0.to_vec());
        }
    }
}

/// Protocol 5's detached jobs: starting them, the agent's answers, and the client's stream.
impl Run<'_> {
    fn job_step(&mut self, step: Step) {
        let limits = self.agent;
        let message = |refusal: Option<(ferry_wire::ErrorCode, &'static str)>| {
            refusal.map(|(_, message)| message)
        };
        match step {
            Step::StartJob {
                name,
                request,
                pipe,
                room,
                size,
                shape,
            } => self.start_job(name, request, pipe, room, size, shape),
            Step::StartJobs { request, room } => {
                let parts = request.parts();
                let query = request.query(&parts);
                let refusal = message(limits.and_then(|l| query_refusal(&query, &l)));
                self.start(
                    Kind::JobList,
                    &ClientFrame::Jobs(query),
                    refusal,
                    room,
                    |session, out| session.start_jobs(&query, out),
                );
            }
            Step::StartAttach { request, room } => {
                let parts = request.parts();
                let attach = request.attach(&parts);
                let refusal = message(limits.and_then(|l| attach_refusal(&attach, &l)));
                self.start(
                    Kind::Attach,
                    &ClientFrame::Attach(attach),
                    refusal,
                    room,
                    |session, out| session.start_attach(&attach, out),
                );
            }
            Step::StartWait { request, room } => {
                let parts = request.parts();
                let wait = request.request(&parts);
                let refusal = message(limits.and_then(|l| request_refusal(&wait, &l)));
                self.start(
                    Kind::Wait,
                    &ClientFrame::Wait(wait),
                    refusal,
                    room,
                    |session, out| session.start_wait(&wait, out),
                );
            }
            Step::StartKill { request, room } => {
                let parts = request.parts();
                let kill = request.kill(&parts);
                let refusal = message(limits.and_then(|l| kill_refusal(&kill, &l)));
                self.start(
                    Kind::Simple,
                    &ClientFrame::Kill(kill),
                    refusal,
                    room,
                    |session, out| session.start_kill(&kill, out),
                );
            }
            Step::StartRemove { request, room } => {
                let parts = request.parts();
                let remove = request.request(&parts);
                let refusal = message(limits.and_then(|l| request_refusal(&remove, &l)));
                self.start(
                    Kind::Simple,
                    &ClientFrame::Remove(remove),
                    refusal,
                    room,
                    |session, out| session.start_remove(&remove, out),
                );
            }
            other => panic!("{other:?} is no job step"),
        }
    }

    /// `start_job`: refused where no operation may start, then for its name, then for its
    /// request (as `start_exec` would), then for a request too large for one frame; else the
    /// job start and its exec, behind our hello and proof when owed. Its starter has no stdin.
    fn start_job(
        &mut self,
        name: NameChoice,
        request: u8,
        pipe: bool,
        room: u16,
        size: u16,
        shape: u8,
    ) {
        self.reuse();
        let allowed = self.op == Op::None && !self.failed && self.agent.is_some();
        let size = if allowed { size } else { 0 };
        let (argv, env) = request_lists(request, size, shape);
        let request = job_exec_request(&argv, &env, request, pipe, size, shape);
        let name = name.bytes();
        let room = if room == 0 {
            2 * MAX_FRAME
        } else {
            usize::from(room)
        };
        let mut out = vec![0u8; room];
        let result = self.session.start_job(name.as_deref(), &request, &mut out);
        let Some(limits) = self.agent.filter(|_| allowed) else {
            assert_eq!(result, Err(SessionError::InvalidState));
            return;
        };
        let refusal = start_refusal(name.as_deref())
            .map(|(_, message)| message)
            .or_else(|| request.validate_within(&limits).err().map(|e| e.message))
            .or_else(|| {
                (argv.len() > MAX_INLINE_LIST || env.len() > MAX_INLINE_LIST)
                    .then_some("a job's request must fit in one exec frame")
            });
        if let Some(message) = refusal {
            assert_eq!(result, Err(SessionError::InvalidRequest { message }));
            return;
        }
        let start = ClientFrame::StartJob(ferry_wire::JobStart {
            name: name.as_deref().map(Bytes),
        });
        let encoded = [encode(&start), encode(&ClientFrame::Exec(request))].concat();
        let n = match result {
            Ok(n) => n,
            Err(err) => {
                // Our hello and proof take at most 128 bytes.
                assert_eq!(err, SessionError::BufferTooSmall);
                assert!(room < encoded.len() + 128, "a job start in {room} bytes");
                return;
            }
        };
        assert!(n >= encoded.len() && out[n - encoded.len()..n] == encoded[..]);
        self.sent.extend_from_slice(&out[..n]);
        self.hello_sent = true;
        self.op = Op::Sent(Kind::Job);
        self.exec_lists = Some((argv.clone(), env.clone()));
        self.check_stream();
    }

    /// Whether `frame` answers the job operation under way (else the other rules judge it).
    fn job_answer(&self, frame: &AgentFrame<'_>) -> bool {
        match frame {
            AgentFrame::Done(_) => matches!(
                self.op,
                Op::Sent(Kind::JobList) | Op::Running(Kind::JobList) | Op::Running(Kind::Attach)
            ),
            AgentFrame::Job(_) => {
                matches!(
                    self.op,
                    Op::Sent(Kind::JobList) | Op::Running(Kind::JobList)
                )
            }
            AgentFrame::Detached(_) => self.op == Op::Sent(Kind::Job),
            AgentFrame::Attached(_) => self.op == Op::Sent(Kind::Attach),
            AgentFrame::Exited(_) => self.op == Op::Sent(Kind::Wait),
            _ => false,
        }
    }

    /// The event a job frame must give (the model moves on), or the error it must be.
    fn job_frame_event<'f>(
        &mut self,
        frame: AgentFrame<'f>,
    ) -> Result<ClientEvent<'f>, SessionError> {
        match frame {
            // A listing's count is its records; an attachment's `Done` ends it unfollowed.
            AgentFrame::Done(report) if self.op == Op::Running(Kind::Attach) => {
                self.op_done();
                self.stdin_piped = false;
                Ok(ClientEvent::Done(report))
            }
            AgentFrame::Done(report) => {
                if report.count as usize != self.job.items {
                    return Err(SessionError::InvalidRequest {
                        message: "the job listing's count does not match its records",
                    });
                }
                self.op_done();
                Ok(ClientEvent::Done(report))
            }
            AgentFrame::Job(record) => {
                if self.job.items >= MAX_JOBS {
                    return Err(SessionError::InvalidRequest {
                        message: "too many job records",
                    });
                }
                self.job.items += 1;
                self.op = Op::Running(Kind::JobList);
                Ok(ClientEvent::Job(record))
            }
            AgentFrame::Detached(job) => {
                self.op_done();
                Ok(ClientEvent::Detached(job))
            }
            AgentFrame::Attached(header) => {
                self.op = Op::Running(Kind::Attach);
                self.stdin_piped = header.stdin;
                self.job.stdin_granted = header.stdin;
                // A job may have a terminal: a resize is the agent's to ignore.
                self.pty = true;
                Ok(ClientEvent::Attached(header))
            }
            AgentFrame::Exited(end) => {
                self.op_done();
                Ok(ClientEvent::Exited(end))
            }
            other => panic!("{other:?} answers no job operation"),
        }
    }

    /// A job request on the client's stream: after our hello (and proof), alone, valid by the
    /// model's rules; a job start only before its exec (with no pieces).
    fn check_job_request(&mut self, frame: ClientFrame<'_>) {
        assert!(self.stream_hello && !self.stream_op);
        assert!(
            self.stream_auth || !self.secure,
            "a job request before the proof"
        );
        assert!(!self.job.stream_start, "only its exec follows a job start");
        let limits = self.agent.expect("the agent's hello came");
        let refusal = match frame {
            ClientFrame::StartJob(start) => {
                assert!(self.stream_argv.is_empty() && self.stream_env.is_empty());
                self.job.stream_start = true;
                start_refusal(start.name.map(|name| name.0))
            }
            ClientFrame::Jobs(query) => query_refusal(&query, &limits),
            ClientFrame::Attach(request) => {
                self.job.stream_attach = true;
                attach_refusal(&request, &limits)
            }
            ClientFrame::Wait(request) | ClientFrame::Remove(request) => {
                request_refusal(&request, &limits)
            }
            ClientFrame::Kill(kill) => kill_refusal(&kill, &limits),
            other => panic!("{other:?} is no job request"),
        };
        assert_eq!(refusal, None, "an invalid job request sent");
        // A job start's operation is its exec, which follows.
        self.stream_op = !self.job.stream_start;
    }
}

/// A job's exec request, built as `start_exec` builds one.
fn job_exec_request<'a>(
    argv: &'a [u8],
    env: &'a [u8],
    request: u8,
    pipe: bool,
    size: u16,
    shape: u8,
) -> ExecRequest<'a> {
    ExecRequest {
        argv: StrList::new(argv),
        env: StrList::new(env),
        clean_env: request & 8 != 0,
        cwd: (request & 16 != 0).then_some(Bytes(b"/tmp")),
        stdin: if pipe {
            StdinMode::Pipe
        } else {
            StdinMode::Null
        },
        user: match request >> 5 {
            0..=3 => None,
            4 => Some(Bytes(b"")),
            5 => Some(Bytes(b"a\0b")),
            _ => Some(Bytes(b"nobody")),
        },
        pty: (shape & 128 != 0).then_some(WindowSize {
            rows: u16::from(shape),
            cols: size,
        }),
        timeout_ms: u64::from(size) * 1000,
        kill_grace_ms: (shape & 1 != 0).then_some(u32::from(size)),
        kill_tree_on_exit: shape & 2 != 0,
        max_output: u64::from(shape) << 10,
    }
}

/// The job operation a stream answers (its first job frame says which), so that a seeded job
/// conversation is replayed by the client that asked for it: a start, a listing, an attach that
/// asks for stdin, a wait.
fn job_start_for(wire: &[u8]) -> Option<Step> {
    let (frames, _) = whole_frames(wire);
    let choice = |job: u16| JobRequestChoice {
        job: ferry_wire_fuzz::jobs::JobChoice(job),
        user: ferry_wire_fuzz::ops::UserChoice(0),
        since_stdout: 0,
        since_stderr: 0,
        follow: true,
        stdin: true,
        signal: 0,
        grace_ms: None,
    };
    let started = frames
        .iter()
        .any(|body| matches!(decode_agent_frame(body), Ok(AgentFrame::Started(_))));
    frames
        .iter()
        .find_map(|body| match decode_agent_frame(body) {
            Ok(AgentFrame::Detached(_)) => Some(Step::StartJob {
                name: NameChoice(Some(ferry_wire_fuzz::jobs::JobChoice(0))),
                request: 0,
                pipe: false,
                room: 0,
                size: 0,
                shape: 0,
            }),
            Ok(AgentFrame::Job(_)) => Some(Step::StartJobs {
                request: choice(0),
                room: 0,
            }),
            Ok(AgentFrame::Attached(_)) => Some(Step::StartAttach {
                request: choice(0),
                room: 0,
            }),
            // A record with nothing before it answers a wait.
            Ok(AgentFrame::Exited(_)) if !started => Some(Step::StartWait {
                request: choice(0),
                room: 0,
            }),
            _ => None,
        })
}

/// Protocol 5's keep-alive connections: after an operation's final frame, another may start on
/// the same connection when the agent announced `idle_ms`.
impl Run<'_> {
    /// The operation's final frame came.
    fn op_done(&mut self) {
        self.op = Op::Done;
        self.stdin_piped = false;
        self.reusable = self.agent.is_some_and(|limits| limits.idle_ms > 0);
    }

    /// Whether `err`, the answer to a request that has not started, leaves the connection to
    /// another operation: a refusal (no breach), after the agent's proof, with nothing else of
    /// the operation on its way, from an agent that keeps connections.
    fn refusal_keeps(&self, err: &ferry_wire::ErrorFrame<'_>) -> bool {
        use ferry_wire::ErrorCode;
        let breach = matches!(
            err.code,
            ErrorCode::UnsupportedVersion
                | ErrorCode::Malformed
                | ErrorCode::FrameTooLarge
                | ErrorCode::ProtocolViolation
                | ErrorCode::Unauthenticated
        );
        self.authenticated
            && !self.op_traffic
            && !breach
            && matches!(self.op, Op::Sent(_))
            && self.agent.is_some_and(|limits| limits.idle_ms > 0)
    }

    /// Any `start_*` on a reusable connection first starts every per-operation fact over
    /// (the agent's whole window is credit again), whether the request is then accepted or not.
    fn reuse(&mut self) {
        assert_eq!(
            self.session.is_reusable(),
            !self.failed && self.op == Op::Done && self.reusable
        );
        if !self.session.is_reusable() {
            return;
        }
        let window = self
            .agent
            .map_or(0, |limits| u64::from(limits.stdin_window))
            .min(STDIN_WINDOW as u64);
        self.op = Op::None;
        self.stdin_piped = false;
        self.eof_queued = false;
        self.eof_sent = false;
        self.credit = window;
        self.in_flight = 0;
        self.pty = false;
        self.heard_at = None;
        self.put_ended = false;
        self.info_items = 0;
        self.job = JobModel::default();
        self.reusable = false;
        self.op_traffic = false;
        // The client's stream, per operation.
        self.stream_op = false;
        self.stream_exec = None;
        self.stream_eof = false;
        self.stdin_total = 0;
        self.credit_granted = 0;
        self.exec_lists = None;
        self.stream_argv.clear();
        self.stream_env.clear();
        self.stream_put = false;
        self.stream_put_end = false;
    }
}
