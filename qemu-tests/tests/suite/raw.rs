//! The protocol at the byte level, below the library: what a client of its own, a confused one or
//! a hostile one gets from the agent. Valid conversations are driven by `ferry_wire`'s
//! [`ClientSession`], which checks every frame the agent sends against the protocol; the rest is
//! raw bytes, and what comes back is cut into frames by [`frames::Raw`] (shared with
//! `host/tests/hostile.rs`).
//!
//! Protocol 2: the agent speaks first. Every connection here reads the agent's hello through a
//! session (which takes its challenge), and a valid client answers with its hello and the proof
//! of the fixture's secret ([`ClientSession::poll_transmit`] or `start_exec`).

use std::net::Shutdown;
use std::time::Duration;

use ferry_wire::limits::{MAX_DATA, MAX_FRAME, MAX_FRAME_BODY};
use ferry_wire::session::{ClientAuth, ClientEvent, ClientSession, SessionError};
use ferry_wire::{
    AgentFrame, Bytes, ClientFrame, ClientHello, ErrorCode, ExecRequest, ExitStatus, StdinMode,
    StrList,
};

use super::frames::{self, encode, exec, hello, nonce};
use super::{pattern, Fixture};

/// What the agent sent, owned, in the terms a scenario checks.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Hello {
        version: u16,
    },
    Authenticated,
    Done,
    Started,
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    StdinCredit,
    Exited(ExitStatus),
    Refused(ErrorCode),
    Ready,
    Keepalive,
    OutputDropped(u64),
    /// A frame of the operations beyond exec.
    Other(String),
}

impl From<AgentFrame<'_>> for Seen {
    fn from(frame: AgentFrame<'_>) -> Seen {
        match frame {
            AgentFrame::Hello(hello) => Seen::Hello {
                version: hello.version,
            },
            AgentFrame::Authenticated(_) => Seen::Authenticated,
            AgentFrame::Done(_) => Seen::Done,
            AgentFrame::Started(_) => Seen::Started,
            AgentFrame::Stdout(out) => Seen::Stdout(out.data.0.to_vec()),
            AgentFrame::Stderr(out) => Seen::Stderr(out.data.0.to_vec()),
            AgentFrame::StdinCredit(_) => Seen::StdinCredit,
            AgentFrame::Exited(end) => Seen::Exited(end.status),
            AgentFrame::Error(err) => Seen::Refused(err.code),
            AgentFrame::Ready(_) => Seen::Ready,
            AgentFrame::Keepalive => Seen::Keepalive,
            AgentFrame::OutputDropped(dropped) => Seen::OutputDropped(dropped.bytes),
            other => Seen::Other(format!("{other:?}")),
        }
    }
}

impl From<ClientEvent<'_>> for Seen {
    fn from(event: ClientEvent<'_>) -> Seen {
        match event {
            ClientEvent::HelloAccepted(info) => Seen::Hello {
                version: info.protocol_version,
            },
            ClientEvent::Authenticated => Seen::Authenticated,
            ClientEvent::Done(_) => Seen::Done,
            ClientEvent::Started { .. } => Seen::Started,
            ClientEvent::Stdout(data) => Seen::Stdout(data.to_vec()),
            ClientEvent::Stderr(data) => Seen::Stderr(data.to_vec()),
            ClientEvent::StdinCredit { .. } => Seen::StdinCredit,
            ClientEvent::Exited(end) => Seen::Exited(end.status),
            ClientEvent::Refused(err) => Seen::Refused(err.code),
            ClientEvent::OutputDropped(dropped) => Seen::OutputDropped(dropped.bytes),
            other => Seen::Other(format!("{other:?}")),
        }
    }
}

const HELLO: Seen = Seen::Hello {
    version: ferry_wire::PROTOCOL_VERSION,
};

/// One connection to the agent, driven by hand.
type Raw = frames::Raw<Seen>;

/// Bounds, not expectations: a scenario that waits this long has failed.
const PATIENCE: Duration = Duration::from_secs(20);

impl Raw {
    fn open(fixture: &Fixture) -> Raw {
        let stream = fixture.target.open_stream(&fixture.options()).unwrap();
        Raw::new(stream, PATIENCE)
    }

    /// Opens a connection and takes the agent's hello (it speaks first) with a session that
    /// holds the fixture's secret: our hello and proof are then queued in it.
    fn greeted(fixture: &Fixture) -> (Raw, ClientSession) {
        let mut raw = Raw::open(fixture);
        let auth = ClientAuth {
            nonce: nonce(),
            secret: fixture.secret(),
        };
        let mut session = ClientSession::new(0, None, auth);
        // The hello comes on its own: the agent does not wait for anything of ours.
        assert_eq!(raw.next_event(&mut session).unwrap(), Some(HELLO));
        (raw, session)
    }

    /// Our hello and proof, as the session encodes them (sent by the caller).
    fn opening(session: &mut ClientSession) -> Vec<u8> {
        let mut out = [0u8; 256];
        let n = session.poll_transmit(&mut out).unwrap();
        out[..n].to_vec()
    }

    /// Hangs up our side, as a client that is done would.
    fn hang_up(&self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// The next event of `session`, or `None` once the agent has closed; the session checks
    /// every frame against the protocol, and that the close came when it could.
    fn next_event(&mut self, session: &mut ClientSession) -> Result<Option<Seen>, SessionError> {
        loop {
            let input = session.handle_input(self.recv.data())?;
            if input.consumed > 0 {
                let seen = input.event.map(Seen::from);
                self.recv.consume(input.consumed);
                match seen {
                    Some(seen) => return Ok(Some(seen)),
                    None => continue,
                }
            }
            let read = self.fill(PATIENCE);
            if read.expect("the agent neither answered nor closed") == 0 {
                session.handle_eof(self.recv.data().len())?;
                return Ok(None);
            }
        }
    }

    /// Every event of `session` until the agent closes.
    /// Events until the operation's last (protocol 5: the agent keeps the connection open
    /// after it), or the connection's end.
    fn events_until_closed(&mut self, session: &mut ClientSession) -> Vec<Seen> {
        let mut events = Vec::new();
        while let Some(event) = self.next_event(session).unwrap() {
            events.push(event);
            if session.is_finished() {
                break;
            }
        }
        events
    }
}

/// The agent still serves a client that plays by the rules.
fn assert_still_serving(fixture: &Fixture, after: &str) {
    if let Err(err) = fixture.client().health() {
        panic!("after {after}: the agent no longer answers: {err}");
    }
}

/// The agent's proof, where the agent must send one: before anything about an operation, unless
/// it runs `--insecure` (then the session was done with its hello).
fn proof(session_after_hello: &ClientSession) -> &'static [Seen] {
    if session_after_hello.is_authenticated() {
        &[]
    } else {
        &[Seen::Authenticated]
    }
}

/// Fails unless `events` open with the agent's proof (see [`proof`]) and `Started`.
#[track_caller]
fn assert_started(events: &[Seen], proof: &[Seen]) {
    let opening = [proof, &[Seen::Started]].concat();
    assert!(events.starts_with(&opening), "{events:?}");
}

/// Stdout and stderr of `events`, each concatenated.
fn outputs(events: &[Seen]) -> (Vec<u8>, Vec<u8>) {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    for event in events {
        match event {
            Seen::Stdout(data) => stdout.extend_from_slice(data),
            Seen::Stderr(data) => stderr.extend_from_slice(data),
            _ => {}
        }
    }
    (stdout, stderr)
}

pub fn a_hello_only_connection_is_answered_and_closed(fixture: &Fixture) {
    // The agent's hello comes first, unasked.
    let (mut raw, mut session) = Raw::greeted(fixture);
    assert_eq!(
        session.agent_limits(),
        Some(ferry_wire::Limits {
            idle_ms: ferry_wire::limits::DEFAULT_IDLE_MS,
            ..ferry_wire::Limits::CURRENT
        }),
        "the limits the agent announced (protocol 5: the policy's idle_timeout)"
    );
    let proof = proof(&session);
    // Our hello and proof, no request: the agent proves the secret in turn.
    raw.send(&Raw::opening(&mut session));
    for seen in proof {
        assert_eq!(raw.next_event(&mut session).unwrap().as_ref(), Some(seen));
    }
    assert!(session.is_authenticated());
    // A client that is done (a health check) hangs up; the agent closes without a word, which
    // the session accepts as a clean end.
    raw.hang_up();
    assert_eq!(raw.next_event(&mut session).unwrap(), None);
}

pub fn a_pipelined_hello_and_exec_run_to_the_end(fixture: &Fixture) {
    let (mut raw, mut session) = Raw::greeted(fixture);
    let proof = proof(&session);
    let mut out = vec![0u8; MAX_FRAME];
    let request = ExecRequest {
        env: StrList::new(b"FERRY_RAW=env works\0"),
        ..exec(
            b"/bin/sh\0-c\0echo \"$FERRY_RAW\"; echo err >&2; exit 3\0",
            StdinMode::Null,
        )
    };
    // Hello, proof and request in one write.
    let n = session.start_exec(&request, &mut out).unwrap();
    raw.send(&out[..n]);
    let events = raw.events_until_closed(&mut session);
    assert_started(&events, proof);
    assert_eq!(events.last(), Some(&Seen::Exited(ExitStatus::Code(3))));
    assert_eq!(
        outputs(&events),
        (b"env works\n".to_vec(), b"err\n".to_vec())
    );
    assert!(session.is_finished());
}

pub fn stdin_credit_is_returned_as_the_command_reads(fixture: &Fixture) {
    // A single-threaded client that sends only within credit and reads when it has none: it
    // makes progress only if the agent returns credit as `cat` consumes.
    let (mut raw, mut session) = Raw::greeted(fixture);
    let proof = proof(&session);
    let mut out = vec![0u8; MAX_FRAME];
    let n = session
        .start_exec(&exec(b"cat\0", StdinMode::Pipe), &mut out)
        .unwrap();
    raw.send(&out[..n]);
    let data = pattern(1 << 20);
    let mut rest = &data[..];
    let mut events = Vec::new();
    while !rest.is_empty() {
        if session.stdin_credit() == 0 {
            let event = raw.next_event(&mut session).unwrap();
            events.push(event.expect("the agent closed with stdin still open"));
            continue;
        }
        let sent = session.send_stdin(rest, &mut out).unwrap();
        raw.send(&out[..sent.written]);
        rest = &rest[sent.taken..];
    }
    session.close_stdin().unwrap();
    let n = session.poll_transmit(&mut out).unwrap();
    raw.send(&out[..n]);
    events.extend(raw.events_until_closed(&mut session));
    assert_started(&events, proof);
    assert_eq!(events.last(), Some(&Seen::Exited(ExitStatus::Code(0))));
    assert!(events.contains(&Seen::StdinCredit));
    let (stdout, stderr) = outputs(&events);
    assert!(stdout == data, "echo differs");
    assert!(stderr.is_empty());
}

pub fn bad_frames_are_refused_and_the_agent_keeps_serving(fixture: &Fixture) {
    let oversized = ((MAX_FRAME_BODY + 1) as u32).to_le_bytes().to_vec();
    let hello_with = |hello: ClientHello| encode(&ClientFrame::Hello(hello));
    // An agent that requires the secret refuses anything but a right proof after a hello alike.
    let secure = fixture.secret_file.is_some();
    let before_proof = |code| {
        if secure {
            ErrorCode::Unauthenticated
        } else {
            code
        }
    };
    let mut cases: Vec<(&str, Vec<u8>, bool, ErrorCode)> = vec![
        (
            "http request",
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            false,
            ErrorCode::FrameTooLarge,
        ),
        (
            "garbage hello",
            vec![3, 0, 0, 0, 0, 0xff, 0xff],
            false,
            ErrorCode::Malformed,
        ),
        (
            "oversized hello",
            oversized.clone(),
            false,
            ErrorCode::FrameTooLarge,
        ),
        (
            "huge length",
            vec![0xff; 4],
            false,
            ErrorCode::FrameTooLarge,
        ),
        (
            "exec before hello",
            encode(&ClientFrame::Exec(exec(b"true\0", StdinMode::Null))),
            false,
            ErrorCode::ProtocolViolation,
        ),
        (
            "wrong magic",
            hello_with(ClientHello {
                magic: *b"SSH-",
                ..ClientHello::CURRENT
            }),
            false,
            ErrorCode::UnsupportedVersion,
        ),
        (
            "future version",
            hello_with(ClientHello {
                min_version: 50,
                max_version: 60,
                ..ClientHello::CURRENT
            }),
            false,
            ErrorCode::UnsupportedVersion,
        ),
        (
            "garbage request",
            vec![3, 0, 0, 0, 1, 0xff, 0xff],
            true,
            ErrorCode::Malformed,
        ),
        (
            "oversized request",
            oversized,
            true,
            ErrorCode::FrameTooLarge,
        ),
        (
            "stdin as request",
            vec![2, 0, 0, 0, 2, 0],
            true,
            ErrorCode::ProtocolViolation,
        ),
        (
            "empty argv",
            // Exec: argv and env empty, no clean env, no cwd, stdin piped, no user, no pty, no
            // timeout, the default grace, no tree kill, no cap.
            vec![12, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
            true,
            ErrorCode::InvalidRequest,
        ),
    ];
    // Our hello alone, then what comes where the proof belongs (for an insecure agent: where
    // the request belongs).
    let hello_then = |bytes: Vec<u8>| [hello(), bytes].concat();
    cases.extend([
        (
            "a request without a proof",
            hello_then(encode(&ClientFrame::Exec(exec(b"true\0", StdinMode::Null)))),
            false,
            before_proof(ErrorCode::Malformed),
        ),
        (
            "garbage instead of a proof",
            hello_then(vec![3, 0, 0, 0, 1, 0xff, 0xff]),
            false,
            before_proof(ErrorCode::Malformed),
        ),
    ]);
    for (name, bytes, hello_first, expected) in cases {
        if name == "a request without a proof" && !secure {
            continue; // an insecure agent runs it
        }
        let (mut raw, mut session) = Raw::greeted(fixture);
        let proof = proof(&session);
        if hello_first {
            // Our hello and a right proof.
            raw.send(&Raw::opening(&mut session));
        }
        raw.send(&bytes);
        // Exactly one error frame (after the agent's proof, if ours was sent), then the agent
        // closes.
        let mut answer = raw.frames_until_closed();
        if hello_first {
            assert!(answer.starts_with(proof), "{name}: {answer:?}");
            answer.drain(..proof.len());
        }
        assert_eq!(answer, [Seen::Refused(expected)], "{name}");
        assert_still_serving(fixture, name);
    }
}

pub fn noise_of_any_size_is_refused_or_dropped(fixture: &Fixture) {
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for len in [1usize, 3, 4, 5, 17, 100, 4096, 70_000] {
        let noise: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        for hello_first in [false, true] {
            let (mut raw, mut session) = Raw::greeted(fixture);
            let proof = proof(&session);
            if hello_first {
                raw.send(&Raw::opening(&mut session));
            }
            raw.send(&noise);
            // Short noise leaves the agent waiting for the rest of a frame: hang up, as a
            // client would, and the agent must notice. (vhost-device-vsock turns a half-close
            // into a full one, so an answer may be lost; what does arrive must be whole frames
            // and nothing but the agent's proof and an error.)
            raw.hang_up();
            let answer = raw.frames_until_closed();
            let rest = match answer.strip_prefix(proof) {
                Some(rest) if hello_first => rest,
                _ => &answer[..],
            };
            assert!(
                matches!(rest, [] | [Seen::Refused(_)]),
                "{len} bytes of noise, hello first: {hello_first}: {answer:?}"
            );
        }
        assert_still_serving(fixture, &format!("{len} bytes of noise"));
    }
}

pub fn requests_out_of_place_are_refused(fixture: &Fixture) {
    let sleep = encode(&ClientFrame::Exec(exec(b"sleep\x005\0", StdinMode::Null)));
    let piped_sleep = encode(&ClientFrame::Exec(exec(b"sleep\x005\0", StdinMode::Pipe)));
    let stdin = encode(&ClientFrame::Stdin(Bytes(b"x")));
    let cases = [
        (
            "a second request",
            [
                sleep.clone(),
                encode(&ClientFrame::Exec(exec(b"true\0", StdinMode::Null))),
            ],
        ),
        ("stdin without a pipe", [sleep, stdin.clone()]),
        (
            "stdin after its end",
            [
                piped_sleep,
                [encode(&ClientFrame::StdinEof), stdin].concat(),
            ],
        ),
        ("a second hello", [hello(), Vec::new()]),
    ];
    for (name, frames) in cases {
        let (mut raw, mut session) = Raw::greeted(fixture);
        let proof = proof(&session);
        // All in one write, behind our hello and proof: whether the command has started when
        // the agent reads the culprit is up to the agent.
        raw.send(&[Raw::opening(&mut session), frames.concat()].concat());
        let answer = raw.frames_until_closed();
        let expected = Seen::Refused(ErrorCode::ProtocolViolation);
        assert_eq!(answer.last(), Some(&expected), "{name}: {answer:?}");
        let before = answer[..answer.len() - 1]
            .strip_prefix(proof)
            .unwrap_or_else(|| panic!("{name}: no proof first: {answer:?}"));
        assert!(matches!(before, [] | [Seen::Started]), "{name}: {answer:?}");
        assert_still_serving(fixture, name);
    }
}

pub fn stdin_beyond_credit_is_refused(fixture: &Fixture) {
    let (mut raw, mut session) = Raw::greeted(fixture);
    let proof = proof(&session);
    raw.send(&Raw::opening(&mut session));
    // A command that never reads: once its pipe is full no credit comes back.
    raw.send_frame(&ClientFrame::Exec(exec(b"sleep\x0030\0", StdinMode::Pipe)));
    for seen in proof {
        assert_eq!(raw.next_frame().as_ref(), Some(seen));
    }
    assert_eq!(raw.next_frame(), Some(Seen::Started));
    // Far more than the window plus the largest pipe, without waiting for credit.
    let chunk = encode(&ClientFrame::Stdin(Bytes(&[b's'; MAX_DATA])));
    for _ in 0..(4 << 20) / MAX_DATA {
        raw.send(&chunk);
    }
    let answer = raw.frames_until_closed();
    let expected = Seen::Refused(ErrorCode::ProtocolViolation);
    assert_eq!(answer.last(), Some(&expected), "{answer:?}");
    let before = &answer[..answer.len() - 1];
    assert!(
        before.iter().all(|seen| *seen == Seen::StdinCredit),
        "{answer:?}"
    );
    assert_still_serving(fixture, "stdin beyond credit");
}
