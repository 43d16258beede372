//! The sessions against each other: the simulated pair over thousands of random schedules, and
//! the edges one at a time.

use super::sim::{self, End, Mode, Program, Rng, Scenario, SIM_DRAIN_LIMIT};

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
    // Every conversation that got as far as the agent's answer was authenticated: the proof
    // comes before anything else the agent says, a refusal included.
    if !run.authenticated {
        return Err(format!(
            "{:?}: the agent never proved itself",
            scenario.mode
        ));
    }
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

/// Drives `runs()` random conversations in `mode`; returns the programs seen.
fn simulate(mode: Mode, salt: u64) {
    let runs = runs();
    let mut steps = 0;
    let mut seen = [0usize; 7];
    for seed in 0..runs {
        let scenario = Scenario::random(&mut Rng::new(seed ^ salt), mode);
        seen[match scenario.program {
            Program::Print { .. } => 0,
            Program::Cat => 1,
            Program::Head { .. } => 2,
            Program::Killed { .. } => 3,
            Program::Missing => 4,
            Program::Flood { .. } => 5,
            Program::KillAll { .. } => 6,
        }] += 1;
        match check(&scenario, seed) {
            Ok(n) => steps += n,
            Err(err) => panic!(
                "{mode:?} seed {seed}: {err}\nscenario: {:?} with {} stdin bytes",
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
    eprintln!("{mode:?}: {runs} conversations, {steps} scheduler steps, programs {seen:?}");
}

#[test]
fn simulated_pair_ends_every_conversation_as_the_model_says() {
    simulate(Mode::Secure, 0x5eed);
}

#[test]
fn simulated_insecure_pair_ends_every_conversation_as_the_model_says() {
    simulate(Mode::Insecure, 0x1_5eed);
}

/// The same conversation under different schedules ends the same way.
#[test]
fn schedules_do_not_change_results() {
    for mode in [Mode::Secure, Mode::Insecure] {
        let scenario = Scenario {
            program: Program::Cat,
            stdin: Some(Rng::new(7).bytes(300_000)),
            mode,
        };
        for seed in 0..200 {
            check(&scenario, seed).unwrap_or_else(|err| panic!("{mode:?} seed {seed}: {err}"));
        }
        let refused = Scenario {
            program: Program::Missing,
            stdin: None,
            mode,
        };
        assert_eq!(
            refused.expected().end,
            End::Refused(crate::ErrorCode::NotFound)
        );
        for seed in 0..200 {
            check(&refused, seed).unwrap_or_else(|err| panic!("{mode:?} seed {seed}: {err}"));
        }
        let kill_all = Scenario {
            program: Program::KillAll { count: 5 },
            stdin: None,
            mode,
        };
        assert_eq!(kill_all.expected().end, End::Done(5));
        for seed in 0..200 {
            check(&kill_all, seed).unwrap_or_else(|err| panic!("{mode:?} seed {seed}: {err}"));
        }
    }
}

pub(super) mod edges {
    //! Each rule the sessions enforce, broken once, deliberately.

    use super::super::*;
    use crate::limits::{MAX_DATA, MAX_FRAME, MAX_FRAME_BODY, NONCE_LEN, STDIN_WINDOW};
    use crate::msg::*;
    use crate::{encode_agent_frame, encode_client_frame, Bytes};

    pub(in crate::session) const SECRET: &[u8] = b"the edges' per-VM secret";
    pub(in crate::session) const AGENT_NONCE: [u8; NONCE_LEN] = [0xA5; NONCE_LEN];
    pub(in crate::session) const CLIENT_NONCE: [u8; NONCE_LEN] = [0x5C; NONCE_LEN];

    pub(in crate::session) fn secret() -> Secret {
        Secret::new(SECRET).unwrap()
    }

    pub(in crate::session) fn client_frame(frame: ClientFrame<'_>) -> Vec<u8> {
        let mut out = vec![0u8; MAX_FRAME];
        let n = encode_client_frame(&frame, &mut out).unwrap();
        out.truncate(n);
        out
    }

    pub(in crate::session) fn agent_frame(frame: AgentFrame<'_>) -> Vec<u8> {
        let mut out = vec![0u8; MAX_FRAME];
        let n = encode_agent_frame(&frame, &mut out).unwrap();
        out.truncate(n);
        out
    }

    pub(in crate::session) const EXEC: ExecRequest<'static> = ExecRequest {
        argv: StrList::new(b"cat\0"),
        env: StrList::new(b""),
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

    /// The client's hello alone.
    pub(in crate::session) fn hello() -> Vec<u8> {
        client_frame(ClientFrame::Hello(ClientHello::CURRENT))
    }

    /// An agent session with [`AGENT_NONCE`].
    pub(in crate::session) fn agent_with(
        config: AgentConfig,
        secret: Option<Secret>,
    ) -> AgentSession {
        let auth = AgentAuth {
            nonce: AGENT_NONCE,
            secret,
        };
        AgentSession::new(config, 0, auth)
    }

    /// A secure agent session with the default config.
    pub(in crate::session) fn agent() -> AgentSession {
        agent_with(AgentConfig::DEFAULT, Some(secret()))
    }

    /// A client session with [`CLIENT_NONCE`].
    pub(in crate::session) fn client_with(secret: Option<Secret>) -> ClientSession {
        let auth = ClientAuth {
            nonce: CLIENT_NONCE,
            secret,
        };
        ClientSession::new(0, None, auth)
    }

    /// A right opening between a real client and a real agent (fixed nonces, so the bytes are
    /// the same for every agent made by [`agent_with`] with the same config and secret).
    pub(in crate::session) struct Opening {
        /// The agent's hello, as it sends it.
        pub agent_hello: Vec<u8>,
        /// The client's hello and (when secure) its proof.
        pub client: Vec<u8>,
        /// The agent's proof (empty when insecure).
        pub agent_proof: Vec<u8>,
    }

    pub(in crate::session) fn opening_with(config: AgentConfig, secret: Option<Secret>) -> Opening {
        let mut agent = agent_with(config, secret.clone());
        let mut out = vec![0u8; MAX_FRAME];
        let n = agent.poll_transmit(&mut out).unwrap();
        let agent_hello = out[..n].to_vec();
        let mut client = client_with(secret);
        assert_eq!(
            client.handle_input(&agent_hello).unwrap().consumed,
            agent_hello.len()
        );
        let n = client.poll_transmit(&mut out).unwrap();
        let client_bytes = out[..n].to_vec();
        feed_agent(&mut agent, &client_bytes).unwrap();
        let n = agent.poll_transmit(&mut out).unwrap();
        Opening {
            agent_hello,
            client: client_bytes,
            agent_proof: out[..n].to_vec(),
        }
    }

    pub(in crate::session) fn opening() -> Opening {
        opening_with(AgentConfig::DEFAULT, Some(secret()))
    }

    /// Feeds all of `bytes` to `agent`; the events are dropped.
    pub(in crate::session) fn feed_agent(
        agent: &mut AgentSession,
        bytes: &[u8],
    ) -> Result<(), SessionError> {
        let mut rest = bytes;
        while !rest.is_empty() {
            let input = agent.handle_input(rest, 0)?;
            assert!(input.consumed > 0, "bytes end mid-frame");
            rest = &rest[input.consumed..];
        }
        Ok(())
    }

    /// An agent session that has taken the opening and [`EXEC`], the command not started yet.
    fn agent_given_exec() -> AgentSession {
        let mut session = agent();
        let bytes = [opening().client, client_frame(ClientFrame::Exec(EXEC))].concat();
        feed_agent(&mut session, &bytes).unwrap();
        assert_eq!(session.phase(), Phase::Starting);
        session
    }

    /// Feeds `bytes` to an agent session; returns the error and what it sends in answer.
    fn agent_refuses(secret: Option<Secret>, bytes: &[u8]) -> (SessionError, Option<ErrorCode>) {
        let mut session = agent_with(AgentConfig::DEFAULT, secret);
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
        let open = opening().client;
        let exec = client_frame(ClientFrame::Exec(EXEC));
        let stdin = |n: usize| client_frame(ClientFrame::Stdin(Bytes(&vec![1u8; n])));
        let kill_all = client_frame(ClientFrame::KillAll);
        let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
            (
                "exec before hello",
                exec.clone(),
                ErrorCode::ProtocolViolation,
            ),
            (
                "kill-all before hello",
                kill_all.clone(),
                ErrorCode::ProtocolViolation,
            ),
            (
                "a hello after the proof",
                [open.clone(), hello()].concat(),
                ErrorCode::ProtocolViolation,
            ),
            (
                "a second opening",
                [open.clone(), open.clone()].concat(),
                ErrorCode::ProtocolViolation,
            ),
            (
                "stdin before exec",
                [open.clone(), stdin(1)].concat(),
                ErrorCode::ProtocolViolation,
            ),
            (
                "garbage",
                vec![2, 0, 0, 0, 0xff, 0xff],
                ErrorCode::Malformed,
            ),
            (
                "garbage after the proof",
                [open.clone(), vec![2, 0, 0, 0, 0xff, 0xff]].concat(),
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
                    open.clone(),
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
                    open.clone(),
                    exec.clone(),
                    client_frame(ClientFrame::StdinEof),
                    stdin(1),
                ]
                .concat(),
                ErrorCode::ProtocolViolation,
            ),
            (
                "a second request",
                [open.clone(), exec.clone(), exec.clone()].concat(),
                ErrorCode::ProtocolViolation,
            ),
            (
                "a kill-all behind an exec",
                [open.clone(), exec.clone(), kill_all.clone()].concat(),
                ErrorCode::ProtocolViolation,
            ),
            (
                "an exec behind a kill-all",
                [open.clone(), kill_all.clone(), exec.clone()].concat(),
                ErrorCode::ProtocolViolation,
            ),
            (
                "an empty argv",
                [
                    open.clone(),
                    client_frame(ClientFrame::Exec(ExecRequest {
                        argv: StrList::new(b""),
                        ..EXEC
                    })),
                ]
                .concat(),
                ErrorCode::InvalidRequest,
            ),
            (
                "an empty user",
                [
                    open.clone(),
                    client_frame(ClientFrame::Exec(ExecRequest {
                        user: Some(Bytes(b"")),
                        pty: None,
                        timeout_ms: 0,
                        kill_grace_ms: None,
                        kill_tree_on_exit: false,
                        max_output: 0,
                        ..EXEC
                    })),
                ]
                .concat(),
                ErrorCode::InvalidRequest,
            ),
            (
                "a user beyond the limit",
                [
                    open.clone(),
                    client_frame(ClientFrame::Exec(ExecRequest {
                        user: Some(Bytes(&[b'u'; crate::limits::MAX_USER + 1])),
                        pty: None,
                        timeout_ms: 0,
                        kill_grace_ms: None,
                        kill_tree_on_exit: false,
                        max_output: 0,
                        ..EXEC
                    })),
                ]
                .concat(),
                ErrorCode::LimitExceeded,
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
            (
                "a protocol 1 client",
                client_frame(ClientFrame::Hello(ClientHello {
                    magic: MAGIC,
                    min_version: 1,
                    max_version: 1,
                })),
                ErrorCode::UnsupportedVersion,
            ),
        ];
        for (name, bytes, code) in cases {
            let (_, sent) = agent_refuses(Some(secret()), &bytes);
            assert_eq!(sent, Some(code), "{name}");
        }
        // An insecure agent takes no proof: one is out of place, not wrong.
        let insecure = opening_with(AgentConfig::DEFAULT, None);
        assert!(insecure.agent_proof.is_empty());
        let proof = client_frame(ClientFrame::Auth(ClientProof {
            nonce: crate::ByteArray(CLIENT_NONCE),
            mac: Bytes(&[0; 32]),
        }));
        let (err, sent) = agent_refuses(None, &[hello(), proof].concat());
        assert_eq!(sent, Some(ErrorCode::ProtocolViolation));
        assert_eq!(
            err,
            SessionError::Unexpected {
                frame: FrameKind::Auth,
                phase: Phase::Idle
            }
        );
        let (_, sent) = agent_refuses(None, &[hello(), hello()].concat());
        assert_eq!(sent, Some(ErrorCode::ProtocolViolation), "two hellos");
        // Exactly the window is fine.
        let mut session = agent();
        let bytes = [open, exec, stdin(MAX_DATA), stdin(STDIN_WINDOW - MAX_DATA)].concat();
        feed_agent(&mut session, &bytes).unwrap();
    }

    #[test]
    fn agent_handshake_and_final_send_deadlines() {
        let auth = AgentAuth {
            nonce: AGENT_NONCE,
            secret: Some(secret()),
        };
        let mut session = AgentSession::new(AgentConfig::DEFAULT, 100, auth);
        let deadline = session.poll_timeout().unwrap();
        assert_eq!(deadline, 100 + AgentConfig::DEFAULT.handshake_timeout);
        assert_eq!(session.handle_timeout(deadline - 1), Ok(()));
        assert_eq!(
            session.handle_timeout(deadline),
            Err(SessionError::TimedOut {
                phase: Phase::Hello
            })
        );
        // The error frame is owed (behind the hello), within the final-send deadline.
        assert!(session.has_queued());
        let final_deadline = session.poll_timeout().unwrap();
        assert_eq!(
            final_deadline,
            deadline + AgentConfig::DEFAULT.final_send_timeout
        );
        assert!(session.handle_timeout(final_deadline).is_err());
        assert!(session.is_closed());

        // The same deadline covers the proof and the request: a client that sent its hello
        // and stops there is cut off too.
        for (bytes, phase) in [(hello(), Phase::Hello), (opening().client, Phase::Idle)] {
            let mut session = agent();
            feed_agent(&mut session, &bytes).unwrap();
            let deadline = session.poll_timeout().unwrap();
            assert_eq!(deadline, AgentConfig::DEFAULT.handshake_timeout);
            assert_eq!(
                session.handle_timeout(deadline),
                Err(SessionError::TimedOut { phase })
            );
            assert!(session.is_closing());
        }
    }

    /// A driver that polls with the grace deadline must not spin once it has passed.
    #[test]
    fn agent_grace_deadline_is_reported_until_handled() {
        let mut session = agent_given_exec();
        session.started(5, 0).unwrap();
        session.poll_transmit(&mut vec![0u8; MAX_FRAME]).unwrap();
        let keepalive = u64::from(crate::limits::KEEPALIVE_MS) * 1000;
        assert_eq!(
            session.poll_timeout(),
            Some(keepalive),
            "a running command's only deadline is the next keepalive"
        );
        session.child_exited(ExitStatus::Code(0), 1_000).unwrap();
        let grace_end = 1_000 + AgentConfig::DEFAULT.drain_grace;
        assert_eq!(session.poll_timeout(), Some(grace_end));
        session.handle_timeout(grace_end - 1).unwrap();
        assert_eq!(session.poll_timeout(), Some(grace_end));
        session.handle_timeout(grace_end).unwrap();
        assert_eq!(session.poll_timeout(), Some(keepalive));
        assert_eq!(session.output_phase(grace_end), OutputPhase::Drain);
        assert!(!session.has_queued());
        // The keepalive is queued once when due, and the next one is an interval later.
        session.handle_timeout(keepalive).unwrap();
        assert!(session.has_queued());
        assert_eq!(session.poll_timeout(), Some(2 * keepalive));
        let mut out = vec![0u8; MAX_FRAME];
        let n = session.poll_transmit(&mut out).unwrap();
        assert_eq!(&out[..n], &agent_frame(AgentFrame::Keepalive)[..]);
        assert!(!session.has_queued());
        // None once the record is queued.
        session.finish(keepalive + 1).unwrap();
        assert_ne!(session.poll_timeout(), Some(2 * keepalive));
    }

    #[test]
    fn agent_hello_only_is_a_health_check_and_an_end_of_stream_mid_command_is_a_half_close() {
        // A hello alone, a hello and its proof: both end cleanly.
        for bytes in [hello(), opening().client] {
            let mut session = agent();
            feed_agent(&mut session, &bytes).unwrap();
            assert_eq!(session.handle_eof(), Ok(()));
        }
        // Mid-command, an end of stream is a half-close: no more input, the command runs on.
        let mut session = agent_given_exec();
        session.started(5, 0).unwrap();
        assert_eq!(session.handle_eof(), Ok(()));
        assert!(session.input_closed() && !session.is_closing());
        // A kill-all in progress is owed its report.
        let mut session = agent();
        let bytes = [opening().client, client_frame(ClientFrame::KillAll)].concat();
        feed_agent(&mut session, &bytes).unwrap();
        assert_eq!(session.handle_eof(), Ok(()));
        assert!(session.input_closed() && !session.is_closing());
    }

    #[test]
    fn agent_final_frame_comes_last_and_only_once() {
        let mut session = agent_given_exec();
        let mut buf = vec![0u8; MAX_FRAME];
        assert_eq!(
            session.frame_output(&mut buf, crate::DataKind::Stdout, 1, 0),
            Err(SessionError::InvalidState),
            "output before started"
        );
        assert_eq!(
            session.finish(0),
            Err(SessionError::InvalidState),
            "finish before exit"
        );
        assert_eq!(
            session.done(0, 0),
            Err(SessionError::InvalidState),
            "done for an exec"
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
            session.frame_output(&mut buf, crate::DataKind::Stdout, 1, 0),
            Err(SessionError::InvalidState),
            "output after the termination record"
        );
        assert_eq!(
            session.refuse(Refusal::new(ErrorCode::Internal, "x"), 0),
            Err(SessionError::InvalidState)
        );
        assert_eq!(session.done(0, 0), Err(SessionError::InvalidState));
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

    /// Feeds agent frames to a secure client session that starts an exec as soon as the
    /// agent's hello is in; returns the first error.
    fn client_rejects(frames: &[Vec<u8>]) -> SessionError {
        let mut session = client_with(Some(secret()));
        let mut out = vec![0u8; MAX_FRAME];
        let bytes = frames.concat();
        let mut rest = &bytes[..];
        loop {
            match session.handle_input(rest) {
                Ok(input) if input.consumed == 0 => panic!("accepted everything"),
                Ok(input) => {
                    match input.event {
                        Some(ClientEvent::HelloAccepted(_)) => {
                            session.start_exec(&EXEC, &mut out).unwrap();
                        }
                        // Spend credit as a client would, so grants have something to cover.
                        Some(ClientEvent::Started { .. }) => {
                            session.send_stdin(b"xy", &mut out).unwrap();
                        }
                        _ => {}
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
        let Opening {
            agent_hello,
            agent_proof,
            ..
        } = opening();
        let started = agent_frame(AgentFrame::Started(Started { pid: 1 }));
        let out = agent_frame(AgentFrame::Stdout(crate::Output {
            at_us: 0,
            data: Bytes(b"x"),
        }));
        let exited = agent_frame(AgentFrame::Exited(Termination {
            status: ExitStatus::Code(0),
            duration_us: 1,
            output_dropped: false,
            ending: Ending::Exited,
            tree_kill: TreeKill::None,
            stdout: StreamRecord::default(),
            stderr: StreamRecord::default(),
            pipes_held: false,
            oom_killed: false,
            peak_memory: 0,
        }));
        let hello_with = |magic, min_version, version| {
            agent_frame(AgentFrame::Hello(AgentHello {
                magic,
                min_version,
                version,
                agent_version: "",
                limits: Limits::CURRENT,
                nonce: crate::ByteArray(AGENT_NONCE),
                security: Security::Authenticated,
                bounds: Bounds::default(),
            }))
        };
        let unexpected = |frame, phase| SessionError::Unexpected { frame, phase };
        let cases = [
            (
                "started before hello",
                vec![started.clone()],
                unexpected(FrameKind::Started, Phase::Hello),
            ),
            (
                "the agent's proof before its hello",
                vec![agent_proof.clone()],
                unexpected(FrameKind::Authenticated, Phase::Hello),
            ),
            (
                "started before the agent's proof",
                vec![agent_hello.clone(), started.clone()],
                unexpected(FrameKind::Started, Phase::Starting),
            ),
            (
                "output before started",
                vec![agent_hello.clone(), agent_proof.clone(), out.clone()],
                unexpected(FrameKind::Stdout, Phase::Starting),
            ),
            (
                "a second hello",
                vec![agent_hello.clone(), agent_hello.clone()],
                unexpected(FrameKind::Hello, Phase::Starting),
            ),
            (
                "a second proof",
                vec![
                    agent_hello.clone(),
                    agent_proof.clone(),
                    agent_proof.clone(),
                ],
                unexpected(FrameKind::Authenticated, Phase::Starting),
            ),
            (
                "done for an exec",
                vec![
                    agent_hello.clone(),
                    agent_proof.clone(),
                    agent_frame(AgentFrame::Done(DoneReport { count: 1 })),
                ],
                unexpected(FrameKind::Done, Phase::Starting),
            ),
            (
                "output after exit",
                vec![
                    agent_hello.clone(),
                    agent_proof.clone(),
                    started.clone(),
                    exited.clone(),
                    out.clone(),
                ],
                unexpected(FrameKind::Stdout, Phase::Done),
            ),
            (
                "credit beyond what was sent",
                vec![
                    agent_hello.clone(),
                    agent_proof.clone(),
                    started.clone(),
                    agent_frame(AgentFrame::StdinCredit(3)),
                ],
                SessionError::CreditExceeded,
            ),
            (
                "a ready report on an exec connection",
                vec![
                    agent_hello.clone(),
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
                vec![hello_with(*b"QEMU", 2, 2)],
                SessionError::NotFerry,
            ),
            (
                "a version we do not speak",
                vec![hello_with(MAGIC, 7, 7)],
                SessionError::UnsupportedVersion { chosen: 7 },
            ),
            (
                "a protocol 1 agent",
                vec![hello_with(MAGIC, 1, 1)],
                SessionError::UnsupportedVersion { chosen: 1 },
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
        let Opening {
            agent_hello,
            agent_proof,
            ..
        } = opening();
        let mut session = client_with(Some(secret()));
        let mut out = vec![0u8; MAX_FRAME];
        // Nothing starts before the agent's hello, so no stdin either.
        assert_eq!(
            session.start_exec(&EXEC, &mut out),
            Err(SessionError::InvalidState)
        );
        assert_eq!(
            session.send_stdin(b"abc", &mut out),
            Err(SessionError::InvalidState)
        );
        session.handle_input(&agent_hello).unwrap();
        session.start_exec(&EXEC, &mut out).unwrap();
        session.handle_input(&agent_proof).unwrap();
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
        let open = opening();
        let mut session = client_with(Some(secret()));
        let mut out = vec![0u8; MAX_FRAME];
        session.handle_input(&open.agent_hello).unwrap();
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
        // Room for the hello and the proof but not the request: still nothing sent.
        assert_eq!(
            session.start_exec(&EXEC, &mut vec![0u8; open.client.len() + 3]),
            Err(SessionError::BufferTooSmall)
        );
        // None of the attempts changed anything: the real one still sends hello and proof
        // first, exactly the opening.
        let n = session.start_exec(&EXEC, &mut out).unwrap();
        assert!(out[..n].starts_with(&open.client));
        assert_eq!(
            &out[open.client.len()..n],
            &client_frame(ClientFrame::Exec(EXEC))[..]
        );
        assert_eq!(
            session.start_exec(&EXEC, &mut out),
            Err(SessionError::InvalidState)
        );
        assert_eq!(
            session.start_kill_all(&mut out),
            Err(SessionError::InvalidState)
        );
        // Our hello went out with the request: nothing more to transmit.
        assert_eq!(session.poll_transmit(&mut out), Ok(0));
    }

    #[test]
    fn client_hello_deadline_and_disconnects() {
        let Opening {
            agent_hello,
            agent_proof,
            ..
        } = opening();
        let mut session = ClientSession::new(
            1_000,
            Some(500),
            ClientAuth {
                nonce: CLIENT_NONCE,
                secret: Some(secret()),
            },
        );
        assert_eq!(session.poll_timeout(), Some(1_500));
        assert_eq!(session.handle_timeout(1_499), Ok(()));
        assert_eq!(
            session.handle_timeout(1_500),
            Err(SessionError::TimedOut {
                phase: Phase::Hello
            })
        );
        session.handle_input(&agent_hello).unwrap_err();
        let auth = || ClientAuth {
            nonce: CLIENT_NONCE,
            secret: Some(secret()),
        };
        // The deadline covers the agent's proof too, not only its hello.
        let mut session = ClientSession::new(0, Some(500), auth());
        let mut out = vec![0u8; 256];
        assert_eq!(
            session.poll_transmit(&mut out),
            Ok(0),
            "the agent speaks first"
        );
        session.handle_input(&agent_hello).unwrap();
        assert_eq!(session.poll_timeout(), Some(500), "the proof is still owed");
        assert!(session.poll_transmit(&mut out).unwrap() > 0);
        session.handle_input(&agent_proof).unwrap();
        assert!(session.is_authenticated());
        assert_eq!(session.poll_timeout(), None, "the handshake is done");
        assert_eq!(session.handle_eof(0), Ok(()), "a health check ends cleanly");
        // Without the agent's proof, an end of stream is a disconnect.
        let mut session = ClientSession::new(0, Some(500), auth());
        session.handle_input(&agent_hello).unwrap();
        session.poll_transmit(&mut out).unwrap();
        assert_eq!(
            session.handle_eof(0),
            Err(SessionError::Disconnected {
                phase: Phase::Hello,
                mid_frame: false
            })
        );
        // An insecure agent's hello completes the handshake by itself.
        let insecure = opening_with(AgentConfig::DEFAULT, None);
        let mut session = ClientSession::new(
            0,
            Some(500),
            ClientAuth {
                nonce: CLIENT_NONCE,
                secret: None,
            },
        );
        session.handle_input(&insecure.agent_hello).unwrap();
        assert!(session.is_authenticated());
        assert_eq!(session.poll_timeout(), None);
        assert_eq!(session.handle_eof(0), Ok(()));
        let mut session = client_with(Some(secret()));
        session.handle_input(&agent_hello).unwrap();
        session.start_exec(&EXEC, &mut vec![0u8; 256]).unwrap();
        assert_eq!(
            session.handle_eof(3),
            Err(SessionError::Disconnected {
                phase: Phase::Starting,
                mid_frame: true
            })
        );
    }

    #[test]
    fn agent_half_close_after_stdin_eof_still_gets_the_record() {
        // `nc -N`: stdin's end, then a half-close. The command runs to its end and the record
        // is still sent (a client that is really gone shows when a send fails).
        let mut session = agent();
        let bytes = [
            opening().client,
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
        assert_eq!(session.handle_eof(), Ok(()));
        session.finish(20).unwrap();
        let mut out = vec![0u8; MAX_FRAME];
        let n = session.poll_transmit(&mut out).unwrap();
        let (body, _) = crate::split_frame(&out[..n], MAX_FRAME).unwrap().unwrap();
        assert!(matches!(
            crate::decode_agent_frame(body),
            Ok(AgentFrame::Exited(_))
        ));
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
                max_user: 4,
                ..Limits::CURRENT
            },
            ..AgentConfig::DEFAULT
        };
        let open = opening_with(tight, Some(secret())).client;
        let request = |exec: ExecRequest<'_>| {
            let mut session = agent_with(tight, Some(secret()));
            feed_agent(&mut session, &open).unwrap();
            let bytes = client_frame(ClientFrame::Exec(exec));
            session
                .handle_input(&bytes, 0)
                .map(|input| input.event.is_some())
        };
        let argv = |argv: &'static [u8]| ExecRequest {
            argv: StrList::new(argv),
            ..EXEC
        };
        assert_eq!(request(argv(b"a\0b\0")), Ok(true));
        assert!(matches!(
            request(argv(b"a\0b\0c\0")),
            Err(SessionError::InvalidRequest { .. })
        ));
        let user = |user: &'static [u8]| ExecRequest {
            user: Some(Bytes(user)),
            pty: None,
            timeout_ms: 0,
            kill_grace_ms: None,
            kill_tree_on_exit: false,
            max_output: 0,
            ..EXEC
        };
        assert_eq!(request(user(b"root")), Ok(true));
        assert!(matches!(
            request(user(b"users")),
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
        let tight = AgentConfig {
            limits: Limits {
                max_args: 1,
                max_user: 4,
                ..Limits::CURRENT
            },
            ..AgentConfig::DEFAULT
        };
        let open = opening_with(tight, Some(secret()));
        let mut session = client_with(Some(secret()));
        let mut out = vec![0u8; 256];
        let hello = session.handle_input(&open.agent_hello).unwrap();
        match hello.event {
            Some(ClientEvent::HelloAccepted(info)) => {
                assert_eq!(info.limits, tight.limits);
                assert_eq!(info.bounds, tight.bounds);
                assert_eq!(info.security, Security::Authenticated);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(session.agent_limits(), Some(tight.limits));
        let two = ExecRequest {
            argv: StrList::new(b"a\0b\0"),
            ..EXEC
        };
        assert!(matches!(
            session.start_exec(&two, &mut out),
            Err(SessionError::InvalidRequest { .. })
        ));
        let long_user = ExecRequest {
            user: Some(Bytes(b"users")),
            pty: None,
            timeout_ms: 0,
            kill_grace_ms: None,
            kill_tree_on_exit: false,
            max_output: 0,
            ..EXEC
        };
        assert!(matches!(
            session.start_exec(&long_user, &mut out),
            Err(SessionError::InvalidRequest { .. })
        ));
        assert!(session.start_exec(&EXEC, &mut out).is_ok());
    }
}
