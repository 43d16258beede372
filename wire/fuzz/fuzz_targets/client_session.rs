//! The client's session under arbitrary agent bytes, in arbitrary pieces, with the host's
//! commands (start an exec, send stdin by copy or in place, close stdin, timeouts, EOF) in an
//! order the fuzzer chooses. Beside "no panic", a model of the protocol checks which frames are
//! accepted and which are a typed error, that every event says what its frame said, that nothing
//! is accepted after the end or after an error, and the client's own stream: the hello first and
//! once, one request, stdin only while piped and open and never beyond the credit granted.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use ferry_wire::limits::{MAX_DATA, MAX_FRAME, MAX_FRAME_BODY, STDIN_WINDOW};
use ferry_wire::session::{ClientEvent, ClientSession, FrameKind, Micros, Phase, SessionError};
use ferry_wire::{
    decode_agent_frame, decode_client_frame, split_frame, AgentFrame, Bytes, ClientFrame,
    ClientHello, ExecRequest, Limits, StdinMode, StrList, DATA_HEADROOM, MAGIC,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use ferry_wire_fuzz::{arbitrary_steps, split_input, whole_frames};
use libfuzzer_sys::fuzz_target;

/// One move of the host's driver.
#[derive(Arbitrary, Debug)]
enum Step {
    /// Receive the next `len` bytes of the agent's stream and handle every whole frame.
    Receive { len: u16 },
    /// `poll_transmit` into a buffer of `room` bytes (0: a whole frame's).
    Transmit { room: u16 },
    /// Start an exec: which request, into a buffer of `room` bytes (0: a whole frame's).
    StartExec { request: u8, pipe: bool, room: u16 },
    /// Send `len` bytes of stdin by copy into a buffer of `room` bytes (0: a whole frame's).
    SendStdin { len: u32, room: u16 },
    /// Frame `len` bytes of stdin in place.
    FrameStdin { len: u32 },
    /// Close stdin.
    CloseStdin,
    /// Time passes; the driver checks the deadline.
    Advance { micros: u32 },
    /// The agent's stream ended.
    Eof,
}

fuzz_target!(|data: &[u8]| {
    let (choices, wire) = split_input(data);
    let mut u = Unstructured::new(choices);
    let hello_timeout = match u.arbitrary::<u8>().unwrap_or(0) {
        0 => None,
        n => Some(u64::from(n) * 1_000),
    };
    let steps: Vec<Step> = arbitrary_steps(&mut u);
    let mut run = Run::new(hello_timeout, wire);
    for step in steps {
        run.step(step);
    }
    // Then as the host library would go on: send, take the rest, write stdin, close, end.
    for step in [
        Step::StartExec {
            request: 0,
            pipe: true,
            room: 0,
        },
        Step::Transmit { room: 0 },
        Step::Receive { len: 0 },
        Step::SendStdin { len: 10, room: 0 },
        Step::CloseStdin,
        Step::Transmit { room: 0 },
        Step::Eof,
    ] {
        run.step(step);
    }
});

const START: Micros = 1_000;

/// Where the operation stands, as the model sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    None,
    ExecSent,
    Running,
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
    hello_sent: bool,
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
    stream_exec: Option<StdinMode>,
    stream_eof: bool,
    stdin_total: u64,
    credit_granted: u64,
}

impl<'a> Run<'a> {
    fn new(hello_timeout: Option<Micros>, wire: &'a [u8]) -> Self {
        Run {
            session: ClientSession::new(START, hello_timeout),
            now: START,
            hello_deadline: hello_timeout.map(|t| START + t),
            wire,
            received: 0,
            inbox: Vec::new(),
            hello_sent: false,
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
            stream_exec: None,
            stream_eof: false,
            stdin_total: 0,
            credit_granted: 0,
        }
    }

    fn phase(&self) -> Phase {
        match (self.agent, self.op) {
            _ if self.failed => Phase::Done,
            (_, Op::Done) => Phase::Done,
            (None, _) => Phase::Hello,
            (_, Op::Running) => Phase::Running,
            (_, Op::ExecSent) => Phase::Starting,
            (Some(_), Op::None) => Phase::Idle,
        }
    }

    fn stdin_open(&self) -> bool {
        self.stdin_piped && !self.eof_queued && self.phase() != Phase::Done
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
        match step {
            Step::Receive { len } => self.receive(len),
            Step::Transmit { room } => self.transmit(room),
            Step::StartExec {
                request,
                pipe,
                room,
            } => self.start_exec(request, pipe, room),
            Step::SendStdin { len, room } => self.send_stdin(len, room),
            Step::FrameStdin { len } => self.frame_stdin(len),
            Step::CloseStdin => {
                let result = self.session.close_stdin();
                if self.op == Op::None {
                    assert_eq!(result, Err(SessionError::InvalidState));
                } else {
                    assert_eq!(result, Ok(()));
                    if self.stdin_piped && self.phase() != Phase::Done {
                        self.eof_queued = true;
                    }
                }
            }
            Step::Advance { micros } => {
                self.now = self.now.saturating_add(u64::from(micros) * 4);
                let armed = self.agent.is_none() && !self.failed;
                let expired = armed && self.hello_deadline.is_some_and(|d| self.now >= d);
                let result = self.session.handle_timeout(self.now);
                if expired {
                    assert_eq!(
                        result,
                        Err(SessionError::TimedOut {
                            phase: Phase::Hello
                        })
                    );
                    self.failed = true;
                } else {
                    assert_eq!(result, Ok(()));
                }
                let deadline = if self.agent.is_none() && !self.failed {
                    self.hello_deadline
                } else {
                    None
                };
                assert_eq!(self.session.poll_timeout(), deadline);
            }
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

    fn receive(&mut self, len: u16) {
        let rest = &self.wire[self.received..];
        let take = if len == 0 {
            rest.len()
        } else {
            usize::from(len).min(rest.len())
        };
        self.inbox.extend_from_slice(&rest[..take]);
        self.received += take;
        loop {
            let inbox = std::mem::take(&mut self.inbox);
            let result = self.session.handle_input(&inbox);
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
            frame: agent_kind(&frame),
            phase,
        };
        let event = match (frame, phase) {
            (AgentFrame::Hello(hello), Phase::Hello | Phase::Starting)
                if self.hello_sent && self.agent.is_none() =>
            {
                if hello.magic != MAGIC {
                    return fail(self, result, SessionError::NotFerry);
                }
                if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&hello.version) {
                    return fail(
                        self,
                        result,
                        SessionError::UnsupportedVersion {
                            chosen: hello.version,
                        },
                    );
                }
                let input = result.expect("the agent's hello");
                let Some(ClientEvent::HelloAccepted(info)) = input.event else {
                    panic!("{:?}", input.event);
                };
                assert_eq!(info.protocol_version, hello.version);
                assert_eq!(info.agent_version, hello.agent_version);
                assert_eq!(info.limits, hello.limits);
                self.credit = u64::from(hello.limits.stdin_window)
                    .min(STDIN_WINDOW as u64)
                    .saturating_sub(self.in_flight);
                self.agent = Some(hello.limits);
                assert_eq!(self.session.agent_limits(), Some(hello.limits));
                input
            }
            (AgentFrame::Started(started), Phase::Starting) if self.agent.is_some() => {
                let input = result.expect("started");
                assert_eq!(input.event, Some(ClientEvent::Started { pid: started.pid }));
                self.op = Op::Running;
                input
            }
            (AgentFrame::Stdout(data), Phase::Running) => {
                let input = result.expect("stdout");
                assert_eq!(input.event, Some(ClientEvent::Stdout(data.0)));
                input
            }
            (AgentFrame::Stderr(data), Phase::Running) => {
                let input = result.expect("stderr");
                assert_eq!(input.event, Some(ClientEvent::Stderr(data.0)));
                input
            }
            (AgentFrame::StdinCredit(n), Phase::Running) => {
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
            (AgentFrame::Exited(end), Phase::Running) => {
                let input = result.expect("exited");
                assert_eq!(input.event, Some(ClientEvent::Exited(end)));
                self.op = Op::Done;
                self.stdin_piped = false;
                input
            }
            (
                AgentFrame::Error(err),
                Phase::Hello | Phase::Idle | Phase::Starting | Phase::Running,
            ) if self.hello_sent => {
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
                self.hello_sent = true;
                if self.eof_queued && self.stdin_piped && !self.eof_sent {
                    self.eof_sent = true;
                    self.stdin_piped = false;
                }
                self.check_stream();
            }
            Err(err) => assert_eq!(err, SessionError::BufferTooSmall),
        }
    }

    fn start_exec(&mut self, request: u8, pipe: bool, room: u16) {
        let argv: &[u8] = match request % 5 {
            0 => b"cat\0",
            1 => b"sh\0-c\0echo hi\0",
            2 => b"",
            3 => b"no-nul",
            _ => b"a\0b\0c\0d\0e\0f\0g\0h\0",
        };
        let request = ExecRequest {
            argv: StrList::new(argv),
            env: StrList::new(b"LANG=C\0"),
            clean_env: request & 8 != 0,
            cwd: (request & 16 != 0).then_some(Bytes(b"/tmp")),
            stdin: if pipe {
                StdinMode::Pipe
            } else {
                StdinMode::Null
            },
        };
        let room = if room == 0 {
            MAX_FRAME
        } else {
            usize::from(room)
        };
        let mut out = vec![0u8; room];
        let valid = request
            .validate_within(&self.agent.unwrap_or(Limits::CURRENT))
            .is_ok();
        match self.session.start_exec(&request, &mut out) {
            Ok(n) => {
                assert!(self.op == Op::None && !self.failed && valid);
                self.sent.extend_from_slice(&out[..n]);
                self.hello_sent = true;
                self.op = Op::ExecSent;
                self.stdin_piped = pipe;
                self.check_stream();
            }
            Err(SessionError::InvalidState) => assert!(self.op != Op::None || self.failed),
            Err(SessionError::InvalidRequest { .. }) => assert!(!valid),
            Err(SessionError::BufferTooSmall) => assert!(room < 512),
            Err(err) => panic!("start_exec: {err}"),
        }
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
                    assert_eq!(hello, ClientHello::CURRENT);
                    self.stream_hello = true;
                }
                ClientFrame::Exec(request) => {
                    assert!(self.stream_hello && self.stream_exec.is_none());
                    assert!(request.validate().is_ok());
                    self.stream_exec = Some(request.stdin);
                }
                ClientFrame::Stdin(data) => {
                    assert_eq!(
                        self.stream_exec,
                        Some(StdinMode::Pipe),
                        "stdin without a pipe"
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
                    assert_eq!(self.stream_exec, Some(StdinMode::Pipe));
                    assert!(!self.stream_eof, "a second EOF");
                    self.stream_eof = true;
                }
            }
        }
    }
}

fn agent_kind(frame: &AgentFrame<'_>) -> FrameKind {
    match frame {
        AgentFrame::Hello(_) => FrameKind::Hello,
        AgentFrame::Started(_) => FrameKind::Started,
        AgentFrame::Stdout(_) => FrameKind::Stdout,
        AgentFrame::Stderr(_) => FrameKind::Stderr,
        AgentFrame::StdinCredit(_) => FrameKind::StdinCredit,
        AgentFrame::Exited(_) => FrameKind::Exited,
        AgentFrame::Error(_) => FrameKind::Error,
        AgentFrame::Ready(_) => FrameKind::Ready,
    }
}
