//! Golden transcripts: whole conversations stored as byte files in `wire/transcripts/`, one file
//! per direction, that both sessions are checked against. The agent session, fed the client's
//! bytes and driven by the transcript's script, must send exactly the agent's bytes; the client
//! session, fed the agent's bytes, must send exactly the client's and report the listed events.
//! Another implementation can check itself against the same files (see `transcripts/README.md`).
//!
//! `FERRY_BLESS=1 cargo test -p ferry-wire transcripts` rewrites the files from the sessions:
//! only ever after a deliberate protocol change, reviewed byte by byte.

use std::path::PathBuf;
use std::string::String;
use std::vec::Vec;

use super::*;
use crate::limits::MAX_FRAME;
use crate::msg::{
    ClientFrame, ClientHello, ErrorCode, ExecRequest, ExitStatus, StdinMode, StrList,
};
use crate::{encode_client_frame, DataKind, DATA_HEADROOM};

/// What the agent's driver does, in order, as the transcript's conversation unfolds.
#[derive(Debug, Clone, Copy)]
enum Act {
    /// Answer the exec: the command runs as this pid.
    Start(u32),
    /// Refuse the exec.
    Refuse(ErrorCode, u32, &'static str),
    /// Write all stdin received so far to the command (credit goes back).
    ConsumeStdin,
    Stdout(&'static [u8]),
    Stderr(&'static [u8]),
    /// The command ended after this many microseconds.
    Exit(ExitStatus, u64),
}

/// What the client does beyond the exec.
#[derive(Debug, Clone, Copy)]
enum Send {
    Stdin(&'static [u8]),
    Eof,
}

struct Transcript {
    name: &'static str,
    request: ExecRequest<'static>,
    /// The client's sends, made once the agent's hello arrived (stdin needs its credit).
    sends: &'static [Send],
    /// The agent's script, run once the whole client side has been handled.
    acts: &'static [Act],
    /// The events the client session must report, in order, as text.
    events: &'static [&'static str],
}

const fn exec(argv: &'static [u8], stdin: StdinMode) -> ExecRequest<'static> {
    ExecRequest {
        argv: StrList::new(argv),
        env: StrList::new(b"LANG=C\0"),
        clean_env: false,
        cwd: None,
        stdin,
    }
}

const TRANSCRIPTS: &[Transcript] = &[
    Transcript {
        name: "exec_output",
        request: exec(b"sh\0-c\0echo hi; echo warn >&2\0", StdinMode::Null),
        sends: &[],
        acts: &[
            Act::Start(7),
            Act::Stdout(b"hi\n"),
            Act::Stderr(b"warn\n"),
            Act::Exit(ExitStatus::Code(0), 1500),
        ],
        events: &[
            "hello v1 agent golden",
            "started 7",
            "stdout \"hi\\n\"",
            "stderr \"warn\\n\"",
            "exited Code(0) 1500us dropped=false",
        ],
    },
    Transcript {
        name: "exec_stdin_credit",
        request: exec(b"cat\0", StdinMode::Pipe),
        sends: &[Send::Stdin(b"abc"), Send::Stdin(b"defg"), Send::Eof],
        acts: &[
            Act::Start(8),
            Act::ConsumeStdin,
            Act::Stdout(b"abcdefg"),
            Act::Exit(ExitStatus::Code(0), 2000),
        ],
        events: &[
            "hello v1 agent golden",
            "started 8",
            "credit 0",
            "stdout \"abcdefg\"",
            "exited Code(0) 2000us dropped=false",
        ],
    },
    Transcript {
        name: "exec_signal_death",
        request: exec(b"sleep\0infinity\0", StdinMode::Null),
        sends: &[],
        acts: &[
            Act::Start(9),
            Act::Exit(
                ExitStatus::Signal {
                    number: 9,
                    core_dumped: false,
                },
                30,
            ),
        ],
        events: &[
            "hello v1 agent golden",
            "started 9",
            "exited Signal { number: 9, core_dumped: false } 30us dropped=false",
        ],
    },
    Transcript {
        name: "exec_not_found",
        request: exec(b"no-such-program\0", StdinMode::Null),
        sends: &[],
        acts: &[Act::Refuse(
            ErrorCode::NotFound,
            2,
            "no such file or directory",
        )],
        events: &[
            "hello v1 agent golden",
            "refused NotFound errno 2 \"no such file or directory\"",
        ],
    },
    Transcript {
        name: "exec_invalid_request",
        // The agent refuses an env entry without '='; the client session would never send it,
        // so the client side of this one is checked only through the agent.
        request: ExecRequest {
            argv: StrList::new(b"true\0"),
            env: StrList::new(b"NOEQUALS\0"),
            clean_env: false,
            cwd: None,
            stdin: StdinMode::Null,
        },
        sends: &[],
        acts: &[],
        events: &[],
    },
];

const CONFIG: AgentConfig = AgentConfig {
    agent_version: "golden",
    ..AgentConfig::DEFAULT
};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("transcripts")
}

/// Compares `bytes` with the stored file (or writes it when blessing).
fn golden(file: &str, bytes: &[u8]) {
    let path = dir().join(file);
    if std::env::var_os("FERRY_BLESS").is_some() {
        std::fs::create_dir_all(dir()).expect("transcripts dir");
        std::fs::write(&path, bytes).expect("writing a transcript");
        return;
    }
    let stored = std::fs::read(&path)
        .unwrap_or_else(|err| panic!("{}: {err} (FERRY_BLESS=1 writes it)", path.display()));
    assert_eq!(
        stored,
        bytes,
        "{} differs from the session's bytes",
        path.display()
    );
}

/// The client's side of a transcript, encoded the way a client sends it (raw for requests the
/// client session refuses to encode).
fn client_bytes(t: &Transcript) -> Vec<u8> {
    let mut out = vec![0u8; MAX_FRAME];
    let mut session = ClientSession::new(0, None);
    let mut bytes = Vec::new();
    match session.start_exec(&t.request, &mut out) {
        Ok(n) => bytes.extend_from_slice(&out[..n]),
        Err(_) => {
            for frame in [
                ClientFrame::Hello(ClientHello::CURRENT),
                ClientFrame::Exec(t.request),
            ] {
                let n = encode_client_frame(&frame, &mut out).expect("encodes");
                bytes.extend_from_slice(&out[..n]);
            }
            return bytes;
        }
    }
    // The agent's hello opens credit; the client sends its stdin behind it.
    let hello = agent_hello_bytes();
    let input = session.handle_input(&hello).expect("hello accepted");
    assert_eq!(input.consumed, hello.len());
    for send in t.sends {
        match send {
            Send::Stdin(data) => {
                let sent = session.send_stdin(data, &mut out).expect("within credit");
                assert_eq!(sent.taken, data.len());
                bytes.extend_from_slice(&out[..sent.written]);
            }
            Send::Eof => session.close_stdin().expect("stdin open"),
        }
        let n = session.poll_transmit(&mut out).expect("transmits");
        bytes.extend_from_slice(&out[..n]);
    }
    bytes
}

fn agent_hello_bytes() -> Vec<u8> {
    let mut session = AgentSession::new(CONFIG, 0);
    let mut out = vec![0u8; 256];
    let mut hello = vec![0u8; 64];
    let n = encode_client_frame(&ClientFrame::Hello(ClientHello::CURRENT), &mut hello).unwrap();
    session.handle_input(&hello[..n], 0).expect("hello");
    let n = session.poll_transmit(&mut out).expect("hello out");
    out.truncate(n);
    out
}

/// Runs the agent session over the client's bytes with the transcript's script; returns what it
/// sends.
fn agent_bytes(t: &Transcript, client: &[u8]) -> Vec<u8> {
    let mut session = AgentSession::new(CONFIG, 0);
    let mut out = vec![0u8; MAX_FRAME];
    let mut sent = Vec::new();
    let mut stdin_received = 0;
    let mut rest = client;
    let mut exec_seen = false;
    while !rest.is_empty() {
        let input = match session.handle_input(rest, 0) {
            Ok(input) => input,
            Err(_) => break,
        };
        match input.event {
            Some(AgentEvent::Exec(_)) => exec_seen = true,
            Some(AgentEvent::Stdin(data)) => stdin_received += data.len(),
            _ => {}
        }
        assert!(input.consumed > 0, "{}: client bytes end mid-frame", t.name);
        rest = &rest[input.consumed..];
    }
    let mut flush = |session: &mut AgentSession, sent: &mut Vec<u8>| {
        let n = session.poll_transmit(&mut out).expect("transmits");
        sent.extend_from_slice(&out[..n]);
    };
    flush(&mut session, &mut sent);
    assert_eq!(exec_seen, !session.is_closing(), "{}", t.name);
    let mut frame = vec![0u8; MAX_FRAME];
    for act in t.acts {
        match *act {
            Act::Start(pid) => session.started(pid, 0).expect("started"),
            Act::Refuse(code, errno, message) => session
                .refuse(Refusal::os(code, errno, message), 0)
                .expect("refuse"),
            Act::ConsumeStdin => session.stdin_consumed(stdin_received),
            Act::Stdout(data) | Act::Stderr(data) => {
                flush(&mut session, &mut sent);
                let kind = match act {
                    Act::Stdout(_) => DataKind::Stdout,
                    _ => DataKind::Stderr,
                };
                frame[DATA_HEADROOM..DATA_HEADROOM + data.len()].copy_from_slice(data);
                let start = session.frame_output(&mut frame, kind, data.len()).unwrap();
                sent.extend_from_slice(&frame[start..DATA_HEADROOM + data.len()]);
            }
            Act::Exit(status, after) => {
                session.child_exited(status, after).expect("exit");
                session.finish(after).expect("finish");
            }
        }
        flush(&mut session, &mut sent);
    }
    assert!(
        session.is_closed(),
        "{}: the conversation did not end",
        t.name
    );
    sent
}

/// Feeds the agent's bytes to a client session that sent the transcript's request; returns
/// the events as text.
fn client_events(t: &Transcript, agent: &[u8]) -> Vec<String> {
    let mut session = ClientSession::new(0, None);
    let mut out = vec![0u8; MAX_FRAME];
    session.start_exec(&t.request, &mut out).expect("request");
    let mut events = Vec::new();
    let mut rest = agent;
    while !rest.is_empty() {
        let input = session
            .handle_input(rest)
            .expect("the client accepts the agent's bytes");
        let text = match input.event.expect("every agent frame is an event") {
            ClientEvent::HelloAccepted(info) => {
                format!(
                    "hello v{} agent {}",
                    info.protocol_version, info.agent_version
                )
            }
            ClientEvent::Started { pid } => format!("started {pid}"),
            ClientEvent::Stdout(data) => format!("stdout {:?}", String::from_utf8_lossy(data)),
            ClientEvent::Stderr(data) => format!("stderr {:?}", String::from_utf8_lossy(data)),
            ClientEvent::StdinCredit { available } => format!("credit {available}"),
            ClientEvent::Exited(end) => format!(
                "exited {:?} {}us dropped={}",
                end.status, end.duration_us, end.output_dropped
            ),
            ClientEvent::Refused(err) => {
                format!(
                    "refused {:?} errno {} {:?}",
                    err.code, err.errno, err.message
                )
            }
        };
        events.push(text);
        // Stdin the transcript sends after the hello.
        if events.len() == 1 {
            for send in t.sends {
                match send {
                    Send::Stdin(data) => {
                        session.send_stdin(data, &mut out).expect("credit");
                    }
                    Send::Eof => session.close_stdin().expect("open"),
                }
            }
        }
        rest = &rest[input.consumed..];
    }
    assert!(session.is_finished(), "{}: the client expects more", t.name);
    session.handle_eof(0).expect("a clean end");
    events
}

#[test]
fn transcripts_hold_for_both_sessions() {
    for t in TRANSCRIPTS {
        let client = client_bytes(t);
        golden(&format!("{}.client.bin", t.name), &client);
        let agent = agent_bytes(t, &client);
        golden(&format!("{}.agent.bin", t.name), &agent);
        if !t.events.is_empty() {
            assert_eq!(client_events(t, &agent), t.events, "{}", t.name);
        }
    }
}

#[test]
fn the_invalid_request_transcript_is_refused_with_its_reason() {
    let agent = std::fs::read(dir().join("exec_invalid_request.agent.bin")).expect("stored");
    let mut session = ClientSession::new(0, None);
    // Its hello is accepted; the error frame follows and names the rule.
    let mut rest = &agent[..];
    let mut out = vec![0u8; MAX_FRAME];
    let request = exec(b"true\0", StdinMode::Null);
    session.start_exec(&request, &mut out).unwrap();
    let mut refused = None;
    while !rest.is_empty() {
        let input = session.handle_input(rest).unwrap();
        if let Some(ClientEvent::Refused(err)) = input.event {
            refused = Some((err.code, String::from(err.message)));
        }
        rest = &rest[input.consumed..];
    }
    assert_eq!(
        refused,
        Some((
            ErrorCode::InvalidRequest,
            String::from("environment entry is not KEY=VALUE")
        ))
    );
}

/// The stored files decode frame by frame (a reader of `transcripts/README.md` can rely on it).
#[test]
fn transcript_files_are_whole_frames() {
    let mut names: Vec<_> = std::fs::read_dir(dir())
        .expect("transcripts dir")
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".bin"))
        .collect();
    names.sort();
    assert_eq!(names.len(), 2 * TRANSCRIPTS.len(), "{names:?}");
    for name in names {
        let bytes = std::fs::read(dir().join(&name)).unwrap();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let (body, used) = crate::split_frame(rest, crate::limits::MAX_FRAME_BODY)
                .unwrap()
                .unwrap_or_else(|| panic!("{name}: ends mid-frame"));
            if name.ends_with(".client.bin") {
                crate::decode_client_frame(body).unwrap();
            } else {
                crate::decode_agent_frame(body).unwrap();
            }
            rest = &rest[used..];
        }
    }
}
