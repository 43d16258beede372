//! Authentication's edges, one at a time: every way a client can fail to prove the secret is
//! refused alike (the same error, byte-identical error frames), every way an agent can fail to
//! prove it is refused by the client, tampering with either hello in transit is noticed, and
//! kill-all is only for those who proved the secret. Last, a statistical look at the proof check's
//! timing.

use std::time::Instant;
use std::vec::Vec;

use super::tests::edges::{
    agent, agent_frame, agent_with, client_frame, client_with, feed_agent, hello, opening,
    opening_with, secret, Opening, AGENT_NONCE, CLIENT_NONCE, EXEC,
};
use super::*;
use crate::limits::{MAC_LEN, MAX_FRAME, MAX_FRAME_BODY, NONCE_LEN};
use crate::msg::*;
use crate::{decode_agent_frame, decode_client_frame, split_frame, ByteArray, Bytes};

/// The one answer to every failed proof: nothing else, whatever failed.
fn refusal_frame() -> Vec<u8> {
    agent_frame(AgentFrame::Error(ErrorFrame {
        code: ErrorCode::Unauthenticated,
        errno: 0,
        message: "authentication failed",
    }))
}

/// Feeds `bytes` (a client's whole side) to a fresh secure agent whose hello was already sent,
/// `piece` bytes at a time as a receive buffer fills; returns the error and every byte the agent
/// sends after its hello. Only the client's hello may be accepted on the way.
fn agent_answer(session: &mut AgentSession, bytes: &[u8], piece: usize) -> (SessionError, Vec<u8>) {
    let mut out = vec![0u8; MAX_FRAME];
    let n = session.poll_transmit(&mut out).unwrap();
    assert!(n > 0, "the agent's hello goes first");
    let mut consumed = 0;
    let mut arrived = 0;
    loop {
        let input = match session.handle_input(&bytes[consumed..arrived], 0) {
            Ok(input) => input,
            Err(err) => {
                assert!(session.is_closing());
                let n = session.poll_transmit(&mut out).unwrap();
                let sent = out[..n].to_vec();
                assert!(session.is_closed(), "the error frame is the last");
                // Whatever follows is not read.
                let hello = hello();
                let more = session.handle_input(&hello, 0).unwrap();
                assert!(more.event.is_none());
                assert_eq!(session.poll_transmit(&mut out), Ok(0));
                return (err, sent);
            }
        };
        match input.event {
            None if input.consumed == 0 => {
                assert!(arrived < bytes.len(), "the agent accepted everything");
                arrived = arrived.saturating_add(piece).min(bytes.len());
            }
            None | Some(AgentEvent::Hello) => consumed += input.consumed,
            Some(other) => panic!("accepted before a right proof: {other:?}"),
        }
    }
}

/// What a secure agent says to `bytes`, checked to be the one refusal.
fn assert_refused_alike(name: &str, bytes: &[u8]) {
    for piece in [bytes.len(), 1, 7] {
        let (err, sent) = agent_answer(&mut agent(), bytes, piece);
        assert_eq!(
            err,
            SessionError::Unauthenticated,
            "{name} (pieces of {piece})"
        );
        assert_eq!(sent, refusal_frame(), "{name} (pieces of {piece})");
    }
}

/// The agent's hello for `nonce` (default config, the edges' secret).
fn agent_hello_for(nonce: [u8; NONCE_LEN]) -> Vec<u8> {
    let auth = AgentAuth {
        nonce,
        secret: Some(secret()),
    };
    let mut session = AgentSession::new(AgentConfig::DEFAULT, 0, auth);
    let mut out = vec![0u8; 512];
    let n = session.poll_transmit(&mut out).unwrap();
    out.truncate(n);
    out
}

/// What a client with `secret` and `nonce` sends in answer to `agent_hello`: hello and proof.
fn client_answer(agent_hello: &[u8], secret: Option<Secret>, nonce: [u8; NONCE_LEN]) -> Vec<u8> {
    let mut session = ClientSession::new(0, None, ClientAuth { nonce, secret });
    session.handle_input(agent_hello).unwrap();
    let mut out = vec![0u8; 512];
    let n = session.poll_transmit(&mut out).unwrap();
    out.truncate(n);
    out
}

/// The frames in `bytes`, each with its header.
fn frames(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut rest = bytes;
    let mut frames = Vec::new();
    while let Some((_, used)) = split_frame(rest, MAX_FRAME_BODY).unwrap() {
        frames.push(rest[..used].to_vec());
        rest = &rest[used..];
    }
    assert!(rest.is_empty());
    frames
}

/// The client's proof frame in its hello-and-proof bytes, decoded: (nonce, mac).
fn proof_of(client: &[u8]) -> ([u8; NONCE_LEN], Vec<u8>) {
    let frames = frames(client);
    assert_eq!(frames.len(), 2, "hello and proof");
    match decode_client_frame(&frames[1][4..]).unwrap() {
        ClientFrame::Auth(proof) => (proof.nonce.0, proof.mac.0.to_vec()),
        other => panic!("{other:?}"),
    }
}

fn proof_frame(nonce: [u8; NONCE_LEN], mac: &[u8]) -> Vec<u8> {
    client_frame(ClientFrame::Auth(ClientProof {
        nonce: ByteArray(nonce),
        mac: Bytes(mac),
    }))
}

#[test]
fn a_right_proof_is_answered_with_the_agents_and_the_request_runs() {
    for piece in [usize::MAX, 1, 5] {
        let Opening { agent_hello, .. } = opening();
        let mut agent = agent();
        let mut client = client_with(Some(secret()));
        let mut out = vec![0u8; MAX_FRAME];
        assert_eq!(agent.poll_transmit(&mut out).unwrap(), agent_hello.len());
        client.handle_input(&agent_hello).unwrap();
        let n = client.start_exec(&EXEC, &mut out).unwrap();
        let bytes = out[..n].to_vec();
        // The agent, the bytes arriving in pieces: hello, proof, request.
        let mut events = Vec::new();
        let (mut consumed, mut arrived) = (0, 0);
        while consumed < bytes.len() {
            let input = agent.handle_input(&bytes[consumed..arrived], 0).unwrap();
            match input.event {
                None if input.consumed == 0 => {
                    arrived = arrived.saturating_add(piece).min(bytes.len())
                }
                None => consumed += input.consumed,
                Some(event) => {
                    events.push(match event {
                        AgentEvent::Hello => "hello",
                        AgentEvent::Authenticated => "authenticated",
                        AgentEvent::Exec(_) => "exec",
                        _ => "other",
                    });
                    consumed += input.consumed;
                }
            }
        }
        assert_eq!(events, ["hello", "authenticated", "exec"]);
        agent.started(42, 0).unwrap();
        let n = agent.poll_transmit(&mut out).unwrap();
        let answer = out[..n].to_vec();
        let mut rest = &answer[..];
        let mut events = Vec::new();
        while !rest.is_empty() {
            let input = client.handle_input(rest).unwrap();
            events.push(input.event.unwrap());
            rest = &rest[input.consumed..];
        }
        assert_eq!(
            events,
            [ClientEvent::Authenticated, ClientEvent::Started { pid: 42 }]
        );
        assert!(client.is_authenticated());
    }
}

/// Every way of not proving the secret, after a right hello, gets the same error and the same
/// bytes: the client learns nothing about what was wrong.
#[test]
fn every_failed_proof_is_refused_alike() {
    let Opening {
        agent_hello,
        client: right,
        agent_proof,
    } = opening();
    let (nonce, mac) = proof_of(&right);
    assert_eq!(mac.len(), MAC_LEN);
    let flipped = |at: usize| {
        let mut mac = mac.clone();
        mac[at] ^= 0x01;
        mac
    };
    let agent_mac = match decode_agent_frame(&agent_proof[4..]).unwrap() {
        AgentFrame::Authenticated(proof) => proof.mac.0,
        other => panic!("{other:?}"),
    };
    // Another connection's agent nonce: a right proof, for that connection.
    let other_connection = client_answer(
        &agent_hello_for([0x11; NONCE_LEN]),
        Some(secret()),
        CLIENT_NONCE,
    );
    let (_, other_connection_mac) = proof_of(&other_connection);
    // Another secret, the rest alike.
    let impostor = Secret::new(b"the edges' per-VM secreT").unwrap();
    let (_, wrong_secret_mac) =
        proof_of(&client_answer(&agent_hello, Some(impostor), CLIENT_NONCE));
    let mut trailing = proof_frame(nonce, &mac);
    trailing[0] += 1;
    trailing.push(0);
    let exec = client_frame(ClientFrame::Exec(EXEC));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "a proof wrong in its first byte",
            proof_frame(nonce, &flipped(0)),
        ),
        (
            "a proof wrong in its last byte",
            proof_frame(nonce, &flipped(MAC_LEN - 1)),
        ),
        ("a proof of zeros", proof_frame(nonce, &[0; MAC_LEN])),
        (
            "a proof made with another secret",
            proof_frame(nonce, &wrong_secret_mac),
        ),
        (
            "a right proof under another client nonce",
            proof_frame([0x77; NONCE_LEN], &mac),
        ),
        (
            "a proof for another connection's nonce",
            proof_frame(nonce, &other_connection_mac),
        ),
        (
            "the agent's proof reflected",
            proof_frame(nonce, &agent_mac),
        ),
        ("a short proof", proof_frame(nonce, &mac[..MAC_LEN - 1])),
        (
            "a long proof",
            proof_frame(nonce, &[mac.as_slice(), &[0]].concat()),
        ),
        (
            "a proof twice as long",
            proof_frame(nonce, &[mac.as_slice(), &mac].concat()),
        ),
        ("an empty proof", proof_frame(nonce, &[])),
        ("a right proof with a trailing byte", trailing),
        ("no proof: an exec", exec.clone()),
        ("no proof: a kill-all", client_frame(ClientFrame::KillAll)),
        (
            "no proof: stdin",
            client_frame(ClientFrame::Stdin(Bytes(b"x"))),
        ),
        ("no proof: stdin EOF", client_frame(ClientFrame::StdinEof)),
        (
            "no proof: a piece of a request",
            client_frame(ClientFrame::ExecPart(ExecPart {
                list: ListKind::Argv,
                data: Bytes(b"cat\0"),
            })),
        ),
        ("no proof: a signal", client_frame(ClientFrame::Signal(9))),
        (
            "no proof: a signal that does not exist",
            client_frame(ClientFrame::Signal(0)),
        ),
        (
            "no proof: a resize",
            client_frame(ClientFrame::Resize(WindowSize { rows: 1, cols: 1 })),
        ),
        (
            "no proof: a cancel",
            client_frame(ClientFrame::Cancel(Cancel { grace_ms: None })),
        ),
        ("a second hello", hello()),
        ("garbage", vec![2, 0, 0, 0, 0xff, 0xff]),
        ("an unknown frame", vec![1, 0, 0, 0, 0x77]),
        ("an empty frame", vec![0, 0, 0, 0]),
        ("a nonce too short to decode", {
            let mut frame = proof_frame(nonce, &mac);
            frame[5] = NONCE_LEN as u8 - 1;
            frame
        }),
        (
            "a frame too large",
            (MAX_FRAME_BODY as u32 + 1).to_le_bytes().to_vec(),
        ),
        (
            "a frame of the largest length",
            u32::MAX.to_le_bytes().to_vec(),
        ),
    ];
    for (name, attempt) in cases {
        // A request behind the attempt changes nothing: it is not even looked at.
        assert_refused_alike(name, &[hello(), attempt.clone()].concat());
        assert_refused_alike(name, &[hello(), attempt, exec.clone()].concat());
    }
}

/// A whole opening captured from one conversation (which succeeded) and replayed on another
/// connection: the agent's nonce differs, so the proof is worthless.
#[test]
fn a_replayed_opening_is_refused_alike() {
    let first_nonce = [0x42; NONCE_LEN];
    let auth = AgentAuth {
        nonce: first_nonce,
        secret: Some(secret()),
    };
    let mut first = AgentSession::new(AgentConfig::DEFAULT, 0, auth);
    let mut out = vec![0u8; MAX_FRAME];
    let n = first.poll_transmit(&mut out).unwrap();
    let captured = client_answer(&out[..n], Some(secret()), CLIENT_NONCE);
    let captured = [captured, client_frame(ClientFrame::Exec(EXEC))].concat();
    // It worked there.
    feed_agent(&mut first, &captured).unwrap();
    assert_eq!(first.phase(), Phase::Starting);
    // Not here, byte for byte the same refusal as any other.
    assert_ne!(first_nonce, AGENT_NONCE);
    assert_refused_alike("a replayed opening", &captured);
    // Nor on a connection that happens to get the same nonce from a different agent config
    // (a hello that differs elsewhere).
    let other = AgentConfig {
        agent_version: "other",
        ..AgentConfig::DEFAULT
    };
    let auth = AgentAuth {
        nonce: first_nonce,
        secret: Some(secret()),
    };
    let (err, sent) = agent_answer(&mut AgentSession::new(other, 0, auth), &captured, 3);
    assert_eq!(
        (err, sent),
        (SessionError::Unauthenticated, refusal_frame())
    );
}

/// A bit flipped anywhere in the proof frame's body, in transit: refused alike.
#[test]
fn any_flip_in_the_proof_is_refused_alike() {
    let right = opening().client;
    let hello_len = hello().len();
    for at in hello_len + 4..right.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut bytes = right.clone();
            bytes[at] ^= mask;
            let (err, sent) = agent_answer(&mut agent(), &bytes, usize::MAX);
            assert_eq!(err, SessionError::Unauthenticated, "byte {at} ^ {mask:#x}");
            assert_eq!(sent, refusal_frame(), "byte {at} ^ {mask:#x}");
        }
    }
}

/// The agent's hello, changed in transit (a downgrade to insecure, tighter or looser limits,
/// other bounds, another nonce …): the client's proof covers the hello it saw, so the agent,
/// which hashed the hello it sent, refuses it.
#[test]
fn a_hello_tampered_in_transit_is_noticed() {
    let Opening { agent_hello, .. } = opening();
    let original = match decode_agent_frame(&agent_hello[4..]).unwrap() {
        AgentFrame::Hello(hello) => hello,
        other => panic!("{other:?}"),
    };
    let tampered: Vec<(&str, AgentHello<'_>)> = vec![
        (
            "limits: a smaller stdin window",
            AgentHello {
                limits: Limits {
                    stdin_window: original.limits.stdin_window / 2,
                    ..original.limits
                },
                ..original
            },
        ),
        (
            "limits: fewer arguments",
            AgentHello {
                limits: Limits {
                    max_args: 1,
                    ..original.limits
                },
                ..original
            },
        ),
        (
            "bounds: no cgroup",
            AgentHello {
                bounds: Bounds {
                    cgroup: !original.bounds.cgroup,
                    ..original.bounds
                },
                ..original
            },
        ),
        (
            "bounds: another default user",
            AgentHello {
                bounds: Bounds {
                    default_uid: 0,
                    ..original.bounds
                },
                ..original
            },
        ),
        (
            "another nonce",
            AgentHello {
                nonce: ByteArray([0; NONCE_LEN]),
                ..original
            },
        ),
        (
            "another agent version",
            AgentHello {
                agent_version: "9.9.9",
                ..original
            },
        ),
        (
            "a wider version range",
            AgentHello {
                min_version: 1,
                version: PROTOCOL_VERSION + 1,
                ..original
            },
        ),
    ];
    for (name, hello) in tampered {
        let seen = agent_frame(AgentFrame::Hello(hello));
        let answer = client_answer(&seen, Some(secret()), CLIENT_NONCE);
        let (err, sent) = agent_answer(&mut agent(), &answer, usize::MAX);
        assert_eq!(
            (err, sent),
            (SessionError::Unauthenticated, refusal_frame()),
            "{name}"
        );
    }

    // A downgrade to insecure: a client with a secret refuses at once, and sends nothing.
    let insecure = agent_frame(AgentFrame::Hello(AgentHello {
        security: Security::Insecure,
        ..original
    }));
    let mut client = client_with(Some(secret()));
    assert_eq!(
        client.handle_input(&insecure),
        Err(SessionError::AgentInsecure)
    );
    assert_eq!(client.poll_transmit(&mut [0u8; 256]), Ok(0));
    // A client without one goes ahead, without a proof: the real agent refuses it.
    let mut client = client_with(None);
    client.handle_input(&insecure).unwrap();
    let mut out = vec![0u8; MAX_FRAME];
    let n = client.start_exec(&EXEC, &mut out).unwrap();
    let (err, sent) = agent_answer(&mut agent(), &out[..n], usize::MAX);
    assert_eq!(
        (err, sent),
        (SessionError::Unauthenticated, refusal_frame())
    );

    // Exhaustively: any bit flipped anywhere in the hello's body either makes the client
    // refuse the hello, or makes the agent refuse the client's proof.
    let mut accepted = 0;
    for at in 4..agent_hello.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut seen = agent_hello.clone();
            seen[at] ^= mask;
            let mut client = client_with(Some(secret()));
            if client.handle_input(&seen).is_err() {
                continue;
            }
            accepted += 1;
            let answer = client.poll_transmit(&mut out).unwrap();
            let (err, sent) = agent_answer(&mut agent(), &out[..answer], usize::MAX);
            assert_eq!(
                (err, sent),
                (SessionError::Unauthenticated, refusal_frame()),
                "byte {at} ^ {mask:#x}"
            );
        }
    }
    assert!(accepted > 100, "most flips still decode: {accepted}");
}

/// The client's hello, changed in transit: the agent hashed the one it received, the client
/// the one it sent; the proof does not match.
#[test]
fn a_client_hello_tampered_in_transit_is_noticed() {
    let right = opening().client;
    let hello_len = hello().len();
    let mut refused_proofs = 0;
    for at in 4..hello_len {
        for mask in [0x01u8, 0x02, 0x80, 0xff] {
            let mut bytes = right.clone();
            bytes[at] ^= mask;
            let mut session = agent();
            let mut out = vec![0u8; MAX_FRAME];
            session.poll_transmit(&mut out).unwrap();
            let first = session.handle_input(&bytes, 0);
            // A hello that no longer reads as ours is refused as such; one that does (a
            // different version range) gets its proof refused.
            let Ok(first) = first else { continue };
            assert!(
                matches!(first.event, Some(AgentEvent::Hello)),
                "byte {at} ^ {mask:#x}"
            );
            let err = session
                .handle_input(&bytes[first.consumed..], 0)
                .unwrap_err();
            let n = session.poll_transmit(&mut out).unwrap();
            assert_eq!(
                (err, &out[..n]),
                (SessionError::Unauthenticated, &refusal_frame()[..]),
                "byte {at} ^ {mask:#x}"
            );
            refused_proofs += 1;
        }
    }
    assert!(refused_proofs > 0, "some flips keep the hello valid");
}

/// The client believes nothing about an operation before the agent proved the secret, and
/// refuses a proof that is wrong, stale or an impostor's.
#[test]
fn the_client_refuses_an_agent_that_does_not_prove_the_secret() {
    let Opening {
        agent_hello,
        agent_proof,
        ..
    } = opening();
    let client_after_hello = |secret: Option<Secret>| {
        let mut client = client_with(secret);
        client.handle_input(&agent_hello).unwrap();
        client.start_exec(&EXEC, &mut vec![0u8; MAX_FRAME]).unwrap();
        client
    };
    // A wrong proof, anywhere in its MAC.
    for at in 6..agent_proof.len() {
        let mut wrong = agent_proof.clone();
        wrong[at] ^= 0x01;
        let mut client = client_after_hello(Some(secret()));
        assert_eq!(
            client.handle_input(&wrong),
            Err(SessionError::Unauthenticated),
            "{at}"
        );
        assert!(client.is_finished() && !client.is_authenticated());
        assert_eq!(
            client.handle_input(&agent_proof),
            Err(SessionError::InvalidState)
        );
    }
    // A right proof for another client's nonce (captured from another conversation with the
    // same agent nonce): the agent's proof is fresh for each client.
    let mut other_agent = agent();
    let mut out = vec![0u8; MAX_FRAME];
    other_agent.poll_transmit(&mut out).unwrap();
    feed_agent(
        &mut other_agent,
        &client_answer(&agent_hello, Some(secret()), [9; NONCE_LEN]),
    )
    .unwrap();
    let n = other_agent.poll_transmit(&mut out).unwrap();
    let stale = out[..n].to_vec();
    assert_ne!(stale, agent_proof);
    let mut client = client_after_hello(Some(secret()));
    assert_eq!(
        client.handle_input(&stale),
        Err(SessionError::Unauthenticated)
    );
    // An impostor's: made with another secret.
    let impostor = Secret::new(b"an impostor's secret!").unwrap();
    let mut fake = agent_with(AgentConfig::DEFAULT, Some(impostor.clone()));
    fake.poll_transmit(&mut out).unwrap();
    feed_agent(
        &mut fake,
        &client_answer(&agent_hello, Some(impostor), CLIENT_NONCE),
    )
    .unwrap();
    let n = fake.poll_transmit(&mut out).unwrap();
    let mut client = client_after_hello(Some(secret()));
    assert_eq!(
        client.handle_input(&out[..n]),
        Err(SessionError::Unauthenticated)
    );

    // Anything about the operation before the proof is out of order.
    let unexpected = |frame| SessionError::Unexpected {
        frame,
        phase: Phase::Starting,
    };
    let before_proof = [
        (
            agent_frame(AgentFrame::Started(Started { pid: 1 })),
            unexpected(FrameKind::Started),
        ),
        (
            agent_frame(AgentFrame::Stdout(crate::Output {
                at_us: 0,
                data: Bytes(b"x"),
            })),
            unexpected(FrameKind::Stdout),
        ),
        (
            agent_frame(AgentFrame::Exited(Termination {
                status: ExitStatus::Code(0),
                duration_us: 0,
                output_dropped: false,
                ending: Ending::Exited,
                tree_kill: TreeKill::None,
                stdout: StreamRecord::default(),
                stderr: StreamRecord::default(),
                pipes_held: false,
                oom_killed: false,
                peak_memory: 0,
            })),
            unexpected(FrameKind::Exited),
        ),
        (
            agent_frame(AgentFrame::Done(DoneReport { count: 1 })),
            unexpected(FrameKind::Done),
        ),
        (
            agent_frame(AgentFrame::StdinCredit(1)),
            unexpected(FrameKind::StdinCredit),
        ),
    ];
    for (frame, expected) in before_proof {
        let mut client = client_after_hello(Some(secret()));
        assert_eq!(client.handle_input(&frame), Err(expected));
        assert!(!client.is_authenticated());
    }
    // A kill-all's report before the proof, likewise.
    let mut client = client_with(Some(secret()));
    client.handle_input(&agent_hello).unwrap();
    client.start_kill_all(&mut out).unwrap();
    assert_eq!(
        client.handle_input(&agent_frame(AgentFrame::Done(DoneReport { count: 1 }))),
        Err(unexpected(FrameKind::Done))
    );

    // The security modes must match the client's: a secret for a secure agent, none for an
    // insecure one.
    let insecure = opening_with(AgentConfig::DEFAULT, None);
    let mut client = client_with(Some(secret()));
    assert_eq!(
        client.handle_input(&insecure.agent_hello),
        Err(SessionError::AgentInsecure)
    );
    assert_eq!(client.poll_transmit(&mut out), Ok(0), "no hello, no proof");
    let mut client = client_with(None);
    assert_eq!(
        client.handle_input(&agent_hello),
        Err(SessionError::SecretRequired)
    );
    assert_eq!(client.poll_transmit(&mut out), Ok(0));
    // An insecure agent has nothing to prove: a proof from it is out of order.
    let mut client = client_with(None);
    client.handle_input(&insecure.agent_hello).unwrap();
    assert!(client.is_authenticated());
    client.start_exec(&EXEC, &mut out).unwrap();
    assert_eq!(
        client.handle_input(&agent_proof),
        Err(unexpected(FrameKind::Authenticated))
    );
}

/// Kill-all is an operation like exec: after the proof only, answered with `Done`.
#[test]
fn kill_all_is_only_for_the_authenticated() {
    let mut out = vec![0u8; MAX_FRAME];
    // Before the agent's hello, or behind another operation, the client refuses to send it.
    let mut client = client_with(Some(secret()));
    assert_eq!(
        client.start_kill_all(&mut out),
        Err(SessionError::InvalidState)
    );
    let Opening { agent_hello, .. } = opening();
    client.handle_input(&agent_hello).unwrap();
    client.start_exec(&EXEC, &mut out).unwrap();
    assert_eq!(
        client.start_kill_all(&mut out),
        Err(SessionError::InvalidState)
    );

    // Without a proof, refused alike (see `every_failed_proof_is_refused_alike`); with one:
    let mut agent = agent();
    let mut client = client_with(Some(secret()));
    let n = agent.poll_transmit(&mut out).unwrap();
    client.handle_input(&out[..n]).unwrap();
    let n = client.start_kill_all(&mut out).unwrap();
    assert_eq!(
        client.start_kill_all(&mut out),
        Err(SessionError::InvalidState),
        "one operation per connection"
    );
    let bytes = out[..n].to_vec();
    let mut rest = &bytes[..];
    let mut kill_all = false;
    while !rest.is_empty() {
        let input = agent.handle_input(rest, 0).unwrap();
        kill_all |= matches!(input.event, Some(AgentEvent::KillAll));
        rest = &rest[input.consumed..];
    }
    assert!(kill_all);
    assert_eq!(agent.phase(), Phase::Starting);
    assert_eq!(agent.poll_timeout(), None, "the driver takes its time");
    assert_eq!(agent.started(1, 0), Err(SessionError::InvalidState));
    assert_eq!(agent.finish(0), Err(SessionError::InvalidState));
    agent.done(4, 0).unwrap();
    assert_eq!(agent.done(4, 0), Err(SessionError::InvalidState), "once");
    let n = agent.poll_transmit(&mut out).unwrap();
    assert!(agent.is_closed());
    let answer = out[..n].to_vec();
    let mut rest = &answer[..];
    let mut events = Vec::new();
    while !rest.is_empty() {
        let input = client.handle_input(rest).unwrap();
        events.push(input.event.unwrap());
        rest = &rest[input.consumed..];
    }
    assert_eq!(
        events,
        [
            ClientEvent::Authenticated,
            ClientEvent::Done(DoneReport { count: 4 })
        ]
    );
    assert!(client.is_finished());
    assert_eq!(client.handle_eof(0), Ok(()));

    // The agent may refuse it instead (no cgroup to kill by).
    let mut agent = self::agent();
    let bytes = [opening().client, client_frame(ClientFrame::KillAll)].concat();
    feed_agent(&mut agent, &bytes).unwrap();
    agent
        .refuse(Refusal::new(ErrorCode::Unsupported, "no cgroup"), 0)
        .unwrap();
    assert_eq!(agent.done(0, 0), Err(SessionError::InvalidState));

    // An insecure agent takes it without a proof.
    let mut agent = agent_with(AgentConfig::DEFAULT, None);
    let bytes = [hello(), client_frame(ClientFrame::KillAll)].concat();
    let mut rest = &bytes[..];
    let mut kill_all = false;
    while !rest.is_empty() {
        let input = agent.handle_input(rest, 0).unwrap();
        kill_all |= matches!(input.event, Some(AgentEvent::KillAll));
        rest = &rest[input.consumed..];
    }
    assert!(kill_all);
    agent.done(0, 0).unwrap();
}

/// `done` answers a kill-all and nothing else: in every other state it is refused.
#[test]
fn done_outside_a_kill_all_is_invalid() {
    let open = opening().client;
    let exec = client_frame(ClientFrame::Exec(EXEC));
    let states: Vec<(&str, Vec<u8>)> = vec![
        ("awaiting the hello", Vec::new()),
        ("awaiting the proof", hello()),
        ("awaiting the request", open.clone()),
        ("starting an exec", [open.clone(), exec.clone()].concat()),
    ];
    for (name, bytes) in states {
        let mut agent = agent();
        feed_agent(&mut agent, &bytes).unwrap();
        assert_eq!(agent.done(1, 0), Err(SessionError::InvalidState), "{name}");
    }
    let mut agent = agent();
    feed_agent(&mut agent, &[open.clone(), exec].concat()).unwrap();
    agent.started(5, 0).unwrap();
    assert_eq!(agent.done(1, 0), Err(SessionError::InvalidState), "running");
    agent.child_exited(ExitStatus::Code(0), 1).unwrap();
    agent.finish(1).unwrap();
    assert_eq!(agent.done(1, 0), Err(SessionError::InvalidState), "closing");
    // After a refused proof.
    let mut agent = self::agent();
    let wrong = [hello(), client_frame(ClientFrame::KillAll)].concat();
    assert!(feed_agent(&mut agent, &wrong).is_err());
    assert_eq!(agent.done(1, 0), Err(SessionError::InvalidState), "refused");
    // After the client left.
    let mut agent = self::agent();
    feed_agent(
        &mut agent,
        &[open, client_frame(ClientFrame::KillAll)].concat(),
    )
    .unwrap();
    // A client that half-closed after its request is still owed the report.
    assert_eq!(agent.handle_eof(), Ok(()));
    assert!(agent.input_closed());
    assert_eq!(agent.done(1, 0), Ok(()), "still owed");
    assert_eq!(agent.done(1, 0), Err(SessionError::InvalidState), "once");
}

/// A review aid, not a proof: the time to check a client's proof must not depend on where it
/// is wrong. The comparison is `digest::Mac::verify_slice` (what `hmac`'s `Hmac` uses), which
/// compares with `subtle::ConstantTimeEq` after computing the MAC; a leak would show as a
/// difference between a proof wrong in its first byte and one wrong in its last (a `memcmp`
/// stops early). The MAC computation dominates each call, so this catches gross leaks (an
/// early return, a data-dependent branch before the MAC), not a few cycles.
///
/// Against noise: the classes run in short batches, interleaved in rotating order, and are
/// compared by the median of their per-round ratios (so drift in load or clock frequency over
/// the run cancels out), with the medians of the batches reported; a noisy run is retried.
#[test]
fn checking_a_proof_takes_as_long_wherever_it_is_wrong() {
    let secret = secret();
    let transcript = [3u8; 32];
    let nonce = [4u8; NONCE_LEN];
    let right = secret.client_proof(&transcript, &nonce);
    let mut first = right;
    first[0] ^= 0x01;
    let mut last = right;
    last[MAC_LEN - 1] ^= 0x01;
    let mut all = right;
    for byte in &mut all {
        *byte ^= 0xff;
    }
    let classes: [(&str, [u8; MAC_LEN], bool); 4] = [
        ("wrong in the first byte", first, false),
        ("wrong in the last byte (right but the last)", last, false),
        ("wrong in every byte", all, false),
        ("right", right, true),
    ];
    const ROUNDS: usize = 2_000;
    const PER_BATCH: usize = 100; // 200,000 checks per class
    const BOUND: f64 = 0.10;
    let median = |values: &mut Vec<f64>| {
        values.sort_by(|a, b| a.total_cmp(b));
        values[values.len() / 2]
    };
    let mut attempts = Vec::new();
    for attempt in 0..3 {
        let mut times = vec![Vec::with_capacity(ROUNDS); classes.len()];
        for round in 0..ROUNDS {
            for k in 0..classes.len() {
                let index = (round + k) % classes.len();
                let (_, proof, expected) = &classes[index];
                let start = Instant::now();
                for _ in 0..PER_BATCH {
                    let ok = secret.verify_client_proof(
                        std::hint::black_box(&transcript),
                        std::hint::black_box(&nonce),
                        std::hint::black_box(proof),
                    );
                    assert_eq!(std::hint::black_box(ok), *expected);
                }
                times[index].push(start.elapsed().as_nanos().max(1) as f64);
            }
        }
        // The wrong classes against each other: the ones an attacker chooses between.
        let mut worst: f64 = 0.0;
        let mut ratios = Vec::new();
        for (a, b) in [(0, 1), (0, 2), (1, 2)] {
            let mut per_round: Vec<f64> = (0..ROUNDS).map(|r| times[a][r] / times[b][r]).collect();
            let ratio = median(&mut per_round);
            worst = worst.max((ratio - 1.0).abs());
            ratios.push(format!("{a}/{b} {ratio:.3}"));
        }
        let report: Vec<String> = classes
            .iter()
            .zip(&mut times)
            .map(|((name, _, _), ns)| format!("{name}: {:.0} ns", median(ns) / PER_BATCH as f64))
            .collect();
        eprintln!(
            "attempt {attempt}: ratios {} ({})",
            ratios.join(", "),
            report.join(", ")
        );
        if worst < BOUND {
            return;
        }
        attempts.push((worst, ratios, report));
    }
    panic!("the proof check's time depends on where the proof is wrong: {attempts:?}");
}
