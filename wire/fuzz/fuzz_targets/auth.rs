//! Authentication under arbitrary client bytes: a secure agent (a fixed secret) has sent its
//! hello, and whatever comes next must not get past it without the right proof. The expected
//! opening (our hello and proof) is what a `ClientSession` with the same secret and nonce sends
//! after that hello; only a stream starting with exactly those bytes may bring
//! `AgentEvent::Authenticated` (and so any request — `KillAll`, `Exec` or a piece of one,
//! protocol 4's put, get, info, shutdown, time sync, reseed, protocol 5's job start, listing,
//! attach, wait, kill, removal). Every refusal after the client's hello was accepted is the one `Unauthenticated` error frame, byte for byte the
//! same, and nothing else is sent.
//!
//! The input's first byte picks how the stream is made, so the fuzzer works near the opening
//! too: the bytes as they are; the opening followed by them; the opening cut short, then them;
//! the opening with one byte changed, then them.

#![no_main]

use std::sync::OnceLock;

use ferry_wire::limits::{MAX_FRAME, NONCE_LEN};
use ferry_wire::session::{
    AgentAuth, AgentConfig, AgentEvent, AgentSession, ClientAuth, ClientEvent, ClientSession,
    Secret, SessionError,
};
use ferry_wire::{decode_agent_frame, AgentFrame, ErrorCode};
use ferry_wire_fuzz::whole_frames;
use libfuzzer_sys::fuzz_target;

const SECRET: &[u8] = b"the fuzzed agent's secret";
const AGENT_NONCE: [u8; NONCE_LEN] = [0x11; NONCE_LEN];
const CLIENT_NONCE: [u8; NONCE_LEN] = [0x22; NONCE_LEN];
const NOW: u64 = 1_000;

/// The first refusal seen: every later one must be the same bytes.
static REFUSAL: OnceLock<Vec<u8>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let secret = Secret::new(SECRET).expect("a valid secret");
    let config = AgentConfig {
        agent_version: "fuzz",
        ..AgentConfig::DEFAULT
    };
    let auth = AgentAuth {
        nonce: AGENT_NONCE,
        secret: Some(secret.clone()),
    };
    let mut agent = AgentSession::new(config, NOW, auth);
    let mut out = vec![0u8; MAX_FRAME];
    let n = agent.poll_transmit(&mut out).expect("the hello");
    let hello = out[..n].to_vec();
    let (frames, _) = whole_frames(&hello);
    assert_eq!(frames.len(), 1, "the hello alone");
    assert!(matches!(
        decode_agent_frame(frames[0]),
        Ok(AgentFrame::Hello(_))
    ));

    // What the right client sends after that hello.
    let mut client = ClientSession::new(
        NOW,
        None,
        ClientAuth {
            nonce: CLIENT_NONCE,
            secret: Some(secret),
        },
    );
    let step = client.handle_input(&hello).expect("the agent's hello");
    assert!(matches!(step.event, Some(ClientEvent::HelloAccepted(_))));
    let n = client.poll_transmit(&mut out).expect("hello and proof");
    let opening = out[..n].to_vec();

    let stream = make_stream(data, &opening);
    let right = stream.starts_with(&opening);

    let mut input = &stream[..];
    let mut hello_in = false;
    let mut authenticated = false;
    while !input.is_empty() {
        match agent.handle_input(input, NOW) {
            Ok(step) => {
                match step.event {
                    Some(AgentEvent::Hello) => hello_in = true,
                    Some(AgentEvent::Authenticated) => {
                        assert!(right, "authenticated without the right proof");
                        authenticated = true;
                    }
                    Some(
                        AgentEvent::KillAll
                        | AgentEvent::Exec(_)
                        | AgentEvent::Put(_)
                        | AgentEvent::Get(_)
                        | AgentEvent::Info
                        | AgentEvent::Shutdown(_)
                        | AgentEvent::TimeSync(_)
                        | AgentEvent::Reseed(_)
                        | AgentEvent::Jobs(_)
                        | AgentEvent::Attach(_)
                        | AgentEvent::Wait(_)
                        | AgentEvent::Kill(_)
                        | AgentEvent::Remove(_),
                    ) => {
                        assert!(authenticated && right, "an operation without the proof");
                        // Accepted requests are the driver's; nothing more is read.
                        break;
                    }
                    // A piece of a request (or a job start) comes before it, after the proof
                    // alone.
                    Some(AgentEvent::ExecPart { .. } | AgentEvent::StartJob(_)) => {
                        assert!(
                            authenticated && right,
                            "a piece of a request without the proof"
                        );
                    }
                    Some(event) => panic!("{event:?} before an operation"),
                    None => {}
                }
                if step.consumed == 0 {
                    break;
                }
                input = &input[step.consumed..];
            }
            Err(err) => {
                if hello_in && !authenticated {
                    assert_eq!(err, SessionError::Unauthenticated);
                    check_refusal(&mut agent);
                }
                assert!(agent.is_closing());
                break;
            }
        }
    }
    if right {
        assert!(authenticated, "the right proof refused");
    }
    let _ = agent.handle_eof();
});

/// The agent's answer to a failed proof: one error frame, the same for every failure.
fn check_refusal(agent: &mut AgentSession) {
    let mut out = vec![0u8; MAX_FRAME];
    let n = agent.poll_transmit(&mut out).expect("the refusal");
    let sent = out[..n].to_vec();
    let (frames, used) = whole_frames(&sent);
    assert_eq!((frames.len(), used), (1, n), "one whole frame");
    let Ok(AgentFrame::Error(err)) = decode_agent_frame(frames[0]) else {
        panic!("not an error frame: {sent:?}");
    };
    assert_eq!((err.code, err.errno), (ErrorCode::Unauthenticated, 0));
    assert_eq!(
        REFUSAL.get_or_init(|| sent.clone()),
        &sent,
        "refusals differ"
    );
    assert_eq!(
        agent.poll_transmit(&mut out),
        Ok(0),
        "more after the refusal"
    );
    assert!(agent.is_closed());
}

fn make_stream(data: &[u8], opening: &[u8]) -> Vec<u8> {
    let Some((&mode, rest)) = data.split_first() else {
        return Vec::new();
    };
    let mut stream = Vec::new();
    match mode % 4 {
        0 => stream.extend_from_slice(rest),
        1 => {
            stream.extend_from_slice(opening);
            stream.extend_from_slice(rest);
        }
        2 => {
            let Some((&cut, rest)) = rest.split_first() else {
                return stream;
            };
            stream.extend_from_slice(&opening[..usize::from(cut) % opening.len()]);
            stream.extend_from_slice(rest);
        }
        _ => {
            let [at, flip, rest @ ..] = rest else {
                return stream;
            };
            stream.extend_from_slice(opening);
            stream[usize::from(*at) % opening.len()] ^= flip;
            stream.extend_from_slice(rest);
        }
    }
    stream
}
