//! Valid frames in random orders: the agent session fed sequences of well-formed client frames
//! (hello, exec and pieces of one, stdin, EOF, signals, resizes, cancels) in any order, in random
//! pieces, with the driver starting the command, sending and consuming stdin, and half-closing
//! at random points. A grammar of the conversation says where the first frame out of place is;
//! up to it every frame must be accepted with its event, and it must end the conversation with
//! the typed error, then exactly one error frame (behind the hello, if that was still owed) and
//! nothing more — never a panic, never a silent accept. A half-close mid-operation ends the
//! input and nothing else.
//!
//! Protocol 4's requests join them: a put (its content as stdin within the window, then its
//! digest, never an EOF; a close before the digest abandons it), a get, an info, a shutdown, a
//! time sync, a reseed (none after pieces of an exec request); controls are for an exec alone,
//! and nothing at all may follow a request the driver answers in one go.
//!
//! `tests.rs` breaks each rule once by hand and the simulated pair (`sim.rs`) only runs valid
//! conversations; this covers the orders in between.

use proptest::prelude::*;

use super::*;
use crate::limits::{MAX_FRAME, MAX_FRAME_BODY};
use crate::msg::*;
use crate::ops::{FileHeader, GetRequest, PutRequest, ShutdownRequest, Timestamp, TransferKind};
use crate::{decode_agent_frame, encode_client_frame, split_frame, ByteArray, Bytes};

/// A small stdin window, so credit is exceeded by a handful of frames.
const WINDOW: usize = 100;

/// A well-formed client frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    Hello,
    Exec(StdinMode),
    Stdin(usize),
    Eof,
    /// Any number: 1–64 are signals, others are refused.
    Signal(u8),
    Resize,
    Cancel(Option<u32>),
    /// A piece of the request's argv or environment (see [`PIECES`]).
    Part(usize),
    Put,
    PutEnd,
    Get,
    /// An info, a shutdown, a time sync or a reseed (0–3): answered in one go.
    Simple(u8),
}

/// The pieces a client may send before its exec: whole entries, an argv entry the next piece
/// (or the exec's argv) completes, and an environment entry that breaks the rules (its key is
/// empty).
const PIECES: [(ListKind, &[u8]); 4] = [
    (ListKind::Argv, b"x\0"),
    (ListKind::Argv, b"y"),
    (ListKind::Env, b"A=1\0"),
    (ListKind::Env, b"=x\0"),
];

impl Sent {
    fn kind(self) -> FrameKind {
        match self {
            Sent::Hello => FrameKind::Hello,
            Sent::Exec(_) => FrameKind::Exec,
            Sent::Stdin(_) => FrameKind::Stdin,
            Sent::Eof => FrameKind::StdinEof,
            Sent::Signal(_) => FrameKind::Signal,
            Sent::Resize => FrameKind::Resize,
            Sent::Cancel(_) => FrameKind::Cancel,
            Sent::Part(_) => FrameKind::ExecPart,
            Sent::Put => FrameKind::Put,
            Sent::PutEnd => FrameKind::PutEnd,
            Sent::Get => FrameKind::Get,
            Sent::Simple(0) => FrameKind::Info,
            Sent::Simple(1) => FrameKind::Shutdown,
            Sent::Simple(2) => FrameKind::TimeSync,
            Sent::Simple(_) => FrameKind::Reseed,
        }
    }

    fn encode(self, out: &mut Vec<u8>) {
        let data = [0x42u8; 64];
        let frame = match self {
            Sent::Hello => ClientFrame::Hello(ClientHello::CURRENT),
            Sent::Exec(stdin) => ClientFrame::Exec(ExecRequest {
                argv: StrList::new(b"cat\0"),
                env: StrList::new(b"A=b\0"),
                clean_env: false,
                cwd: None,
                stdin,
                user: None,
                pty: None,
                timeout_ms: 0,
                kill_grace_ms: None,
                kill_tree_on_exit: false,
                max_output: 0,
            }),
            Sent::Stdin(n) => ClientFrame::Stdin(Bytes(&data[..n])),
            Sent::Eof => ClientFrame::StdinEof,
            Sent::Signal(number) => ClientFrame::Signal(number),
            Sent::Resize => ClientFrame::Resize(SIZE),
            Sent::Cancel(grace_ms) => ClientFrame::Cancel(Cancel { grace_ms }),
            Sent::Part(index) => ClientFrame::ExecPart(ExecPart {
                list: PIECES[index].0,
                data: Bytes(PIECES[index].1),
            }),
            Sent::Put => ClientFrame::Put(PutRequest {
                path: Bytes(b"/srv/f"),
                kind: TransferKind::File,
                mode: Some(0o600),
                owner: None,
                mtime: None,
                size: None,
                create_parents: false,
                no_clobber: false,
                user: None,
            }),
            Sent::PutEnd => ClientFrame::PutEnd(ByteArray([7; 32])),
            Sent::Get => ClientFrame::Get(GetRequest {
                path: Bytes(b"/srv/f"),
                kind: TransferKind::Tree,
                user: None,
            }),
            Sent::Simple(0) => ClientFrame::Info,
            Sent::Simple(1) => ClientFrame::Shutdown(ShutdownRequest {
                reboot: true,
                grace_ms: 10,
            }),
            Sent::Simple(2) => ClientFrame::TimeSync(Timestamp { secs: 1, nanos: 2 }),
            Sent::Simple(_) => ClientFrame::Reseed(Bytes(&data[..8])),
        };
        let mut buf = vec![0u8; MAX_FRAME];
        let n = encode_client_frame(&frame, &mut buf).expect("a valid frame encodes");
        out.extend_from_slice(&buf[..n]);
    }
}

const SIZE: WindowSize = WindowSize { rows: 24, cols: 80 };

const HEADER: FileHeader = FileHeader {
    size: 0,
    mode: 0o040755,
    mtime: Timestamp { secs: 0, nanos: 0 },
    uid: 0,
    gid: 0,
};

fn sent() -> impl Strategy<Value = Sent> {
    prop_oneof![
        2 => Just(Sent::Hello),
        2 => Just(Sent::Exec(StdinMode::Pipe)),
        1 => Just(Sent::Exec(StdinMode::Null)),
        4 => (1usize..=48).prop_map(Sent::Stdin),
        2 => Just(Sent::Eof),
        1 => prop_oneof![9 => 1u8..=64, 1 => Just(0u8), 1 => 65u8..=255].prop_map(Sent::Signal),
        1 => Just(Sent::Resize),
        1 => any::<Option<u32>>().prop_map(Sent::Cancel),
        2 => prop_oneof![3 => 0usize..3, 1 => Just(3usize)].prop_map(Sent::Part),
        1 => Just(Sent::Put),
        2 => Just(Sent::PutEnd),
        1 => Just(Sent::Get),
        1 => (0u8..4).prop_map(Sent::Simple),
    ]
}

/// The driver's choices: where the stream is cut, and what the driver does after each piece.
#[derive(Debug, Clone)]
struct Driver {
    /// Piece sizes (cycled).
    pieces: Vec<usize>,
    /// Per piece: start the command now (once an exec arrived), send what is queued, write the
    /// stdin received to the command.
    acts: Vec<(bool, bool, bool)>,
    /// After this piece the client's stream ends (a half-close, or a close).
    eof_after: Option<usize>,
}

fn driver() -> impl Strategy<Value = Driver> {
    (
        prop::collection::vec(1usize..40, 1..8),
        prop::collection::vec(any::<(bool, bool, bool)>(), 1..8),
        prop::option::weighted(0.3, 0usize..24),
    )
        .prop_map(|(pieces, acts, eof_after)| Driver {
            pieces,
            acts,
            eof_after,
        })
}

/// Where the grammar puts the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Accept,
    /// The session's error and the code of the error frame.
    Breach(SessionError, ErrorCode),
}

/// The conversation as a grammar: hello, pieces of a request (within the list rules), one
/// exec, then stdin within the window and one EOF while the command has a pipe, and signals
/// (1–64), resizes and cancels while it starts or runs, and nothing else.
#[derive(Debug, Default)]
struct Grammar {
    hello: bool,
    /// Pieces of the request taken.
    parts: bool,
    /// The request taken: an exec's stdin mode (for the others see `op`).
    exec: Option<StdinMode>,
    op: Option<Op>,
    /// A put's digest came.
    put_ended: bool,
    started: bool,
    eof: bool,
    /// Stdin taken, and credited back (as the agent's credit frames say).
    stdin: usize,
    credit: usize,
}

/// The request a conversation carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Exec,
    Put,
    Get,
    /// Answered in one go by the driver.
    Simple,
}

impl Grammar {
    fn phase(&self) -> Phase {
        match (self.hello, self.op, self.started) {
            (false, _, _) => Phase::Hello,
            (true, None, _) => Phase::Idle,
            (true, Some(_), false) => Phase::Starting,
            (true, Some(_), true) => Phase::Running,
        }
    }

    fn next(&mut self, frame: Sent) -> Expect {
        let unexpected = Expect::Breach(
            SessionError::Unexpected {
                frame: frame.kind(),
                phase: self.phase(),
            },
            ErrorCode::ProtocolViolation,
        );
        let invalid = |message| {
            Expect::Breach(
                SessionError::InvalidRequest { message },
                ErrorCode::InvalidRequest,
            )
        };
        let put = self.op == Some(Op::Put) && !self.put_ended;
        let piped = (self.exec == Some(StdinMode::Pipe) && !self.eof) || put;
        let operation =
            matches!(self.phase(), Phase::Starting | Phase::Running) && self.op == Some(Op::Exec);
        match (self.phase(), frame) {
            (Phase::Hello, Sent::Hello) => self.hello = true,
            // An environment entry with an empty key is refused where it starts.
            (Phase::Idle, Sent::Part(3)) => return invalid("environment entry is not KEY=VALUE"),
            (Phase::Idle, Sent::Part(_)) => self.parts = true,
            (Phase::Idle, Sent::Exec(mode)) => {
                self.exec = Some(mode);
                self.op = Some(Op::Exec);
            }
            // After pieces, only their exec.
            (Phase::Idle, Sent::Put | Sent::Get | Sent::Simple(_)) if self.parts => {
                return unexpected
            }
            (Phase::Idle, Sent::Put) => self.op = Some(Op::Put),
            (Phase::Idle, Sent::Get) => self.op = Some(Op::Get),
            (Phase::Idle, Sent::Simple(_)) => self.op = Some(Op::Simple),
            (Phase::Starting | Phase::Running, Sent::PutEnd) if put => self.put_ended = true,
            (Phase::Starting | Phase::Running, Sent::Stdin(n)) if piped => {
                if self.stdin - self.credit + n > WINDOW {
                    return Expect::Breach(
                        SessionError::CreditExceeded,
                        ErrorCode::ProtocolViolation,
                    );
                }
                self.stdin += n;
            }
            (Phase::Starting | Phase::Running, Sent::Eof) if piped && !put => self.eof = true,
            (_, Sent::Signal(number)) if operation && !(1..=64).contains(&number) => {
                return invalid("no such signal")
            }
            (_, Sent::Signal(_) | Sent::Resize | Sent::Cancel(_)) if operation => {}
            _ => return unexpected,
        }
        Expect::Accept
    }
}

/// What the agent sent, frame by frame.
#[derive(Debug, Default)]
struct Seen {
    hellos: usize,
    errors: Vec<ErrorCode>,
    others: usize,
    credit: usize,
}

fn read_sent(bytes: &[u8], seen: &mut Seen) {
    let mut rest = bytes;
    while let Ok(Some((body, used))) = split_frame(rest, MAX_FRAME_BODY) {
        match decode_agent_frame(body).expect("the agent's frames decode") {
            AgentFrame::Hello(_) => seen.hellos += 1,
            AgentFrame::Error(err) => seen.errors.push(err.code),
            AgentFrame::StdinCredit(n) => {
                seen.credit += n as usize;
                seen.others += 1;
            }
            _ => seen.others += 1,
        }
        rest = &rest[used..];
    }
    assert!(rest.is_empty(), "the agent sent part of a frame");
}

/// Runs one conversation; checks it against the grammar.
fn converse(frames: &[Sent], driver: &Driver) -> Result<(), TestCaseError> {
    let config = AgentConfig {
        limits: Limits {
            stdin_window: WINDOW as u32,
            ..Limits::CURRENT
        },
        ..AgentConfig::DEFAULT
    };
    // Insecure: the grammar under test is the frames' order after the handshake; the proof
    // step has its own tests (auth_tests.rs).
    let auth = super::AgentAuth {
        nonce: [0; crate::limits::NONCE_LEN],
        secret: None,
    };
    let mut session = AgentSession::new(config, 0, auth);
    let mut grammar = Grammar::default();
    let mut stream = Vec::new();
    for frame in frames {
        frame.encode(&mut stream);
    }
    let mut out = vec![0u8; MAX_FRAME];
    let mut seen = Seen::default();
    let mut inbox: Vec<u8> = Vec::new();
    let mut at = 0;
    let mut index = 0;
    let mut unconsumed = 0;
    let mut breach = None;
    let mut piece = 0;
    let mut input_closed = false;
    while at < stream.len() && breach.is_none() && !input_closed {
        let len = driver.pieces[piece % driver.pieces.len()].min(stream.len() - at);
        let (start_now, transmit, consume) = driver.acts[piece % driver.acts.len()];
        piece += 1;
        inbox.extend_from_slice(&stream[at..at + len]);
        at += len;
        loop {
            let result = session.handle_input(&inbox, 0);
            let Ok(input) = result else {
                let expected = grammar.next(frames[index]);
                let Expect::Breach(err, code) = expected else {
                    return Err(TestCaseError::fail(format!(
                        "frame {index} ({:?}) refused, the grammar accepts it",
                        frames[index]
                    )));
                };
                prop_assert_eq!(result.map(|_| ()), Err(err));
                breach = Some((index, code));
                break;
            };
            if input.consumed == 0 {
                break;
            }
            let expected = grammar.next(frames[index]);
            prop_assert_eq!(
                expected,
                Expect::Accept,
                "frame {} ({:?}) accepted",
                index,
                frames[index]
            );
            match (input.event, frames[index]) {
                (Some(AgentEvent::Hello), Sent::Hello) => {}
                (Some(AgentEvent::Exec(valid)), Sent::Exec(mode)) => {
                    prop_assert_eq!(valid.request().stdin, mode);
                    prop_assert_eq!(valid.has_parts(), grammar.parts);
                }
                (Some(AgentEvent::Stdin(data)), Sent::Stdin(n)) => {
                    prop_assert_eq!(data.len(), n);
                    unconsumed += n;
                }
                (Some(AgentEvent::StdinEof), Sent::Eof) => {}
                (Some(AgentEvent::Signal(got)), Sent::Signal(number)) => {
                    prop_assert_eq!(got, number);
                }
                (Some(AgentEvent::Resize(size)), Sent::Resize) => prop_assert_eq!(size, SIZE),
                (Some(AgentEvent::Cancel { grace_ms }), Sent::Cancel(grace)) => {
                    prop_assert_eq!(grace_ms, grace);
                }
                (Some(AgentEvent::ExecPart { list, data }), Sent::Part(index)) => {
                    prop_assert_eq!((list, data), PIECES[index]);
                }
                (Some(AgentEvent::Put(_)), Sent::Put)
                | (Some(AgentEvent::PutEnd(_)), Sent::PutEnd)
                | (Some(AgentEvent::Get(_)), Sent::Get)
                | (Some(AgentEvent::Info), Sent::Simple(0))
                | (Some(AgentEvent::Shutdown(_)), Sent::Simple(1))
                | (Some(AgentEvent::TimeSync(_)), Sent::Simple(2))
                | (Some(AgentEvent::Reseed(_)), Sent::Simple(3)) => {}
                (event, frame) => {
                    return Err(TestCaseError::fail(format!("{frame:?} gave {event:?}")));
                }
            }
            inbox.drain(..input.consumed);
            index += 1;
        }
        if breach.is_some() {
            break;
        }
        // The driver's turn.
        if start_now && !grammar.started {
            match grammar.op {
                Some(Op::Exec) => session.started(9, 0).expect("the exec was taken"),
                Some(Op::Put | Op::Get) => session.file_ready(HEADER, 0).expect("taken"),
                _ => {}
            }
            grammar.started = matches!(grammar.op, Some(Op::Exec | Op::Put | Op::Get));
        }
        if consume && grammar.started {
            session.stdin_consumed(unconsumed);
            unconsumed = 0;
        }
        if transmit {
            let n = session
                .poll_transmit(&mut out)
                .expect("room for every frame");
            read_sent(&out[..n], &mut seen);
            grammar.credit = seen.credit;
        }
        if driver.eof_after == Some(piece - 1) {
            // The client's stream ends: mid-operation a half-close (no more input, stdin ends,
            // nothing is refused and nothing is owed less), before one the end.
            let phase = grammar.phase();
            if grammar.op == Some(Op::Put) && !grammar.put_ended {
                // Before its digest: the put is abandoned, the session is closed (a hello or
                // proof never sent may stay queued, as for any client that is gone: the driver
                // closes without sending it).
                prop_assert_eq!(
                    session.handle_eof(),
                    Err(SessionError::Disconnected {
                        phase,
                        mid_frame: false
                    })
                );
                prop_assert!(session.is_closed());
                input_closed = true;
                break;
            }
            prop_assert_eq!(session.handle_eof(), Ok(()));
            if matches!(phase, Phase::Starting | Phase::Running) {
                prop_assert!(session.input_closed() && !session.is_closing());
                prop_assert!(!session.stdin_open());
            } else {
                prop_assert!(session.is_closed());
            }
            input_closed = true;
        }
    }
    let n = session
        .poll_transmit(&mut out)
        .expect("room for every frame");
    read_sent(&out[..n], &mut seen);
    prop_assert_eq!(
        session.poll_transmit(&mut out),
        Ok(0),
        "one transmit takes all"
    );
    prop_assert_eq!(seen.hellos, 1);
    match breach {
        Some((index, code)) => {
            prop_assert!(session.is_closing() && session.is_closed());
            prop_assert_eq!(
                seen.errors.as_slice(),
                &[code][..],
                "exactly one error frame after frame {} ({:?})",
                index,
                frames[index]
            );
            // The agent speaks first: its hello goes out whatever the client does.
            prop_assert_eq!(seen.hellos, 1);
            // Nothing more is taken, nothing more is sent.
            let mut rest = &stream[at - inbox.len()..];
            while let Ok(input) = session.handle_input(rest, 0) {
                prop_assert!(input.event.is_none(), "an event after the breach");
                if input.consumed == 0 {
                    break;
                }
                rest = &rest[input.consumed..];
            }
            prop_assert_eq!(session.poll_transmit(&mut out), Ok(0));
        }
        None if input_closed => {
            // The driver stopped reading: what was taken was taken, nothing was refused.
            prop_assert!(seen.errors.is_empty(), "an error frame without a breach");
        }
        None => {
            prop_assert_eq!(index, frames.len(), "every frame was taken");
            prop_assert!(seen.errors.is_empty(), "an error frame without a breach");
            prop_assert!(!session.is_closing());
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    /// Any order of valid frames, any pieces, any driver timing.
    #[test]
    fn valid_frames_in_any_order_end_in_one_typed_error_or_are_all_accepted(
        frames in prop::collection::vec(sent(), 1..12),
        driver in driver(),
    ) {
        converse(&frames, &driver)?;
    }

    /// The same, from a valid opening: most orders go wrong only after the exec.
    #[test]
    fn after_a_valid_opening_any_order_still_ends_cleanly(
        tail in prop::collection::vec(sent(), 1..12),
        pipe in any::<bool>(),
        driver in driver(),
    ) {
        let mode = if pipe { StdinMode::Pipe } else { StdinMode::Null };
        let frames: Vec<Sent> = [Sent::Hello, Sent::Exec(mode)].into_iter().chain(tail).collect();
        converse(&frames, &driver)?;
    }
}
