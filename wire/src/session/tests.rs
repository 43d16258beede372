//! The sessions against each other: the simulated pair over thousands of random schedules, and
//! the edges one at a time.

use super::sim::{self, End, Program, Rng, Scenario, SIM_DRAIN_LIMIT};

/// How many randomized conversations one test run drives (`FERRY_SIM_RUNS` overrides).
fn runs() -> u64 {
    std::env::var("FERRY_SIM_RUNS")
        .ok()
        .and_then(|runs| runs.parse().ok())
        .unwrap_or(10_000)
}

/// Checks one conversation's outcome against the model; `Err` names the difference.
fn check(scenario: &Scenario, seed: u64) -> Result<usize, String> {
    let run = sim::run(scenario, seed, 2_000_000)?;
    run.client_end
        .map_err(|err| format!("the client session failed: {err}"))?;
    let expected = scenario.expected();
    let outcome = &run.outcome;
    if let Program::Flood { flood } = scenario.program {
        // Where the cut falls depends on the schedule; that it falls, and how, does not.
        let got = outcome.stdout.len();
        if outcome.end != expected.end
            || !outcome.stdout.iter().all(|b| *b == b'f')
            || got <= SIM_DRAIN_LIMIT
            || got > SIM_DRAIN_LIMIT + ferry_max_data()
            || got > flood
        {
            return Err(format!("flood: {got} bytes, end {:?}", outcome.end));
        }
        return Ok(run.steps);
    }
    if outcome != &expected {
        return Err(format!(
            "outcome differs: started {} / {}, stdout {} / {} bytes (equal: {}), stderr {} / {} bytes (equal: {}), end {:?} / {:?}",
            outcome.started,
            expected.started,
            outcome.stdout.len(),
            expected.stdout.len(),
            outcome.stdout == expected.stdout,
            outcome.stderr.len(),
            expected.stderr.len(),
            outcome.stderr == expected.stderr,
            outcome.end,
            expected.end
        ));
    }
    Ok(run.steps)
}

fn ferry_max_data() -> usize {
    crate::limits::MAX_DATA
}

#[test]
fn simulated_pair_ends_every_conversation_as_the_model_says() {
    let runs = runs();
    let mut steps = 0;
    let mut seen = [0usize; 6];
    for seed in 0..runs {
        let scenario = Scenario::random(&mut Rng::new(seed ^ 0x5eed));
        seen[match scenario.program {
            Program::Print { .. } => 0,
            Program::Cat => 1,
            Program::Head { .. } => 2,
            Program::Killed { .. } => 3,
            Program::Missing => 4,
            Program::Flood { .. } => 5,
        }] += 1;
        match check(&scenario, seed) {
            Ok(n) => steps += n,
            Err(err) => panic!(
                "seed {seed}: {err}\nscenario: {:?} with {} stdin bytes",
                match &scenario.program {
                    Program::Print {
                        stdout,
                        stderr,
                        code,
                    } => format!("print {}+{} bytes, exit {code}", stdout.len(), stderr.len()),
                    other => format!("{other:?}"),
                },
                scenario.stdin.as_ref().map_or(0, Vec::len)
            ),
        }
    }
    assert!(seen.iter().all(|n| *n > 0), "every program ran: {seen:?}");
    eprintln!("{runs} conversations, {steps} scheduler steps, programs {seen:?}");
}

/// The same conversation under different schedules ends the same way.
#[test]
fn schedules_do_not_change_results() {
    let scenario = Scenario {
        program: Program::Cat,
        stdin: Some(Rng::new(7).bytes(300_000)),
    };
    for seed in 0..200 {
        check(&scenario, seed).unwrap_or_else(|err| panic!("seed {seed}: {err}"));
    }
    let refused = Scenario {
        program: Program::Missing,
        stdin: None,
    };
    assert_eq!(
        refused.expected().end,
        End::Refused(crate::ErrorCode::NotFound)
    );
    for seed in 0..200 {
        check(&refused, seed).unwrap_or_else(|err| panic!("seed {seed}: {err}"));
    }
}

mod edges {
    //! Each rule the sessions enforce, broken once, deliberately.

    use super::super::*;
    use crate::limits::{MAX_DATA, MAX_FRAME, MAX_FRAME_BODY, STDIN_WINDOW};
    use crate::msg::*;
    use crate::{encode_agent_frame, encode_client_frame, Bytes};

    fn client_frame(frame: ClientFrame<'_>) -> Vec<u8> {
        let mut out = vec![0u8; MAX_FRAME];
        let n = encode_client_frame(&frame, &mut out).unwrap();
        out.truncate(n);
        out
    }

    fn agent_frame(frame: AgentFrame<'_>) -> Vec<u8> {
        let mut out = vec![0u8; MAX_FRAME];
        let n = encode_agent_frame(&frame, &mut out).unwrap();
        out.truncate(n);
        out
    }

    const EXEC: ExecRequest<'static> = ExecRequest {
        argv: StrList::new(b"cat\0"),
        env: StrList::new(b""),
        clean_env: false,
        cwd: None,
        stdin: StdinMode::Pipe,
    };

    fn hello() -> Vec<u8> {
        client_frame(ClientFrame::Hello(ClientHello::CURRENT))
    }

    fn agent_hello() -> Vec<u8> {
        agent_frame(AgentFrame::Hello(AgentHello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            agent_version: "t",
            limits: Limits::CURRENT,
        }))
    }

    /// An agent session that has taken the hello and [`EXEC`], the command not started yet.
    fn agent_given_exec() -> AgentSession {
        let mut session = AgentSession::new(AgentConfig::DEFAULT, 0);
        let bytes = [hello(), client_frame(ClientFrame::Exec(EXEC))].concat();
        let first = session.handle_input(&bytes, 0).unwrap().consumed;
        session.handle_input(&bytes[first..], 0).unwrap();
        session
    }

    /// Feeds `bytes` to an agent session; returns the error and what it sends in answer.
    fn agent_refuses(bytes: &[u8]) -> (SessionError, Option<ErrorCode>) {
        let mut session = AgentSession::new(AgentConfig::DEFAULT, 0);
        let mut rest = bytes;
        loop {
            match session.handle_input(rest, 0) {
                Ok(input) if input.consumed == 0 => panic!("accepted everything"),
                Ok(input) => rest = &rest[input.consumed..],
                Err(err) => {
                    let mut out = vec![0u8; MAX_FRAME];
                    let n = session.poll_transmit(&mut out).unwrap();
                    let mut sent = &out[..n];
                    let mut code = None;
                    while let Ok(Some((body, used))) = crate::split_frame(sent, MAX_FRAME_BODY) {
                        if let Ok(AgentFrame::Error(e)) = crate::decode_agent_frame(body) {
                            code = Some(e.code);
                        }
                        sent = &sent[used..];
                    }
                    assert!(session.is_closing());
                    return (err, code);
                }
            }
        }
    }

    #[test]
    fn agent_refuses_what_the_protocol_forbids() {
        let exec = client_frame(ClientFrame::Exec(EXEC));
        let stdin = |n: usize| client_frame(ClientFrame::Stdin(Bytes(&vec![1u8; n])));
        let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
            (
                "exec before hello",
                exec.clone(),
                ErrorCode::ProtocolViolation,
            ),
            (
                "two hellos",
                [hello(), hello()].concat(),
                ErrorCode::ProtocolViolation,
            ),
            (
                "stdin before exec",
                [hello(), stdin(1)].concat(),
                ErrorCode::ProtocolViolation,
            ),
            (
                "garbage",
                vec![2, 0, 0, 0, 0xff, 0xff],
                ErrorCode::Malformed,
            ),
            (
                "too large",
                (MAX_FRAME_BODY as u32 + 1).to_le_bytes().to_vec(),
                ErrorCode::FrameTooLarge,
            ),
            (
                "stdin beyond the window",
                [
                    hello(),
                    exec.clone(),
                    stdin(MAX_DATA),
                    stdin(STDIN_WINDOW - MAX_DATA),
                    stdin(1),
                ]
                .concat(),
                ErrorCode::ProtocolViolation,
            ),
            (
                "stdin after EOF",
                [
                    hello(),
                    exec.clone(),
                    client_frame(ClientFrame::StdinEof),
                    stdin(1),
                ]
                .concat(),
                ErrorCode::ProtocolViolation,
            ),
            (
                "a second request",
                [hello(), exec.clone(), exec.clone()].concat(),
                ErrorCode::ProtocolViolation,
            ),
            (
                "an empty argv",
                [
                    hello(),
                    client_frame(ClientFrame::Exec(ExecRequest {
                        argv: StrList::new(b""),
                        ..EXEC
                    })),
                ]
                .concat(),
                ErrorCode::InvalidRequest,
            ),
            (
                "a foreign magic",
                client_frame(ClientFrame::Hello(ClientHello {
                    magic: *b"SSH-",
                    ..ClientHello::CURRENT
                })),
                ErrorCode::UnsupportedVersion,
            ),
            (
                "no common version",
                client_frame(ClientFrame::Hello(ClientHello {
                    magic: MAGIC,
                    min_version: 9,
                    max_version: 12,
                })),
                ErrorCode::UnsupportedVersion,
            ),
        ];
        for (name, bytes, code) in cases {
            let (_, sent) = agent_refuses(&bytes);
            assert_eq!(sent, Some(code), "{name}");
        }
        // Exactly the window is fine.
        let mut session = AgentSession::new(AgentConfig::DEFAULT, 0);
        let bytes = [
            hello(),
            exec,
            stdin(MAX_DATA),
            stdin(STDIN_WINDOW - MAX_DATA),
        ]
        .concat();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            rest = &rest[session.handle_input(rest, 0).unwrap().consumed..];
        }
    }

    #[test]
    fn agent_handshake_and_final_send_deadlines() {
        let mut session = AgentSession::new(AgentConfig::DEFAULT, 100);
        let deadline = session.poll_timeout().unwrap();
        assert_eq!(deadline, 100 + AgentConfig::DEFAULT.handshake_timeout);
        assert_eq!(session.handle_timeout(deadline - 1), Ok(()));
        assert_eq!(
            session.handle_timeout(deadline),
            Err(SessionError::TimedOut {
                phase: Phase::Hello
            })
        );
        // The error frame is owed, within the final-send deadline.
        assert!(session.has_queued());
        let final_deadline = session.poll_timeout().unwrap();
        assert_eq!(
            final_deadline,
            deadline + AgentConfig::DEFAULT.final_send_timeout
        );
        assert!(session.handle_timeout(final_deadline).is_err());
        assert!(session.is_closed());
    }

    /// A driver that polls with the grace deadline must not spin once it has passed.
    #[test]
    fn agent_grace_deadline_is_reported_until_handled() {
        let mut session = agent_given_exec();
        session.started(5, 0).unwrap();
        assert_eq!(
            session.poll_timeout(),
            None,
            "a running command has no deadline"
        );
        session.child_exited(ExitStatus::Code(0), 1_000).unwrap();
        let grace_end = 1_000 + AgentConfig::DEFAULT.drain_grace;
        assert_eq!(session.poll_timeout(), Some(grace_end));
        session.handle_timeout(grace_end - 1).unwrap();
        assert_eq!(session.poll_timeout(), Some(grace_end));
        session.handle_timeout(grace_end).unwrap();
        assert_eq!(session.poll_timeout(), None);
        assert_eq!(session.output_phase(grace_end), OutputPhase::Drain);
    }

    #[test]
    fn agent_hello_only_is_a_health_check_and_a_disconnect_mid_command_is_not() {
        let mut session = AgentSession::new(AgentConfig::DEFAULT, 0);
        session.handle_input(&hello(), 0).unwrap();
        assert_eq!(session.handle_eof(), Ok(()));
        let mut session = agent_given_exec();
        session.started(5, 0).unwrap();
        assert!(matches!(
            session.handle_eof(),
            Err(SessionError::Disconnected { .. })
        ));
    }

    #[test]
    fn agent_final_frame_comes_last_and_only_once() {
        let mut session = agent_given_exec();
        let mut buf = vec![0u8; MAX_FRAME];
        assert_eq!(
            session.frame_output(&mut buf, crate::DataKind::Stdout, 1),
            Err(SessionError::InvalidState),
            "output before started"
        );
        assert_eq!(
            session.finish(0),
            Err(SessionError::InvalidState),
            "finish before exit"
        );
        session.started(5, 0).unwrap();
        session.child_exited(ExitStatus::Code(0), 10).unwrap();
        assert_eq!(session.output_phase(10), OutputPhase::Grace);
        assert_eq!(
            session.output_phase(10 + AgentConfig::DEFAULT.drain_grace),
            OutputPhase::Drain
        );
        session.finish(20).unwrap();
        assert_eq!(
            session.frame_output(&mut buf, crate::DataKind::Stdout, 1),
            Err(SessionError::InvalidState),
            "output after the termination record"
        );
        assert_eq!(
            session.refuse(Refusal::new(ErrorCode::Internal, "x"), 0),
            Err(SessionError::InvalidState)
        );
        // A one-byte buffer cannot take the frames: a typed error, and they stay queued.
        assert_eq!(
            session.poll_transmit(&mut [0u8; 1]),
            Err(SessionError::BufferTooSmall)
        );
        let n = session.poll_transmit(&mut buf).unwrap();
        assert!(n > 0);
        assert!(session.is_closed());
        assert_eq!(session.poll_transmit(&mut buf), Ok(0));
    }

    /// Feeds agent frames to a client session that pipelined an exec; returns the first error.
    fn client_rejects(frames: &[Vec<u8>]) -> SessionError {
        let mut session = ClientSession::new(0, None);
        let mut out = vec![0u8; MAX_FRAME];
        session.start_exec(&EXEC, &mut out).unwrap();
        let bytes = frames.concat();
        let mut rest = &bytes[..];
        loop {
            match session.handle_input(rest) {
                Ok(input) if input.consumed == 0 => panic!("accepted everything"),
                Ok(input) => {
                    // Spend credit as a client would, so grants have something to cover.
                    if let Some(ClientEvent::Started { .. }) = input.event {
                        session.send_stdin(b"xy", &mut out).unwrap();
                    }
                    rest = &rest[input.consumed..];
                }
                Err(err) => {
                    assert!(session.is_finished());
                    assert_eq!(session.handle_input(b"x"), Err(SessionError::InvalidState));
                    return err;
                }
            }
        }
    }

    #[test]
    fn client_rejects_what_the_protocol_forbids() {
        let started = agent_frame(AgentFrame::Started(Started { pid: 1 }));
        let out = agent_frame(AgentFrame::Stdout(Bytes(b"x")));
        let exited = agent_frame(AgentFrame::Exited(Termination {
            status: ExitStatus::Code(0),
            duration_us: 1,
            output_dropped: false,
        }));
        let unexpected = |frame, phase| SessionError::Unexpected { frame, phase };
        let cases = [
            (
                "started before hello",
                vec![started.clone()],
                unexpected(FrameKind::Started, Phase::Hello),
            ),
            (
                "output before started",
                vec![agent_hello(), out.clone()],
                unexpected(FrameKind::Stdout, Phase::Starting),
            ),
            (
                "a second hello",
                vec![agent_hello(), agent_hello()],
                unexpected(FrameKind::Hello, Phase::Starting),
            ),
            (
                "output after exit",
                vec![agent_hello(), started.clone(), exited.clone(), out.clone()],
                unexpected(FrameKind::Stdout, Phase::Done),
            ),
            (
                "credit beyond what was sent",
                vec![
                    agent_hello(),
                    started.clone(),
                    agent_frame(AgentFrame::StdinCredit(3)),
                ],
                SessionError::CreditExceeded,
            ),
            (
                "a ready report on an exec connection",
                vec![
                    agent_hello(),
                    agent_frame(AgentFrame::Ready(ReadyReport {
                        cid: 3,
                        init_started_us: 0,
                        modules_us: 0,
                        listening_us: 0,
                    })),
                ],
                unexpected(FrameKind::Ready, Phase::Starting),
            ),
            (
                "a foreign magic",
                vec![agent_frame(AgentFrame::Hello(AgentHello {
                    magic: *b"QEMU",
                    version: 1,
                    agent_version: "",
                    limits: Limits::CURRENT,
                }))],
                SessionError::NotFerry,
            ),
            (
                "a version we do not speak",
                vec![agent_frame(AgentFrame::Hello(AgentHello {
                    magic: MAGIC,
                    version: 7,
                    agent_version: "",
                    limits: Limits::CURRENT,
                }))],
                SessionError::UnsupportedVersion { chosen: 7 },
            ),
            (
                "garbage",
                vec![vec![1, 0, 0, 0, 0xee]],
                SessionError::Malformed,
            ),
            (
                "too large",
                vec![(MAX_FRAME_BODY as u32 + 1).to_le_bytes().to_vec()],
                SessionError::FrameTooLarge {
                    declared: MAX_FRAME_BODY as u32 + 1,
                },
            ),
        ];
        for (name, frames, expected) in cases {
            assert_eq!(client_rejects(&frames), expected, "{name}");
        }
    }

    #[test]
    fn client_credit_is_never_exceeded_and_eof_is_sent_once() {
        let mut session = ClientSession::new(0, None);
        let mut out = vec![0u8; MAX_FRAME];
        session.start_exec(&EXEC, &mut out).unwrap();
        // No credit before the agent's hello.
        assert_eq!(session.send_stdin(b"abc", &mut out).unwrap().taken, 0);
        session.handle_input(&agent_hello()).unwrap();
        let mut sent = 0;
        let big = vec![0u8; STDIN_WINDOW + 10];
        loop {
            let s = session.send_stdin(&big[sent..], &mut out).unwrap();
            if s.taken == 0 {
                break;
            }
            sent += s.taken;
        }
        assert_eq!(sent, STDIN_WINDOW);
        assert_eq!(session.stdin_credit(), 0);
        session.close_stdin().unwrap();
        session.close_stdin().unwrap();
        let n = session.poll_transmit(&mut out).unwrap();
        assert_eq!(&out[..n], &client_frame(ClientFrame::StdinEof)[..]);
        assert_eq!(session.poll_transmit(&mut out), Ok(0));
        assert_eq!(
            session.send_stdin(b"x", &mut out),
            Err(SessionError::InvalidState)
        );
    }

    #[test]
    fn client_refuses_misuse_and_oversized_requests_without_sending() {
        let mut session = ClientSession::new(0, None);
        let mut out = vec![0u8; MAX_FRAME];
        let too_long = vec![b'a'; crate::limits::MAX_ARGV_BYTES + 1];
        let mut argv = too_long.clone();
        argv.push(0);
        let request = ExecRequest {
            argv: StrList::new(&argv),
            ..EXEC
        };
        assert!(matches!(
            session.start_exec(&request, &mut out),
            Err(SessionError::InvalidRequest { .. })
        ));
        assert_eq!(
            session.start_exec(&EXEC, &mut [0u8; 3]),
            Err(SessionError::BufferTooSmall)
        );
        // Neither attempt changed anything: the real one still sends the hello first.
        let n = session.start_exec(&EXEC, &mut out).unwrap();
        assert!(out[..n].starts_with(&hello()));
        assert_eq!(
            session.start_exec(&EXEC, &mut out),
            Err(SessionError::InvalidState)
        );
    }

    #[test]
    fn client_hello_deadline_and_disconnects() {
        let mut session = ClientSession::new(1_000, Some(500));
        assert_eq!(session.poll_timeout(), Some(1_500));
        assert_eq!(session.handle_timeout(1_499), Ok(()));
        assert_eq!(
            session.handle_timeout(1_500),
            Err(SessionError::TimedOut {
                phase: Phase::Hello
            })
        );
        let mut session = ClientSession::new(0, Some(500));
        session.handle_input(&agent_hello()).unwrap_err();
        let mut session = ClientSession::new(0, Some(500));
        let mut out = vec![0u8; 64];
        session.poll_transmit(&mut out).unwrap();
        session.handle_input(&agent_hello()).unwrap();
        assert_eq!(
            session.poll_timeout(),
            None,
            "the deadline is only for the hello"
        );
        assert_eq!(session.handle_eof(0), Ok(()), "a health check ends cleanly");
        let mut session = ClientSession::new(0, None);
        session.start_exec(&EXEC, &mut vec![0u8; 256]).unwrap();
        assert_eq!(
            session.handle_eof(3),
            Err(SessionError::Disconnected {
                phase: Phase::Hello,
                mid_frame: true
            })
        );
    }

    #[test]
    fn agent_end_of_stream_after_stdin_eof_is_a_disconnect_too() {
        // A half-close after the end of stdin reads as an end of stream like any other: the
        // command is owed to nobody, so it ends (the agent kills its group).
        let mut session = AgentSession::new(AgentConfig::DEFAULT, 0);
        let bytes = [
            hello(),
            client_frame(ClientFrame::Exec(EXEC)),
            client_frame(ClientFrame::Stdin(Bytes(b"abc"))),
            client_frame(ClientFrame::StdinEof),
        ]
        .concat();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let input = session.handle_input(rest, 0).unwrap();
            if let Some(AgentEvent::Exec(_)) = input.event {
                session.started(5, 0).unwrap();
            }
            rest = &rest[input.consumed..];
        }
        assert!(!session.stdin_open());
        session.poll_transmit(&mut vec![0u8; MAX_FRAME]).unwrap();
        session.child_exited(ExitStatus::Code(0), 10).unwrap();
        assert_eq!(
            session.handle_eof(),
            Err(SessionError::Disconnected {
                phase: Phase::Running,
                mid_frame: false
            }),
            "even with the command exited and only its output left to send"
        );
        assert!(session.is_closed());
        assert_eq!(session.poll_transmit(&mut [0u8; 64]), Ok(0), "nothing owed");
    }

    /// The limits an agent is configured with are the ones it enforces (and announces), not
    /// only this crate's; one above this crate's own counts as this crate's.
    #[test]
    fn agent_enforces_its_configured_limits() {
        let tight = AgentConfig {
            limits: Limits {
                max_args: 2,
                ..Limits::CURRENT
            },
            ..AgentConfig::DEFAULT
        };
        let request = |argv: &'static [u8]| {
            let bytes = [
                hello(),
                client_frame(ClientFrame::Exec(ExecRequest {
                    argv: StrList::new(argv),
                    ..EXEC
                })),
            ]
            .concat();
            let mut session = AgentSession::new(tight, 0);
            let first = session.handle_input(&bytes, 0).unwrap().consumed;
            session
                .handle_input(&bytes[first..], 0)
                .map(|input| input.event.is_some())
        };
        assert_eq!(request(b"a\0b\0"), Ok(true));
        assert!(matches!(
            request(b"a\0b\0c\0"),
            Err(SessionError::InvalidRequest { .. })
        ));
        let generous = Limits {
            max_path: u32::MAX,
            ..Limits::CURRENT
        };
        let long_cwd = vec![b'd'; crate::limits::MAX_PATH + 1];
        let exec = ExecRequest {
            cwd: Some(crate::Bytes(&long_cwd)),
            ..EXEC
        };
        assert!(exec.validate_within(&generous).is_err(), "ours still bound");
    }

    /// A client told of tighter limits checks its request against them before sending.
    #[test]
    fn client_checks_requests_against_the_agents_limits() {
        let mut session = ClientSession::new(0, None);
        let tight = agent_frame(AgentFrame::Hello(AgentHello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            agent_version: "t",
            limits: Limits {
                max_args: 1,
                ..Limits::CURRENT
            },
        }));
        let mut out = vec![0u8; 256];
        session.poll_transmit(&mut out).unwrap();
        session.handle_input(&tight).unwrap();
        let two = ExecRequest {
            argv: StrList::new(b"a\0b\0"),
            ..EXEC
        };
        assert!(matches!(
            session.start_exec(&two, &mut out),
            Err(SessionError::InvalidRequest { .. })
        ));
        assert!(session.start_exec(&EXEC, &mut out).is_ok());
    }
}
