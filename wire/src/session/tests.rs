//! The sessions against each other: the simulated pair over thousands of random schedules, and
//! the edges one at a time.

use super::sim::{self, End, Mode, Program, Record, Rng, Scenario, SIM_DRAIN_LIMIT};
use crate::msg::StreamRecord;

/// How many randomized conversations one test run drives (`FERRY_SIM_RUNS` overrides).
fn runs() -> u64 {
    std::env::var("FERRY_SIM_RUNS")
        .ok()
        .and_then(|runs| runs.parse().ok())
        .unwrap_or(10_000)
}

/// Checks one conversation's outcome against the model; `Err` names the difference. Returns the
/// scheduler's steps and the keepalives the client heard.
fn check(scenario: &Scenario, seed: u64) -> Result<(usize, usize), String> {
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
        // Where the cut falls depends on the schedule; that it falls, and how, does not; the
        // record counts what was read.
        let got = outcome.stdout.len();
        let counted = match (&outcome.end, &expected.end) {
            (End::Exited(record), End::Exited(model)) => {
                let stdout = StreamRecord {
                    bytes: got as u64,
                    dropped: 0,
                };
                Record { stdout, ..*model } == *record
            }
            _ => false,
        };
        if !counted
            || !outcome.stdout.iter().all(|b| *b == b'f')
            || got <= SIM_DRAIN_LIMIT
            || got > SIM_DRAIN_LIMIT + ferry_max_data()
            || got > flood
        {
            return Err(format!("flood: {got} bytes, end {:?}", outcome.end));
        }
        return Ok((run.steps, run.keepalives));
    }
    if outcome != &expected {
        return Err(format!(
            "outcome differs: started {} / {}, stdout {} / {} bytes (equal: {}), stderr {} / {} bytes (equal: {}), drops {:?} / {:?}, end {:?} / {:?}",
            outcome.started,
            expected.started,
            outcome.stdout.len(),
            expected.stdout.len(),
            outcome.stdout == expected.stdout,
            outcome.stderr.len(),
            expected.stderr.len(),
            outcome.stderr == expected.stderr,
            outcome.drops,
            expected.drops,
            outcome.end,
            expected.end
        ));
    }
    Ok((run.steps, run.keepalives))
}

fn ferry_max_data() -> usize {
    crate::limits::MAX_DATA
}

/// What the simulation covered, to show it covers what it says.
#[derive(Debug, Default)]
struct Seen {
    programs: [usize; 15],
    /// Requests in pieces; at the limits.
    pieces: usize,
    largest: usize,
    capped: usize,
    half_closed: usize,
    cancelled: usize,
    timed_out: usize,
    resized: usize,
    keepalives: usize,
}

/// Drives `runs()` random conversations in `mode`.
fn simulate(mode: Mode, salt: u64) {
    let runs = runs();
    let mut steps = 0;
    let mut seen = Seen::default();
    for seed in 0..runs {
        let scenario = Scenario::random(&mut Rng::new(seed ^ salt), mode);
        seen.programs[match scenario.program {
            Program::Print { .. } => 0,
            Program::Cat => 1,
            Program::Head { .. } => 2,
            Program::Killed { .. } => 3,
            Program::Missing => 4,
            Program::Flood { .. } => 5,
            Program::KillAll { .. } => 6,
            Program::Wait { .. } => 7,
            Program::Put(_) => 8,
            Program::Get(_) => 9,
            Program::Info { .. } => 10,
            Program::TimeSync { .. } => 11,
            Program::Reseed { .. } => 12,
            Program::Shutdown(_) => 13,
            Program::Job(_) => 14,
        }] += 1;
        let limits = crate::limits::MAX_INLINE_LIST;
        seen.pieces += usize::from(scenario.argv.len() > limits || scenario.env.len() > limits);
        seen.largest += usize::from(scenario.argv.len() == crate::limits::MAX_ARGV_BYTES);
        seen.capped += usize::from(scenario.max_output > 0);
        seen.half_closed += usize::from(scenario.half_close);
        if let Program::Wait { end, resizes, .. } = &scenario.program {
            seen.cancelled += usize::from(matches!(end, sim::WaitEnd::Cancel(_)));
            seen.timed_out += usize::from(matches!(end, sim::WaitEnd::Timeout(_)));
            seen.resized += usize::from(!resizes.is_empty());
        }
        match check(&scenario, seed) {
            Ok((n, keepalives)) => {
                steps += n;
                seen.keepalives += keepalives;
            }
            Err(err) => panic!(
                "{mode:?} seed {seed}: {err}\nscenario: {:?} with {} stdin bytes, argv {} env {} \
                 bytes, cap {}, half-close {} (no EOF {})",
                match &scenario.program {
                    Program::Print {
                        stdout,
                        stderr,
                        code,
                    } => format!("print {}+{} bytes, exit {code}", stdout.len(), stderr.len()),
                    Program::Wait {
                        greeting,
                        resizes,
                        ignored,
                        end,
                        ignores_term,
                    } => format!(
                        "wait ({} bytes of greeting, sizes {resizes:?}, ignored {ignored:?}, \
                         end {end:?}, ignores SIGTERM {ignores_term})",
                        greeting.len()
                    ),
                    other => format!("{other:?}"),
                },
                scenario.stdin.as_ref().map_or(0, Vec::len),
                scenario.argv.len(),
                scenario.env.len(),
                scenario.max_output,
                scenario.half_close,
                scenario.no_eof,
            ),
        }
    }
    assert!(
        seen.programs.iter().all(|n| *n > 0),
        "every program ran: {seen:?}"
    );
    if runs >= 1_000 {
        for (what, n) in [
            ("requests in pieces", seen.pieces),
            ("requests at the limits", seen.largest),
            ("output caps", seen.capped),
            ("half-closes", seen.half_closed),
            ("cancels", seen.cancelled),
            ("timeouts", seen.timed_out),
            ("resizes", seen.resized),
            ("keepalives", seen.keepalives),
        ] {
            assert!(n > 0, "no {what} in {runs} runs: {seen:?}");
        }
    }
    eprintln!("{mode:?}: {runs} conversations, {steps} scheduler steps, {seen:?}");
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
        let scenario = Scenario::plain(Program::Cat, Some(Rng::new(7).bytes(300_000)), mode);
        for seed in 0..200 {
            check(&scenario, seed).unwrap_or_else(|err| panic!("{mode:?} seed {seed}: {err}"));
        }
        let refused = Scenario::plain(Program::Missing, None, mode);
        assert_eq!(
            refused.expected().end,
            End::Refused(crate::ErrorCode::NotFound)
        );
        for seed in 0..200 {
            check(&refused, seed).unwrap_or_else(|err| panic!("{mode:?} seed {seed}: {err}"));
        }
        let kill_all = Scenario::plain(Program::KillAll { count: 5 }, None, mode);
        assert_eq!(kill_all.expected().end, End::Done(5));
        for seed in 0..200 {
            check(&kill_all, seed).unwrap_or_else(|err| panic!("{mode:?} seed {seed}: {err}"));
        }
        // Protocol 3: the largest request, in pieces; a capped output; a cancelled command
        // that ignores SIGTERM; a half-close without stdin's EOF.
        let mut rng = Rng::new(11);
        let largest = Scenario {
            argv: [
                b"print\0".as_slice(),
                &vec![b'a'; crate::limits::MAX_ARG_LEN - 1],
                b"\0",
            ]
            .concat()
            .repeat(15),
            ..Scenario::plain(
                Program::Print {
                    stdout: rng.bytes(5_000),
                    stderr: Vec::new(),
                    code: 0,
                },
                None,
                mode,
            )
        };
        let capped = Scenario {
            max_output: 1_001,
            ..Scenario::plain(
                Program::Print {
                    stdout: rng.bytes(50_000),
                    stderr: rng.bytes(700),
                    code: 1,
                },
                None,
                mode,
            )
        };
        let cancelled = Scenario::plain(
            Program::Wait {
                greeting: b"hello".to_vec(),
                resizes: vec![crate::WindowSize { rows: 1, cols: 2 }],
                ignored: vec![28],
                end: sim::WaitEnd::Cancel(vec![Some(9), Some(1)]),
                ignores_term: true,
            },
            None,
            mode,
        );
        let half_closed = Scenario {
            half_close: true,
            no_eof: true,
            ..Scenario::plain(Program::Cat, Some(rng.bytes(100_000)), mode)
        };
        for scenario in [largest, capped, cancelled, half_closed] {
            for seed in 0..50 {
                check(&scenario, seed).unwrap_or_else(|err| {
                    panic!("{mode:?} seed {seed}: {err} ({:?})", scenario.program)
                });
            }
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
    pub(in crate::session) fn agent_given_exec_pub() -> AgentSession {
        agent_given_exec()
    }

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
                        module_times: StrList::new(b""),
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

mod v3 {
    //! Protocol 3's rules, each broken once on purpose, and their edges: controls (signal,
    //! resize, cancel), requests in pieces, keepalives and the client's liveness check, output
    //! timestamps and caps, the full termination record, the half-close.

    use proptest::prelude::*;

    use super::super::*;
    use super::edges::{agent, agent_with, client_frame, client_with, opening, secret, EXEC};
    use crate::limits::*;
    use crate::msg::*;
    use crate::{decode_agent_frame, decode_client_frame, split_frame, Bytes, DataKind};
    use crate::{DATA_HEADROOM, DEFAULT_KILL_GRACE_MS};

    /// An agent session's event, owned.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Got {
        Hello,
        Authenticated,
        KillAll,
        Exec {
            argv: Vec<u8>,
            env: Vec<u8>,
            parts: bool,
        },
        Stdin(Vec<u8>),
        StdinEof,
        Part(ListKind, Vec<u8>),
        Signal(u8),
        Resize(WindowSize),
        Cancel(Option<u32>),
        /// An event of the operations beyond exec (`ops_tests` checks them).
        Other(String),
    }

    fn got(event: AgentEvent<'_>) -> Got {
        match event {
            AgentEvent::Hello => Got::Hello,
            AgentEvent::Authenticated => Got::Authenticated,
            AgentEvent::KillAll => Got::KillAll,
            AgentEvent::Exec(valid) => Got::Exec {
                argv: valid.request().argv.as_bytes().to_vec(),
                env: valid.request().env.as_bytes().to_vec(),
                parts: valid.has_parts(),
            },
            AgentEvent::Stdin(data) => Got::Stdin(data.to_vec()),
            AgentEvent::StdinEof => Got::StdinEof,
            AgentEvent::ExecPart { list, data } => Got::Part(list, data.to_vec()),
            AgentEvent::Signal(number) => Got::Signal(number),
            AgentEvent::Resize(size) => Got::Resize(size),
            AgentEvent::Cancel { grace_ms } => Got::Cancel(grace_ms),
            other => Got::Other(format!("{other:?}")),
        }
    }

    /// A client session's event, owned; a keepalive (taken without an event) is `Keepalive`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Heard {
        Hello,
        Authenticated,
        Started(u32),
        /// The data and `last_output_at` after it.
        Stdout(Vec<u8>, u64),
        Stderr(Vec<u8>, u64),
        Dropped(Dropped),
        Credit(usize),
        Exited(Termination),
        Refused(ErrorCode),
        Done(u32),
        Keepalive,
        /// An event of the operations beyond exec.
        Other(String),
    }

    /// An error and the code of the error frame the agent queued for it.
    type Refused = (SessionError, Option<ErrorCode>);

    /// Feeds `bytes` (whole frames) to `agent`; its events, or its first error and the code of
    /// the error frame it queued.
    fn agent_takes(agent: &mut AgentSession, bytes: &[u8]) -> Result<Vec<Got>, Refused> {
        let mut events = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            match agent.handle_input(rest, 0) {
                Ok(input) => {
                    assert!(input.consumed > 0, "bytes end mid-frame");
                    events.extend(input.event.map(got));
                    rest = &rest[input.consumed..];
                }
                Err(err) => {
                    assert!(agent.is_closing());
                    let mut out = vec![0u8; MAX_FRAME];
                    let n = agent.poll_transmit(&mut out).unwrap();
                    let code = agent_frames(&out[..n]).into_iter().find_map(|f| match f {
                        Sent::Error(code) => Some(code),
                        _ => None,
                    });
                    return Err((err, code));
                }
            }
        }
        Ok(events)
    }

    /// An agent frame, owned.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Sent {
        Started,
        Keepalive,
        Credit(u32),
        Error(ErrorCode),
        Exited(Termination),
        Other(FrameKind),
    }

    fn agent_frames(mut bytes: &[u8]) -> Vec<Sent> {
        let mut frames = Vec::new();
        while let Some((body, used)) = split_frame(bytes, MAX_FRAME_BODY).unwrap() {
            let frame = decode_agent_frame(body).unwrap();
            frames.push(match frame {
                AgentFrame::Started(_) => Sent::Started,
                AgentFrame::Keepalive => Sent::Keepalive,
                AgentFrame::StdinCredit(n) => Sent::Credit(n),
                AgentFrame::Error(err) => Sent::Error(err.code),
                AgentFrame::Exited(end) => Sent::Exited(end),
                other => Sent::Other(FrameKind::of_agent(&other)),
            });
            bytes = &bytes[used..];
        }
        assert!(bytes.is_empty(), "part of a frame");
        frames
    }

    /// Feeds `bytes` (whole frames) to `client`, heard at `now`; its events.
    fn client_takes(
        client: &mut ClientSession,
        bytes: &[u8],
        now: Micros,
    ) -> Result<Vec<Heard>, SessionError> {
        let mut events = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let input = client.handle_input_at(rest, now)?;
            assert!(input.consumed > 0, "bytes end mid-frame");
            let at = client.last_output_at();
            events.push(match input.event {
                None => Heard::Keepalive,
                Some(ClientEvent::HelloAccepted(_)) => Heard::Hello,
                Some(ClientEvent::Authenticated) => Heard::Authenticated,
                Some(ClientEvent::Started { pid }) => Heard::Started(pid),
                Some(ClientEvent::Stdout(data)) => Heard::Stdout(data.to_vec(), at),
                Some(ClientEvent::Stderr(data)) => Heard::Stderr(data.to_vec(), at),
                Some(ClientEvent::OutputDropped(dropped)) => Heard::Dropped(dropped),
                Some(ClientEvent::StdinCredit { available }) => Heard::Credit(available),
                Some(ClientEvent::Exited(end)) => Heard::Exited(end),
                Some(ClientEvent::Refused(err)) => Heard::Refused(err.code),
                Some(ClientEvent::Done(report)) => Heard::Done(report.count),
                Some(other) => Heard::Other(format!("{other:?}")),
            });
            rest = &rest[input.consumed..];
        }
        Ok(events)
    }

    /// A secure client and agent joined by hand.
    struct Pair {
        client: ClientSession,
        agent: AgentSession,
        out: Vec<u8>,
    }

    impl Pair {
        /// After the opening (the client heard the agent at 0), with `request` sent and taken;
        /// returns the agent's events for the request.
        fn new(config: AgentConfig, request: &ExecRequest<'_>) -> (Pair, Vec<Got>) {
            let mut pair = Pair {
                client: client_with(Some(secret())),
                agent: agent_with(config, Some(secret())),
                out: vec![0u8; MAX_FRAME],
            };
            assert_eq!(pair.deliver(0), [Heard::Hello]);
            let mut buf = vec![0u8; ClientSession::exec_buffer_len(request)];
            let n = pair.client.start_exec(request, &mut buf).unwrap();
            let events = agent_takes(&mut pair.agent, &buf[..n]).unwrap();
            assert_eq!(events[..2], [Got::Hello, Got::Authenticated]);
            assert_eq!(pair.deliver(0), [Heard::Authenticated]);
            (pair, events[2..].to_vec())
        }

        /// [`EXEC`] running as pid 5 since `started_at`, `Started` delivered.
        fn running(config: AgentConfig, request: &ExecRequest<'_>, started_at: Micros) -> Pair {
            let (mut pair, _) = Pair::new(config, request);
            pair.agent.started(5, started_at).unwrap();
            assert_eq!(pair.deliver(started_at), [Heard::Started(5)]);
            pair
        }

        /// What the agent has queued, to the client, heard at `now`.
        fn deliver(&mut self, now: Micros) -> Vec<Heard> {
            let n = self.agent.poll_transmit(&mut self.out).unwrap();
            let bytes = self.out[..n].to_vec();
            client_takes(&mut self.client, &bytes, now).unwrap()
        }

        /// Output the driver read at `now`, framed in place (control frames go first, as the
        /// pump sends them) and delivered.
        fn output(&mut self, kind: DataKind, data: &[u8], now: Micros) -> Vec<Heard> {
            let mut heard = self.deliver(now);
            let mut buf = vec![0u8; DATA_HEADROOM + data.len()];
            buf[DATA_HEADROOM..].copy_from_slice(data);
            let start = self
                .agent
                .frame_output(&mut buf, kind, data.len(), now)
                .unwrap();
            heard.extend(client_takes(&mut self.client, &buf[start..], now).unwrap());
            heard
        }

        /// The output cap dropped `bytes` of `stream`: the notice, delivered.
        fn dropped(&mut self, stream: Stream, bytes: u64, now: Micros) -> Vec<Heard> {
            let mut heard = self.deliver(now);
            let mut buf = [0u8; 32];
            let n = self
                .agent
                .encode_output_dropped(stream, bytes, &mut buf)
                .unwrap();
            heard.extend(client_takes(&mut self.client, &buf[..n], now).unwrap());
            heard
        }

        /// A control the client encoded, to the agent.
        fn control(
            &mut self,
            send: impl FnOnce(&mut ClientSession, &mut [u8]) -> Result<usize, SessionError>,
        ) -> Result<Vec<Got>, Refused> {
            let mut buf = [0u8; 64];
            let n = send(&mut self.client, &mut buf).expect("the client sends it");
            agent_takes(&mut self.agent, &buf[..n])
        }
    }

    fn terminal_exec() -> ExecRequest<'static> {
        ExecRequest {
            pty: Some(WindowSize { rows: 24, cols: 80 }),
            ..EXEC
        }
    }

    const NO_SIGNAL: SessionError = SessionError::InvalidRequest {
        message: "no such signal",
    };
    const NO_TERMINAL: SessionError = SessionError::InvalidRequest {
        message: "the command has no terminal",
    };
    const LIMIT: SessionError = SessionError::InvalidRequest {
        message: "request exceeds the agent's limits",
    };

    #[test]
    fn signals_outside_1_to_64_are_refused_by_both_sides() {
        let mut pair = Pair::running(AgentConfig::DEFAULT, &EXEC, 0);
        let mut buf = [0u8; 16];
        for bad in [0u8, 65, 255] {
            assert_eq!(pair.client.send_signal(bad, &mut buf), Err(NO_SIGNAL));
        }
        for good in [1u8, 2, 9, 15, 64] {
            let events = pair.control(|c, out| c.send_signal(good, out));
            assert_eq!(events, Ok(vec![Got::Signal(good)]));
        }
        // What a client session never sends, the agent refuses, before the command started
        // and while it runs.
        for bad in [0u8, 65, 255] {
            for started in [false, true] {
                let (mut pair, _) = Pair::new(AgentConfig::DEFAULT, &EXEC);
                if started {
                    pair.agent.started(5, 0).unwrap();
                }
                let frame = client_frame(ClientFrame::Signal(bad));
                assert_eq!(
                    agent_takes(&mut pair.agent, &frame),
                    Err((NO_SIGNAL, Some(ErrorCode::InvalidRequest))),
                    "signal {bad}, started {started}"
                );
                // The refusal is the last frame: no `Started`, no record.
                assert!(pair.agent.is_closed());
            }
        }
    }

    #[test]
    fn controls_only_while_an_exec_runs_on_the_clients_side() {
        let mut buf = [0u8; 64];
        let size = WindowSize { rows: 1, cols: 2 };
        let check = |client: &mut ClientSession, when: &str, allowed: bool| {
            let mut buf = [0u8; 64];
            let signal = client.send_signal(15, &mut buf).map(|_| ());
            let cancel = client.send_cancel(None, &mut buf).map(|_| ());
            let expected = if allowed {
                Ok(())
            } else {
                Err(SessionError::InvalidState)
            };
            assert_eq!((signal, cancel), (expected, expected), "{when}");
        };
        let open = opening();
        let mut client = client_with(Some(secret()));
        check(&mut client, "before the agent's hello", false);
        // Before an exec there is no terminal to resize either.
        assert_eq!(client.send_resize(size, &mut buf), Err(NO_TERMINAL));
        client.handle_input(&open.agent_hello).unwrap();
        check(&mut client, "before the exec", false);
        assert_eq!(client.send_resize(size, &mut buf), Err(NO_TERMINAL));
        let mut out = vec![0u8; MAX_FRAME];
        client.start_exec(&terminal_exec(), &mut out).unwrap();
        // Sent before `Started` they reach an agent that has the request: allowed.
        check(&mut client, "before Started", true);
        assert!(client.send_resize(size, &mut buf).is_ok());
        // A kill-all has no command to signal.
        let mut kill_all = client_with(Some(secret()));
        kill_all.handle_input(&open.agent_hello).unwrap();
        kill_all.start_kill_all(&mut out).unwrap();
        check(&mut kill_all, "during a kill-all", false);
        // After the record, and after a refusal, nothing more is sent.
        let mut pair = Pair::running(AgentConfig::DEFAULT, &terminal_exec(), 0);
        check(&mut pair.client, "while running", true);
        pair.agent.child_exited(ExitStatus::Code(0), 1).unwrap();
        check(&mut pair.client, "after the exit, before the record", true);
        pair.agent.finish(2).unwrap();
        assert!(matches!(pair.deliver(2)[..], [Heard::Exited(_)]));
        check(&mut pair.client, "after the record", false);
        assert_eq!(
            pair.client.send_resize(size, &mut buf),
            Err(SessionError::InvalidState)
        );
        let (mut pair, _) = Pair::new(AgentConfig::DEFAULT, &terminal_exec());
        let refusal = Refusal::os(ErrorCode::NotFound, 2, "no such program");
        pair.agent.refuse(refusal, 0).unwrap();
        assert_eq!(pair.deliver(0), [Heard::Refused(ErrorCode::NotFound)]);
        check(&mut pair.client, "after a refusal", false);
        assert_eq!(
            pair.client.send_resize(size, &mut buf),
            Err(SessionError::InvalidState)
        );
        // A buffer too small: a typed error, nothing changes.
        let mut pair = Pair::running(AgentConfig::DEFAULT, &EXEC, 0);
        assert_eq!(
            pair.client.send_signal(9, &mut buf[..3]),
            Err(SessionError::BufferTooSmall)
        );
        assert_eq!(
            pair.control(|c, out| c.send_signal(9, out)),
            Ok(vec![Got::Signal(9)])
        );
    }

    #[test]
    fn controls_only_while_an_exec_runs_on_the_agents_side() {
        let controls = [
            (
                client_frame(ClientFrame::Signal(15)),
                FrameKind::Signal,
                Got::Signal(15),
            ),
            (
                client_frame(ClientFrame::Resize(WindowSize { rows: 3, cols: 4 })),
                FrameKind::Resize,
                Got::Resize(WindowSize { rows: 3, cols: 4 }),
            ),
            (
                client_frame(ClientFrame::Cancel(Cancel { grace_ms: Some(7) })),
                FrameKind::Cancel,
                Got::Cancel(Some(7)),
            ),
        ];
        let open = opening().client;
        let hello = super::edges::hello();
        let kill_all = client_frame(ClientFrame::KillAll);
        for (frame, kind, event) in controls {
            let unexpected = |phase| {
                Err((
                    SessionError::Unexpected { frame: kind, phase },
                    Some(ErrorCode::ProtocolViolation),
                ))
            };
            let mut session = agent();
            assert_eq!(agent_takes(&mut session, &frame), unexpected(Phase::Hello));
            // Before the proof, anything but the proof is refused alike.
            let mut session = agent();
            assert_eq!(
                agent_takes(&mut session, &[hello.clone(), frame.clone()].concat()),
                Err((
                    SessionError::Unauthenticated,
                    Some(ErrorCode::Unauthenticated)
                ))
            );
            let mut session = agent();
            assert_eq!(
                agent_takes(&mut session, &[open.clone(), frame.clone()].concat()),
                unexpected(Phase::Idle),
                "{kind:?} before the exec"
            );
            let mut session = agent();
            assert_eq!(
                agent_takes(
                    &mut session,
                    &[open.clone(), kill_all.clone(), frame.clone()].concat()
                ),
                unexpected(Phase::Starting),
                "{kind:?} during a kill-all"
            );
            // Before the command started and while it runs: passed to the driver.
            let (mut pair, _) = Pair::new(AgentConfig::DEFAULT, &EXEC);
            assert_eq!(
                agent_takes(&mut pair.agent, &frame),
                Ok(vec![event.clone()])
            );
            pair.agent.started(5, 0).unwrap();
            assert_eq!(
                agent_takes(&mut pair.agent, &frame),
                Ok(vec![event.clone()])
            );
            // After the command exited, still (the driver ignores what no longer applies).
            pair.agent.child_exited(ExitStatus::Code(0), 1).unwrap();
            assert_eq!(
                agent_takes(&mut pair.agent, &frame),
                Ok(vec![event.clone()])
            );
            // Once the record is queued, input is read and dropped: no event, no error.
            pair.agent.finish(2).unwrap();
            assert_eq!(agent_takes(&mut pair.agent, &frame), Ok(vec![]));
            let n = pair.agent.poll_transmit(&mut pair.out).unwrap();
            let sent = agent_frames(&pair.out[..n]);
            assert!(
                matches!(sent[..], [Sent::Started, Sent::Exited(_)]),
                "{sent:?}"
            );
        }
    }

    #[test]
    fn a_resize_without_a_terminal_is_refused_by_the_client_and_passed_by_the_agent() {
        let size = WindowSize {
            rows: 50,
            cols: 200,
        };
        let mut pair = Pair::running(AgentConfig::DEFAULT, &EXEC, 0);
        let mut buf = [0u8; 64];
        assert_eq!(pair.client.send_resize(size, &mut buf), Err(NO_TERMINAL));
        // The agent passes it on (the driver ignores it without a terminal).
        let frame = client_frame(ClientFrame::Resize(size));
        assert_eq!(
            agent_takes(&mut pair.agent, &frame),
            Ok(vec![Got::Resize(size)])
        );
        // With a terminal, the client sends it as it is.
        let mut pair = Pair::running(AgentConfig::DEFAULT, &terminal_exec(), 0);
        let n = pair.client.send_resize(size, &mut buf).unwrap();
        assert_eq!(buf[..n], frame[..]);
        assert_eq!(
            agent_takes(&mut pair.agent, &buf[..n]),
            Ok(vec![Got::Resize(size)])
        );
    }

    #[test]
    fn a_second_cancel_is_passed_with_its_own_grace() {
        let mut pair = Pair::running(AgentConfig::DEFAULT, &EXEC, 0);
        for grace in [Some(5_000), Some(100), None, Some(0)] {
            assert_eq!(
                pair.control(|c, out| c.send_cancel(grace, out)),
                Ok(vec![Got::Cancel(grace)])
            );
        }
        // A cancel is no breach of stdin: the pipe stays open until its EOF.
        assert!(pair.agent.stdin_open() && pair.client.stdin_open());
        assert_eq!(DEFAULT_KILL_GRACE_MS, 2_000);
    }

    #[test]
    fn exec_parts_only_before_the_exec() {
        let part = client_frame(ClientFrame::ExecPart(ExecPart {
            list: ListKind::Argv,
            data: Bytes(b"x\0"),
        }));
        let open = opening().client;
        let exec = client_frame(ClientFrame::Exec(EXEC));
        let unexpected = |phase| {
            Err((
                SessionError::Unexpected {
                    frame: FrameKind::ExecPart,
                    phase,
                },
                Some(ErrorCode::ProtocolViolation),
            ))
        };
        let mut session = agent();
        assert_eq!(agent_takes(&mut session, &part), unexpected(Phase::Hello));
        let mut session = agent();
        let before_proof = [super::edges::hello(), part.clone()].concat();
        assert_eq!(
            agent_takes(&mut session, &before_proof),
            Err((
                SessionError::Unauthenticated,
                Some(ErrorCode::Unauthenticated)
            ))
        );
        let mut session = agent();
        assert_eq!(
            agent_takes(
                &mut session,
                &[open.clone(), exec.clone(), part.clone()].concat()
            ),
            unexpected(Phase::Starting),
            "a piece after the exec"
        );
        let mut session = agent();
        let kill_all = client_frame(ClientFrame::KillAll);
        assert_eq!(
            agent_takes(
                &mut session,
                &[open.clone(), kill_all, part.clone()].concat()
            ),
            unexpected(Phase::Starting),
            "a piece during a kill-all"
        );
        let (mut pair, _) = Pair::new(AgentConfig::DEFAULT, &EXEC);
        pair.agent.started(5, 0).unwrap();
        assert_eq!(
            agent_takes(&mut pair.agent, &part),
            unexpected(Phase::Running),
            "a piece while the command runs"
        );
        // Before the exec, a piece is an event of its own, and the exec says it had pieces.
        let mut session = agent();
        let events = agent_takes(&mut session, &[open, part, exec].concat()).unwrap();
        assert_eq!(
            events[2..],
            [
                Got::Part(ListKind::Argv, b"x\0".to_vec()),
                Got::Exec {
                    argv: b"cat\0".to_vec(),
                    env: Vec::new(),
                    parts: true
                }
            ]
        );
    }

    /// `list` as the client's wire would carry it, cut by hand: pieces of `cut` bytes, then the
    /// exec frame's own part (the last `MAX_INLINE_LIST` bytes at most).
    fn raw_pieces(kind: ListKind, list: &[u8], cut: usize) -> (Vec<u8>, &[u8]) {
        let (pieces, inline) = list.split_at(list.len().saturating_sub(MAX_INLINE_LIST));
        let mut bytes = Vec::new();
        for data in pieces.chunks(cut) {
            bytes.extend(client_frame(ClientFrame::ExecPart(ExecPart {
                list: kind,
                data: Bytes(data),
            })));
        }
        (bytes, inline)
    }

    /// `argv` and `env` in pieces of `cut` bytes to an agent with `limits`: the lists as the
    /// agent reassembles them (and whether it was told of pieces), or its refusal.
    fn in_pieces(
        limits: Limits,
        argv: &[u8],
        env: &[u8],
        cut: usize,
    ) -> Result<(Vec<u8>, Vec<u8>, bool), Refused> {
        let config = AgentConfig {
            limits,
            ..AgentConfig::DEFAULT
        };
        let mut session = agent_with(config, Some(secret()));
        let open = super::edges::opening_with(config, Some(secret())).client;
        let (argv_parts, argv_inline) = raw_pieces(ListKind::Argv, argv, cut);
        let (env_parts, env_inline) = raw_pieces(ListKind::Env, env, cut);
        let exec = client_frame(ClientFrame::Exec(ExecRequest {
            argv: StrList::new(argv_inline),
            env: StrList::new(env_inline),
            ..EXEC
        }));
        let events = agent_takes(&mut session, &[open, argv_parts, env_parts, exec].concat())?;
        let (mut whole_argv, mut whole_env) = (Vec::new(), Vec::new());
        let mut parts = false;
        for event in events {
            match event {
                Got::Part(ListKind::Argv, data) => whole_argv.extend(data),
                Got::Part(ListKind::Env, data) => whole_env.extend(data),
                Got::Exec {
                    argv,
                    env,
                    parts: had,
                } => {
                    whole_argv.extend(argv);
                    whole_env.extend(env);
                    parts = had;
                }
                Got::Hello | Got::Authenticated => {}
                other => panic!("{other:?}"),
            }
        }
        Ok((whole_argv, whole_env, parts))
    }

    /// `count` entries of `len` bytes each, NUL included (argv: `a`s; env: `K=` and `v`s).
    fn entries(kind: ListKind, len: usize, count: usize) -> Vec<u8> {
        let mut entry = match kind {
            ListKind::Argv => vec![b'a'; len - 1],
            ListKind::Env => [b"K=".as_slice(), &vec![b'v'; len - 3]].concat(),
        };
        entry.push(0);
        entry.repeat(count)
    }

    /// A list at a limit goes through in pieces and comes back whole; one byte, entry or
    /// entry byte past it is refused, whether the pieces or the exec frame cross it.
    #[test]
    fn exec_parts_at_and_one_past_each_limit() {
        let ours = Limits::CURRENT;
        let check = |name: &str, limits: Limits, argv: Vec<u8>, env: Vec<u8>, at: bool| {
            for cut in [MAX_DATA, 4_093] {
                let result = in_pieces(limits, &argv, &env, cut);
                if at {
                    let (whole_argv, whole_env, parts) =
                        result.unwrap_or_else(|err| panic!("{name}: {err:?}"));
                    assert!(whole_argv == argv && whole_env == env, "{name}");
                    assert!(parts, "{name}");
                } else {
                    assert_eq!(
                        result,
                        Err((LIMIT, Some(ErrorCode::LimitExceeded))),
                        "{name} cut at {cut}"
                    );
                }
            }
        };
        let argv = ListKind::Argv;
        let env = ListKind::Env;
        let prog = b"prog\0".to_vec();
        let small_env = b"A=1\0".to_vec();
        // Bytes: sixteen entries of the longest length are exactly the argv limit.
        let at = entries(argv, MAX_ARG_LEN, MAX_ARGV_BYTES / MAX_ARG_LEN);
        assert_eq!(at.len(), MAX_ARGV_BYTES);
        check("argv bytes at", ours, at.clone(), small_env.clone(), true);
        let over = [at, b"\0".to_vec()].concat();
        check("argv bytes over", ours, over, small_env.clone(), false);
        let at = entries(env, MAX_ARG_LEN, MAX_ENV_BYTES / MAX_ARG_LEN);
        assert_eq!(at.len(), MAX_ENV_BYTES);
        check("env bytes at", ours, prog.clone(), at.clone(), true);
        let over = [at, b"B=\0".to_vec()].concat();
        check("env bytes over", ours, prog.clone(), over, false);
        // Entries.
        let at = entries(argv, 2, MAX_ARGS);
        check("argv entries at", ours, at.clone(), small_env.clone(), true);
        let over = [at, b"\0".to_vec()].concat();
        check("argv entries over", ours, over, small_env.clone(), false);
        let at = entries(env, 3, MAX_ENV_VARS);
        check("env entries at", ours, prog.clone(), at.clone(), true);
        let over = [at, b"K=\0".to_vec()].concat();
        check("env entries over", ours, prog.clone(), over, false);
        // One entry's length, NUL included, spanning pieces (and the inline part).
        for len in [MAX_ARG_LEN, MAX_ARG_LEN + 1] {
            let long = [prog.clone(), entries(argv, len, 1), prog.clone()].concat();
            let at = len == MAX_ARG_LEN;
            check("argv entry", ours, long, small_env.clone(), at);
            let long = [small_env.clone(), entries(env, len, 1), small_env.clone()].concat();
            check("env entry", ours, prog.clone(), long, at);
        }
        // An agent's tighter limits, in pieces too.
        let tight = Limits {
            max_argv_bytes: 20_000,
            max_args: 3,
            max_env_bytes: 20_000,
            max_env_vars: 2,
            max_arg_len: 19_000,
            ..ours
        };
        let at = [
            b"a\0".to_vec(),
            entries(argv, 19_000, 1),
            entries(argv, 998, 1),
        ]
        .concat();
        assert_eq!(at.len(), 20_000);
        check(
            "tight argv bytes at",
            tight,
            at.clone(),
            small_env.clone(),
            true,
        );
        let over = [b"ab\0".to_vec(), at[2..].to_vec()].concat();
        check(
            "tight argv bytes over",
            tight,
            over,
            small_env.clone(),
            false,
        );
        let over = [at.clone(), b"\0".to_vec()].concat();
        check(
            "tight argv entries over",
            tight,
            over,
            small_env.clone(),
            false,
        );
        let long = [entries(argv, 19_001, 1), b"a\0".to_vec()].concat();
        check(
            "tight argv entry over",
            tight,
            long,
            small_env.clone(),
            false,
        );
        let at = [entries(env, 19_000, 1), entries(env, 1_000, 1)].concat();
        check("tight env at", tight, prog.clone(), at.clone(), true);
        let over = [at, b"K=\0".to_vec()].concat();
        check("tight env over", tight, prog.clone(), over, false);
    }

    /// The pieces and the exec's own part are one list: an entry may span them, but the last
    /// piece must close the last entry, and every rule holds across the cuts.
    #[test]
    fn the_exec_frame_is_the_last_piece_of_its_lists() {
        let open = opening().client;
        let part = |list, data: &'static [u8]| {
            client_frame(ClientFrame::ExecPart(ExecPart {
                list,
                data: Bytes(data),
            }))
        };
        let exec = |argv: &'static [u8], env: &'static [u8]| {
            client_frame(ClientFrame::Exec(ExecRequest {
                argv: StrList::new(argv),
                env: StrList::new(env),
                ..EXEC
            }))
        };
        let run = |frames: Vec<Vec<u8>>| {
            let mut session = agent();
            agent_takes(
                &mut session,
                &[vec![open.clone()], frames].concat().concat(),
            )
        };
        let invalid = |message| {
            Err((
                SessionError::InvalidRequest { message },
                Some(ErrorCode::InvalidRequest),
            ))
        };
        let open_entry = "list entry without NUL terminator";
        let argv = ListKind::Argv;
        let env = ListKind::Env;
        assert_eq!(
            run(vec![part(argv, b"ls\0-l"), exec(b"a", b"")]),
            invalid(open_entry)
        );
        assert_eq!(
            run(vec![part(argv, b"ls\0-l"), exec(b"", b"")]),
            invalid(open_entry)
        );
        assert_eq!(
            run(vec![part(env, b"A=1\0B"), exec(b"ls\0", b"=2")]),
            invalid(open_entry)
        );
        // An entry completed by the exec frame, or pieces that end on a NUL before an empty
        // last part: fine, and the driver is told to append.
        let events = run(vec![part(argv, b"ls\0-"), exec(b"l\0", b"")]).unwrap();
        assert_eq!(
            events.last(),
            Some(&Got::Exec {
                argv: b"l\0".to_vec(),
                env: Vec::new(),
                parts: true
            })
        );
        let events = run(vec![
            part(argv, b"ls\0"),
            part(env, b"A"),
            exec(b"", b"=1\0"),
        ]);
        assert!(events.is_ok(), "{events:?}");
        // The rules hold across a cut: a key that starts with '=', an empty argv[0], an
        // environment entry without '=' (its NUL in the exec frame).
        assert_eq!(
            run(vec![
                part(env, b"A=1\0"),
                part(env, b"=x\0"),
                exec(b"ls\0", b"")
            ]),
            invalid("environment entry is not KEY=VALUE")
        );
        assert_eq!(
            run(vec![part(argv, b"\0"), exec(b"ls\0", b"")]),
            invalid("argv[0] is empty")
        );
        assert_eq!(
            run(vec![part(env, b"AB"), exec(b"ls\0", b"C\0")]),
            invalid("environment entry is not KEY=VALUE")
        );
        // Empty pieces are no pieces.
        let events = run(vec![part(argv, b""), exec(b"ls\0", b"")]).unwrap();
        assert_eq!(
            events.last(),
            Some(&Got::Exec {
                argv: b"ls\0".to_vec(),
                env: Vec::new(),
                parts: false
            })
        );
    }

    /// `len` bytes of entries of `entry` bytes (NUL included; the last one takes what is left,
    /// up to `entry + 2`) whose bytes differ from place to place, so a piece out of order or
    /// lost shows.
    fn varied(kind: ListKind, len: usize, entry: usize) -> Vec<u8> {
        let shortest = match kind {
            ListKind::Argv => 1,
            ListKind::Env => 3,
        };
        let mut list = Vec::with_capacity(len);
        let mut i = 0usize;
        while list.len() < len {
            let left = len - list.len();
            let this = match entry.min(left) {
                this if left - this < shortest => left,
                this => this,
            };
            let start = list.len();
            if kind == ListKind::Env {
                list.extend_from_slice(b"K=");
            }
            while list.len() < start + this - 1 {
                i += 1;
                list.push(b'!' + (i % 90) as u8);
            }
            list.push(0);
        }
        list
    }

    /// The largest request (2 MiB of argv, 1 MiB of environment, the longest working
    /// directory and user) goes through `start_exec` into a buffer of `exec_buffer_len`, in
    /// pieces, and the agent's driver, appending the pieces, gets it back byte for byte.
    #[test]
    fn the_largest_request_goes_in_pieces_and_comes_back_byte_for_byte() {
        let argv = varied(ListKind::Argv, MAX_ARGV_BYTES, MAX_ARG_LEN);
        let env = varied(ListKind::Env, MAX_ENV_BYTES, MAX_ARG_LEN);
        let cwd = vec![b'd'; MAX_PATH];
        let user = vec![b'u'; MAX_USER];
        let request = ExecRequest {
            argv: StrList::new(&argv),
            env: StrList::new(&env),
            clean_env: true,
            cwd: Some(Bytes(&cwd)),
            stdin: StdinMode::Pipe,
            user: Some(Bytes(&user)),
            pty: Some(WindowSize {
                rows: u16::MAX,
                cols: u16::MAX,
            }),
            timeout_ms: u64::MAX,
            kill_grace_ms: Some(u32::MAX),
            kill_tree_on_exit: true,
            max_output: u64::MAX,
        };
        assert!(request.validate().is_ok());
        let len = ClientSession::exec_buffer_len(&request);
        let mut client = client_with(Some(secret()));
        let open = opening();
        client.handle_input(&open.agent_hello).unwrap();
        let mut buf = vec![0u8; len];
        let n = client.start_exec(&request, &mut buf).unwrap();
        assert!(n <= len);
        // One byte short of what it needs: refused, nothing changed, then it goes through.
        let mut retry = client_with(Some(secret()));
        retry.handle_input(&open.agent_hello).unwrap();
        assert_eq!(
            retry.start_exec(&request, &mut vec![0u8; n - 1]),
            Err(SessionError::BufferTooSmall)
        );
        let mut again = vec![0u8; len];
        assert_eq!(retry.start_exec(&request, &mut again), Ok(n));
        assert_eq!(again[..n], buf[..n]);
        // Every frame is within the limits: pieces of at most MAX_DATA, an exec within one
        // frame.
        let mut rest = &buf[open.client.len()..n];
        let mut frames = 0;
        while !rest.is_empty() {
            let (body, used) = split_frame(rest, MAX_FRAME_BODY).unwrap().unwrap();
            match decode_client_frame(body).unwrap() {
                ClientFrame::ExecPart(part) => assert!(part.data.0.len() <= MAX_DATA),
                ClientFrame::Exec(exec) => {
                    assert!(exec.argv.as_bytes().len() <= MAX_INLINE_LIST);
                    assert!(exec.env.as_bytes().len() <= MAX_INLINE_LIST);
                }
                other => panic!("{other:?}"),
            }
            frames += 1;
            rest = &rest[used..];
        }
        assert!(frames > (MAX_ARGV_BYTES + MAX_ENV_BYTES) / MAX_DATA);
        // The agent takes it and its driver reassembles it.
        let mut session = agent();
        let events = agent_takes(&mut session, &buf[..n]).unwrap();
        let (mut whole_argv, mut whole_env) = (Vec::new(), Vec::new());
        for event in events {
            match event {
                Got::Part(ListKind::Argv, data) => whole_argv.extend(data),
                Got::Part(ListKind::Env, data) => whole_env.extend(data),
                Got::Exec { argv, env, parts } => {
                    assert!(parts);
                    whole_argv.extend(argv);
                    whole_env.extend(env);
                }
                Got::Hello | Got::Authenticated => {}
                other => panic!("{other:?}"),
            }
        }
        assert!(whole_argv == argv, "argv differs");
        assert!(whole_env == env, "env differs");
        assert_eq!(session.phase(), Phase::Starting);
    }

    fn list_len() -> impl Strategy<Value = usize> {
        let edges = |base: usize| {
            prop_oneof![
                Just(base.saturating_sub(1)),
                Just(base),
                Just(base + 1),
                Just(base + MAX_DATA - 1),
                Just(base + MAX_DATA),
                Just(base + MAX_DATA + 1),
            ]
        };
        prop_oneof![
            0usize..64,
            edges(MAX_INLINE_LIST),
            edges(MAX_INLINE_LIST + 3 * MAX_DATA),
            (MAX_INLINE_LIST..MAX_ENV_BYTES),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Whatever the request, a buffer of `exec_buffer_len` holds all `start_exec` writes,
        /// and the stream it writes reassembles to the request.
        #[test]
        fn exec_buffer_len_is_always_enough(
            argv_len in list_len(),
            env_len in list_len(),
            argv_entry in 2usize..=MAX_ARG_LEN,
            env_entry in 3usize..=MAX_ARG_LEN,
            big in any::<bool>(),
            secure in any::<bool>(),
        ) {
            let argv_len = argv_len.max(2) + if big { MAX_ARGV_BYTES / 2 } else { 0 };
            // Few enough entries for the limits, none too long.
            let argv_entry = argv_entry.max(argv_len / (MAX_ARGS / 2) + 2).min(MAX_ARG_LEN - 2);
            let env_entry = env_entry.max(env_len / (MAX_ENV_VARS / 2) + 3).min(MAX_ARG_LEN - 2);
            let argv = varied(ListKind::Argv, argv_len, argv_entry);
            let env = match env_len {
                0..=2 => Vec::new(),
                _ => varied(ListKind::Env, env_len, env_entry),
            };
            let cwd = vec![b'd'; MAX_PATH];
            let user = vec![b'u'; MAX_USER];
            let request = ExecRequest {
                argv: StrList::new(&argv),
                env: StrList::new(&env),
                cwd: Some(Bytes(&cwd)),
                user: Some(Bytes(&user)),
                pty: Some(WindowSize { rows: u16::MAX, cols: u16::MAX }),
                timeout_ms: u64::MAX,
                kill_grace_ms: Some(u32::MAX),
                max_output: u64::MAX,
                ..EXEC
            };
            prop_assert!(request.validate().is_ok(), "{} + {} bytes", argv.len(), env.len());
            let secret = secure.then(secret);
            let open = super::edges::opening_with(AgentConfig::DEFAULT, secret.clone());
            let mut client = client_with(secret.clone());
            client.handle_input(&open.agent_hello).unwrap();
            let len = ClientSession::exec_buffer_len(&request);
            prop_assert!(len >= MAX_FRAME);
            let mut buf = vec![0u8; len];
            let n = client.start_exec(&request, &mut buf);
            prop_assert!(n.is_ok(), "{:?} for {} + {} bytes", n, argv.len(), env.len());
            let n = n.unwrap();
            let mut session = agent_with(AgentConfig::DEFAULT, secret);
            let events = agent_takes(&mut session, &buf[..n]).unwrap();
            let (mut whole_argv, mut whole_env) = (Vec::new(), Vec::new());
            for event in events {
                match event {
                    Got::Part(ListKind::Argv, data) => whole_argv.extend(data),
                    Got::Part(ListKind::Env, data) => whole_env.extend(data),
                    Got::Exec { argv: a, env: e, parts } => {
                        prop_assert_eq!(parts, argv.len() > MAX_INLINE_LIST || env.len() > MAX_INLINE_LIST);
                        whole_argv.extend(a);
                        whole_env.extend(e);
                    }
                    _ => {}
                }
            }
            prop_assert!(whole_argv == argv && whole_env == env);
        }
    }

    const INTERVAL: Micros = KEEPALIVE_MS as Micros * 1000;

    /// The client's liveness check: three keepalive intervals after it last heard the agent
    /// (with `handle_input_at`), while an operation runs; not a moment before.
    #[test]
    fn the_agent_is_silent_after_exactly_three_intervals_of_nothing() {
        let (mut pair, _) = Pair::new(AgentConfig::DEFAULT, &EXEC);
        // The proof was heard at 0; the exec is asked for.
        assert_eq!(pair.client.poll_timeout(), Some(3 * INTERVAL));
        pair.agent.started(5, 1_000).unwrap();
        assert_eq!(pair.deliver(2_000), [Heard::Started(5)]);
        assert_eq!(pair.client.poll_timeout(), Some(2_000 + 3 * INTERVAL));
        // The agent's keepalives keep it alive: each moves the deadline.
        let mut now = 2_000;
        for round in 1..=4 {
            let due = pair.agent.poll_timeout().unwrap();
            assert_eq!(due, 1_000 + round * INTERVAL);
            assert_eq!(pair.client.handle_timeout(due), Ok(()));
            pair.agent.handle_timeout(due).unwrap();
            assert_eq!(pair.deliver(due), [Heard::Keepalive]);
            now = due;
            assert_eq!(pair.client.poll_timeout(), Some(now + 3 * INTERVAL));
        }
        // `handle_input` (no clock) does not move it; neither does an empty input.
        pair.agent.handle_timeout(now + INTERVAL).unwrap();
        let n = pair.agent.poll_transmit(&mut pair.out).unwrap();
        let keepalive = pair.out[..n].to_vec();
        pair.client.handle_input(&keepalive).unwrap();
        pair.client.handle_input_at(&[], now + INTERVAL).unwrap();
        assert_eq!(pair.client.poll_timeout(), Some(now + 3 * INTERVAL));
        // Part of a frame is the agent heard.
        let half = &keepalive[..2];
        let input = pair.client.handle_input_at(half, now + 2).unwrap();
        assert_eq!(input.consumed, 0);
        now += 2;
        let deadline = now + 3 * INTERVAL;
        assert_eq!(pair.client.poll_timeout(), Some(deadline));
        // A clock that goes back does not bring the deadline closer.
        pair.client.handle_input_at(half, now - 1).unwrap();
        assert_eq!(pair.client.poll_timeout(), Some(deadline));
        // Not a microsecond early.
        assert_eq!(pair.client.handle_timeout(deadline - 1), Ok(()));
        assert!(!pair.client.is_finished());
        assert_eq!(
            pair.client.handle_timeout(deadline),
            Err(SessionError::AgentSilent)
        );
        assert!(pair.client.is_finished());
        assert_eq!(pair.client.poll_timeout(), None);
        assert!(!pair.client.stdin_open());
        assert_eq!(
            pair.client.handle_input_at(&keepalive, deadline),
            Err(SessionError::InvalidState)
        );
        let mut buf = [0u8; 16];
        assert_eq!(
            pair.client.send_cancel(None, &mut buf),
            Err(SessionError::InvalidState)
        );
    }

    #[test]
    fn liveness_only_while_an_operation_runs_and_the_agent_sends_keepalives() {
        // A driver that never says when it heard the agent gets no liveness deadline.
        let mut client = client_with(Some(secret()));
        let open = opening();
        client.handle_input(&open.agent_hello).unwrap();
        let mut out = vec![0u8; MAX_FRAME];
        client.start_exec(&EXEC, &mut out).unwrap();
        client.handle_input(&open.agent_proof).unwrap();
        assert_eq!(client.poll_timeout(), None);
        assert_eq!(client.handle_timeout(u64::MAX), Ok(()));
        // Before an operation, heard or not: none (the agent sends no keepalives then).
        let mut client = client_with(Some(secret()));
        client.handle_input_at(&open.agent_hello, 10).unwrap();
        client.poll_transmit(&mut out).unwrap();
        client.handle_input_at(&open.agent_proof, 20).unwrap();
        assert_eq!(client.poll_timeout(), None, "idle");
        // An agent that announces no keepalives is never silent.
        let quiet = AgentConfig {
            limits: Limits {
                keepalive_ms: 0,
                ..Limits::CURRENT
            },
            ..AgentConfig::DEFAULT
        };
        let mut pair = Pair::running(quiet, &EXEC, 0);
        assert_eq!(pair.agent.poll_timeout(), None);
        assert_eq!(pair.client.poll_timeout(), None);
        assert_eq!(pair.client.handle_timeout(u64::MAX), Ok(()));
        // After the record: none.
        let mut pair = Pair::running(AgentConfig::DEFAULT, &EXEC, 0);
        pair.agent.child_exited(ExitStatus::Code(0), 5).unwrap();
        pair.agent.finish(6).unwrap();
        assert!(matches!(pair.deliver(6)[..], [Heard::Exited(_)]));
        assert_eq!(pair.client.poll_timeout(), None);
        assert_eq!(pair.client.handle_timeout(u64::MAX), Ok(()));
        // Until the agent proved itself, the handshake's deadline is the one that counts.
        let mut client = ClientSession::new(
            0,
            Some(1_000),
            ClientAuth {
                nonce: super::edges::CLIENT_NONCE,
                secret: Some(secret()),
            },
        );
        client.handle_input_at(&open.agent_hello, 500).unwrap();
        client.start_exec(&EXEC, &mut out).unwrap();
        assert_eq!(client.poll_timeout(), Some(1_000));
        assert_eq!(
            client.handle_timeout(1_000),
            Err(SessionError::TimedOut {
                phase: Phase::Hello
            })
        );
    }

    /// The agent queues a keepalive every interval while the command runs, after `Started`,
    /// and never before it or after the record.
    #[test]
    fn keepalives_only_while_the_command_runs() {
        let fast = AgentConfig {
            limits: Limits {
                keepalive_ms: 10,
                ..Limits::CURRENT
            },
            ..AgentConfig::DEFAULT
        };
        let (mut pair, _) = Pair::new(fast, &EXEC);
        // Starting: nothing to keep alive yet.
        assert_eq!(pair.agent.poll_timeout(), None);
        pair.agent.handle_timeout(1_000_000).unwrap();
        assert!(!pair.agent.has_queued());
        pair.agent.started(5, 100).unwrap();
        assert_eq!(pair.agent.poll_timeout(), Some(10_100));
        // Due while `Started` is still queued: the keepalive follows it, and the credit.
        pair.agent.handle_timeout(10_100).unwrap();
        assert_eq!(pair.agent.poll_timeout(), Some(20_100));
        let n = pair.agent.poll_transmit(&mut pair.out).unwrap();
        assert_eq!(
            agent_frames(&pair.out[..n]),
            [Sent::Started, Sent::Keepalive]
        );
        // One keepalive, however late the driver is; the next an interval after it.
        pair.agent.handle_timeout(55_000).unwrap();
        assert_eq!(pair.agent.poll_timeout(), Some(65_000));
        pair.agent.handle_timeout(55_001).unwrap();
        let n = pair.agent.poll_transmit(&mut pair.out).unwrap();
        assert_eq!(agent_frames(&pair.out[..n]), [Sent::Keepalive]);
        assert_eq!(pair.agent.poll_transmit(&mut pair.out), Ok(0));
        // After the exit too (the drain), with the grace period's end.
        pair.agent
            .child_exited(ExitStatus::Code(0), 60_000)
            .unwrap();
        let grace_end = 60_000 + fast.drain_grace;
        assert_eq!(pair.agent.poll_timeout(), Some(65_000));
        pair.agent.handle_timeout(65_000).unwrap();
        assert!(pair.agent.has_queued());
        // A keepalive queued when the record is: the record only, and no deadline but the
        // final send's.
        pair.agent.finish(65_500).unwrap();
        let n = pair.agent.poll_transmit(&mut pair.out).unwrap();
        assert!(matches!(
            agent_frames(&pair.out[..n])[..],
            [Sent::Exited(_)]
        ));
        assert_eq!(
            pair.agent.poll_timeout(),
            Some(65_500 + fast.final_send_timeout)
        );
        assert!(grace_end > 65_500);
        pair.agent.handle_timeout(grace_end).unwrap();
        assert_eq!(pair.agent.poll_transmit(&mut pair.out), Ok(0));
        // A refusal: no keepalive after it either.
        let (mut pair, _) = Pair::new(fast, &EXEC);
        pair.agent.started(5, 0).unwrap();
        pair.agent.handle_timeout(10_000).unwrap();
        pair.agent
            .refuse(Refusal::new(ErrorCode::Internal, "x"), 10_000)
            .unwrap();
        let n = pair.agent.poll_transmit(&mut pair.out).unwrap();
        assert_eq!(
            agent_frames(&pair.out[..n]),
            [Sent::Error(ErrorCode::Internal)]
        );
    }

    /// An output chunk is stamped with the time since the command started (as the driver gave
    /// it to `started`), and the client reports the stamp of the last one.
    #[test]
    fn output_timestamps_count_from_the_start_and_reach_the_client() {
        let mut pair = Pair::running(AgentConfig::DEFAULT, &EXEC, 1_000);
        assert_eq!(pair.client.last_output_at(), 0);
        assert_eq!(
            pair.output(DataKind::Stdout, b"first", 1_000 + 123_456),
            [Heard::Stdout(b"first".to_vec(), 123_456)]
        );
        assert_eq!(
            pair.output(DataKind::Stderr, b"second", 1_000 + 200_000),
            [Heard::Stderr(b"second".to_vec(), 200_000)]
        );
        // A notice of dropped output is no output: the stamp stays.
        let dropped = Dropped {
            stream: Stream::Stdout,
            bytes: 10,
        };
        assert_eq!(
            pair.dropped(Stream::Stdout, 10, 1_000 + 300_000),
            [Heard::Dropped(dropped)]
        );
        assert_eq!(pair.client.last_output_at(), 200_000);
        // A driver clock before the start counts as the start; the largest stamps go through.
        assert_eq!(
            pair.output(DataKind::Stdout, b"", 999),
            [Heard::Stdout(Vec::new(), 0)]
        );
        assert_eq!(
            pair.output(DataKind::Stdout, b"x", u64::MAX),
            [Heard::Stdout(b"x".to_vec(), u64::MAX - 1_000)]
        );
        // Stdin is no output.
        let mut buf = vec![0u8; DATA_HEADROOM + 1];
        assert_eq!(
            pair.agent.frame_output(&mut buf, DataKind::Stdin, 1, 5),
            Err(SessionError::InvalidState)
        );
    }

    /// The record counts each stream's bytes as the driver framed them, plus what the output
    /// cap dropped, and carries the driver's facts about the end.
    #[test]
    fn the_record_counts_each_stream_and_carries_the_drivers_facts() {
        let (mut pair, _) = Pair::new(AgentConfig::DEFAULT, &EXEC);
        let mut buf = [0u8; 32];
        assert_eq!(
            pair.agent
                .encode_output_dropped(Stream::Stdout, 1, &mut buf),
            Err(SessionError::InvalidState),
            "before the command started"
        );
        pair.agent.started(5, 100).unwrap();
        pair.deliver(100);
        pair.output(DataKind::Stdout, &[b'o'; 10], 200);
        pair.output(DataKind::Stderr, &[b'e'; 5], 300);
        // The head of stdout was sent, 1000 bytes are dropped, the tail follows.
        let heard = pair.dropped(Stream::Stdout, 1_000, 400);
        assert_eq!(
            heard,
            [Heard::Dropped(Dropped {
                stream: Stream::Stdout,
                bytes: 1_000
            })]
        );
        pair.output(DataKind::Stdout, b"end", 500);
        // A notice that does not fit its buffer is neither sent nor counted.
        assert_eq!(
            pair.agent
                .encode_output_dropped(Stream::Stderr, 7, &mut buf[..3]),
            Err(SessionError::BufferTooSmall)
        );
        // Nothing dropped is no drop.
        pair.dropped(Stream::Stderr, 0, 550);
        pair.agent.child_exited(ExitStatus::Code(3), 900).unwrap();
        let facts = EndFacts {
            ending: Ending::TimedOut,
            tree_kill: TreeKill::Cgroup,
            pipes_held: true,
            oom_killed: true,
            peak_memory: 4_096,
        };
        pair.agent.finish_with(1_000, facts).unwrap();
        assert_eq!(
            pair.agent
                .encode_output_dropped(Stream::Stdout, 1, &mut buf),
            Err(SessionError::InvalidState),
            "after the record"
        );
        assert_eq!(
            pair.agent.finish_with(1_000, facts),
            Err(SessionError::InvalidState)
        );
        let heard = pair.deliver(1_000);
        assert_eq!(
            heard,
            [Heard::Exited(Termination {
                status: ExitStatus::Code(3),
                duration_us: 800,
                output_dropped: true,
                ending: Ending::TimedOut,
                tree_kill: TreeKill::Cgroup,
                stdout: StreamRecord {
                    bytes: 10 + 1_000 + 3,
                    dropped: 1_000
                },
                stderr: StreamRecord {
                    bytes: 5,
                    dropped: 0
                },
                pipes_held: true,
                oom_killed: true,
                peak_memory: 4_096,
            })]
        );
        // Nothing dropped, nothing known: the plain record.
        let mut pair = Pair::running(AgentConfig::DEFAULT, &EXEC, 0);
        pair.dropped(Stream::Stdout, 0, 1);
        pair.output(DataKind::Stdout, b"ok", 2);
        pair.agent.child_exited(ExitStatus::Code(0), 3).unwrap();
        pair.agent.finish(4).unwrap();
        let Heard::Exited(end) = pair.deliver(4).remove(0) else {
            panic!("no record");
        };
        assert!(!end.output_dropped);
        assert_eq!(
            (end.ending, end.tree_kill, end.stdout, end.stderr),
            (
                Ending::Exited,
                TreeKill::None,
                StreamRecord {
                    bytes: 2,
                    dropped: 0
                },
                StreamRecord::default()
            )
        );
    }

    /// A half-close (the client's `shutdown(SHUT_WR)`) while the command starts or runs is no
    /// disconnect: stdin ends, nothing more is read, and `Started`, the output and the record
    /// still go out.
    #[test]
    fn a_half_close_mid_run_still_gets_started_output_and_the_record() {
        for when in ["starting", "running", "exited"] {
            let (mut pair, _) = Pair::new(AgentConfig::DEFAULT, &EXEC);
            assert!(pair.agent.stdin_open());
            if when == "starting" {
                assert_eq!(pair.agent.handle_eof(), Ok(()));
            }
            pair.agent.started(5, 0).unwrap();
            if when == "running" {
                assert_eq!(pair.agent.handle_eof(), Ok(()));
            }
            let mut heard = pair.output(DataKind::Stdout, b"out", 10);
            pair.agent.child_exited(ExitStatus::Code(0), 20).unwrap();
            if when == "exited" {
                assert_eq!(pair.agent.handle_eof(), Ok(()));
            }
            assert!(pair.agent.input_closed(), "{when}");
            assert!(
                !pair.agent.stdin_open() && !pair.agent.is_closing(),
                "{when}"
            );
            // Keepalives still go out (a client that is really gone shows when one fails).
            assert!(pair.agent.poll_timeout().is_some());
            heard.extend(pair.output(DataKind::Stderr, b"err", 30));
            pair.agent.finish(40).unwrap();
            heard.extend(pair.deliver(40));
            assert_eq!(
                heard[..3],
                [
                    Heard::Started(5),
                    Heard::Stdout(b"out".to_vec(), 10),
                    Heard::Stderr(b"err".to_vec(), 30),
                ],
                "{when}"
            );
            assert!(matches!(heard[3], Heard::Exited(_)), "{when}: {heard:?}");
            assert!(pair.agent.is_closed() && pair.client.is_finished());
        }
        // A kill-all in progress is owed its report too.
        let mut session = agent();
        let bytes = [opening().client, client_frame(ClientFrame::KillAll)].concat();
        agent_takes(&mut session, &bytes).unwrap();
        assert_eq!(session.handle_eof(), Ok(()));
        session.done(2, 0).unwrap();
        let mut out = vec![0u8; MAX_FRAME];
        let n = session.poll_transmit(&mut out).unwrap();
        assert_eq!(
            agent_frames(&out[..n]),
            [
                Sent::Other(FrameKind::Hello),
                Sent::Other(FrameKind::Authenticated),
                Sent::Other(FrameKind::Done)
            ]
        );
    }

    /// A half-close the driver notices after the final frame was queued, before it was sent (a
    /// refusal while the client had already shut its side, `echo | nc -N`; a record waiting on
    /// a slow reader) leaves the owed frame to go out (within the final-send deadline), as it
    /// does while the command runs.
    #[test]
    fn a_half_close_while_the_final_frame_is_queued_still_sends_it() {
        // The record.
        let mut pair = Pair::running(AgentConfig::DEFAULT, &EXEC, 0);
        pair.agent.child_exited(ExitStatus::Code(0), 1).unwrap();
        pair.agent.finish(2).unwrap();
        assert_eq!(pair.agent.handle_eof(), Ok(()));
        assert!(!pair.agent.is_closed(), "the record is still owed");
        assert!(matches!(pair.deliver(3)[..], [Heard::Exited(_)]));
        assert!(pair.agent.is_closed());
        // A refusal.
        let (mut pair, _) = Pair::new(AgentConfig::DEFAULT, &EXEC);
        pair.agent
            .refuse(Refusal::os(ErrorCode::NotFound, 2, "no such program"), 0)
            .unwrap();
        assert_eq!(pair.agent.handle_eof(), Ok(()));
        assert!(!pair.agent.is_closed(), "the refusal is still owed");
        assert_eq!(pair.deliver(1), [Heard::Refused(ErrorCode::NotFound)]);
    }

    /// The agent sends keepalives only while a command runs, so the client does not arm its
    /// liveness check for a kill-all: one that takes three intervals (a tree slow to die) is not
    /// a silent agent.
    #[test]
    fn a_long_kill_all_is_kept_alive() {
        let mut client = client_with(Some(secret()));
        let mut agent = agent();
        let mut out = vec![0u8; MAX_FRAME];
        let n = agent.poll_transmit(&mut out).unwrap();
        client_takes(&mut client, &out[..n], 0).unwrap();
        let n = client.start_kill_all(&mut out).unwrap();
        assert_eq!(
            agent_takes(&mut agent, &out[..n]).unwrap().last(),
            Some(&Got::KillAll)
        );
        let n = agent.poll_transmit(&mut out).unwrap();
        client_takes(&mut client, &out[..n], 0).unwrap();
        let mut now = 0;
        while now < 4 * INTERVAL {
            now += INTERVAL;
            agent.handle_timeout(now).unwrap();
            let n = agent.poll_transmit(&mut out).unwrap();
            client_takes(&mut client, &out[..n], now).unwrap();
            assert_eq!(client.handle_timeout(now), Ok(()), "silent at {now}");
        }
    }

    /// Pieces of a request are followed by that request: a kill-all instead is out of place
    /// (attack-log B4), like any other frame.
    #[test]
    fn a_kill_all_after_pieces_is_refused() {
        let mut agent = agent();
        let bytes = [
            opening().client,
            client_frame(ClientFrame::ExecPart(ExecPart {
                list: ListKind::Argv,
                data: Bytes(b""),
            })),
            client_frame(ClientFrame::KillAll),
        ]
        .concat();
        assert!(matches!(
            super::edges::feed_agent(&mut agent, &bytes),
            Err(SessionError::Unexpected {
                frame: FrameKind::KillAll,
                ..
            })
        ));
    }

    /// Bytes a capped stream keeps back for its tail count toward the post-exit drain limit
    /// like framed ones: a writer that outlives its command and never pauses is cut off
    /// (attack-log B1), and nothing is counted before the exit.
    #[test]
    fn bytes_kept_back_after_exit_count_toward_the_drain_limit() {
        let mut session = super::edges::agent_given_exec_pub();
        session.started(5, 0).unwrap();
        session.note_drained(AgentConfig::DEFAULT.drain_limit * 2);
        assert_eq!(
            session.output_phase(1),
            OutputPhase::Open,
            "before the exit"
        );
        session.child_exited(ExitStatus::Code(0), 10).unwrap();
        session.note_drained(AgentConfig::DEFAULT.drain_limit);
        assert_eq!(session.output_phase(11), OutputPhase::Grace);
        session.note_drained(1);
        assert_eq!(session.output_phase(11), OutputPhase::Closed);
        session.finish(12).unwrap();
        let mut out = vec![0u8; MAX_FRAME];
        let n = session.poll_transmit(&mut out).unwrap();
        let mut rest = &out[..n];
        let mut record = None;
        while let Ok(Some((body, used))) = split_frame(rest, MAX_FRAME_BODY) {
            if let Ok(AgentFrame::Exited(end)) = decode_agent_frame(body) {
                record = Some(end);
            }
            rest = &rest[used..];
        }
        assert!(record.expect("the record").output_dropped);
    }
}

mod protocol4_fuzz_findings {
    //! Flaws the protocol-4 fuzz models and the simulated pair found in the agent's session,
    //! each pinned once.

    use super::super::*;
    use super::edges::{agent, client_frame, feed_agent, opening};
    use crate::limits::{MAX_FRAME, MAX_FRAME_BODY};
    use crate::msg::*;
    use crate::ops::{FileHeader, FileSummary, GetRequest, PutRequest, Timestamp, TransferKind};
    use crate::{decode_agent_frame, split_frame, ByteArray, Bytes, DataKind, DATA_HEADROOM};

    const HEADER: FileHeader = FileHeader {
        size: 3,
        mode: 0o100644,
        mtime: Timestamp { secs: 0, nanos: 0 },
        uid: 0,
        gid: 0,
    };

    const PUT: PutRequest<'static> = PutRequest {
        path: Bytes(b"/srv/file"),
        kind: TransferKind::File,
        mode: None,
        owner: None,
        mtime: None,
        size: None,
        create_parents: false,
        no_clobber: false,
        user: None,
    };

    /// The kinds of the frames in `bytes`.
    fn kinds(mut bytes: &[u8]) -> Vec<FrameKind> {
        let mut kinds = Vec::new();
        while let Ok(Some((body, used))) = split_frame(bytes, MAX_FRAME_BODY) {
            kinds.push(FrameKind::of_agent(&decode_agent_frame(body).unwrap()));
            bytes = &bytes[used..];
        }
        kinds
    }

    fn sent(session: &mut AgentSession) -> Vec<FrameKind> {
        let mut out = vec![0u8; MAX_FRAME];
        let n = session.poll_transmit(&mut out).unwrap();
        kinds(&out[..n])
    }

    /// An agent that has taken the opening and `frames`; its hello and proof are sent.
    fn agent_given(frames: &[ClientFrame<'_>]) -> AgentSession {
        let mut session = agent();
        let mut bytes = opening().client;
        for frame in frames {
            bytes.extend(client_frame(*frame));
        }
        feed_agent(&mut session, &bytes).unwrap();
        sent(&mut session);
        session
    }

    /// Stdin consumed after the final frame went out is owed to nobody: no credit follows the
    /// termination record (or a put's summary), which a client refuses as a frame after the end.
    #[test]
    fn no_credit_after_the_final_frame() {
        let mut exec = agent_given(&[
            ClientFrame::Exec(super::edges::EXEC),
            ClientFrame::Stdin(Bytes(b"abc")),
        ]);
        exec.started(7, 0).unwrap();
        assert_eq!(sent(&mut exec), [FrameKind::Started]);
        exec.child_exited(ExitStatus::Code(0), 1).unwrap();
        exec.finish(2).unwrap();
        assert_eq!(sent(&mut exec), [FrameKind::Exited]);
        exec.stdin_consumed(3);
        assert_eq!(sent(&mut exec), []);
        assert!(!exec.has_queued() && exec.is_closed());

        let mut put = agent_given(&[
            ClientFrame::Put(PUT),
            ClientFrame::Stdin(Bytes(b"abc")),
            ClientFrame::PutEnd(ByteArray([0; 32])),
        ]);
        put.file_ready(HEADER, 0).unwrap();
        assert_eq!(sent(&mut put), [FrameKind::FileReady]);
        let summary = FileSummary {
            bytes: 3,
            sha256: ByteArray([0; 32]),
        };
        put.file_done(summary, 1).unwrap();
        assert_eq!(sent(&mut put), [FrameKind::FileDone]);
        put.stdin_consumed(3);
        assert_eq!(sent(&mut put), []);
    }

    /// A command's output, its exit and its record belong to an exec: during a get or a put
    /// the session refuses them (a client would refuse the frames).
    #[test]
    fn output_and_exit_only_for_an_exec() {
        let get = GetRequest {
            path: Bytes(b"/srv/file"),
            kind: TransferKind::File,
            user: None,
        };
        for request in [ClientFrame::Get(get), ClientFrame::Put(PUT)] {
            let mut session = agent_given(&[request]);
            session.file_ready(HEADER, 0).unwrap();
            let mut buf = vec![0u8; DATA_HEADROOM + 3];
            assert_eq!(
                session.frame_output(&mut buf, DataKind::Stdout, 3, 1),
                Err(SessionError::InvalidState)
            );
            let mut out = vec![0u8; MAX_FRAME];
            assert_eq!(
                session.encode_output_dropped(Stream::Stdout, 1, &mut out),
                Err(SessionError::InvalidState)
            );
            assert_eq!(
                session.child_exited(ExitStatus::Code(0), 1),
                Err(SessionError::InvalidState)
            );
            assert_eq!(session.finish(2), Err(SessionError::InvalidState));
        }
    }

    /// A client that goes away before its put's digest abandoned the put: nothing is sent to
    /// it any more, not even a keepalive that fell due just before.
    #[test]
    fn an_abandoned_put_sends_nothing_more() {
        let mut config = AgentConfig::DEFAULT;
        config.limits.keepalive_ms = 1;
        let mut session = super::edges::agent_with(config, Some(super::edges::secret()));
        let bytes = [
            opening_with_config(config),
            client_frame(ClientFrame::Put(PUT)),
        ]
        .concat();
        feed_agent(&mut session, &bytes).unwrap();
        sent(&mut session);
        session.file_ready(HEADER, 0).unwrap();
        assert_eq!(sent(&mut session), [FrameKind::FileReady]);
        session.handle_timeout(5_000).unwrap();
        assert!(session.has_queued(), "a keepalive is due");
        assert!(matches!(
            session.handle_eof(),
            Err(SessionError::Disconnected { .. })
        ));
        assert!(session.is_closed());
        assert!(
            !session.has_queued(),
            "something queued for a client that is gone"
        );
        assert_eq!(sent(&mut session), []);
    }

    fn opening_with_config(config: AgentConfig) -> Vec<u8> {
        super::edges::opening_with(config, Some(super::edges::secret())).client
    }
}
