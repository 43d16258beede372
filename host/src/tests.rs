//! The library against a scripted fake agent: every way a peer can misbehave must end in a typed
//! error, never a hang or a panic. (The real agent is exercised in `host/tests/`.)

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread;
use std::time::{Duration, Instant};

use ferry_wire::limits::{MAX_FRAME, MAX_FRAME_BODY, STDIN_WINDOW};
use ferry_wire::session::{
    encode_refusal, AgentAuth, AgentConfig, AgentEvent, AgentSession, Refusal,
};
use ferry_wire::{
    decode_client_frame, encode_agent_frame, split_frame, AgentFrame, AgentHello, AgentProof,
    Bounds, ByteArray, Bytes, ClientFrame, DoneReport, ErrorCode, ErrorFrame, ExitStatus, Limits,
    ReadyReport, RecvBuf, Started, Termination, MAGIC, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

use crate::target::tests::tempdir::Dir;
use crate::*;

/// The secret the fake agent and its client share (unless a test says otherwise).
fn secret() -> Secret {
    Secret::new(b"the fake agent's secret").unwrap()
}

/// The agent side of one scripted connection. The handshake goes through a real
/// [`AgentSession`] (it computes and checks the proofs); everything after it is written by
/// hand, so a script can misbehave at will.
struct Peer {
    stream: UnixStream,
    recv: RecvBuf<Vec<u8>>,
    /// The secret this fake proves (`None`: an insecure agent).
    secret: Option<Secret>,
}

/// What the client sent, owned.
#[derive(Debug, PartialEq)]
enum Sent {
    Hello,
    Auth,
    Exec(Vec<u8>),
    KillAll,
    Stdin(Vec<u8>),
    StdinEof,
    Signal(u8),
    Resize(u16, u16),
    Cancel(Option<u32>),
    ExecPart(Vec<u8>),
    /// A put request: its path.
    Put(Vec<u8>),
    /// A put's end: its SHA-256.
    PutEnd([u8; 32]),
    /// A get request: its path.
    Get(Vec<u8>),
    /// A frame of the operations beyond exec.
    Other(String),
}

impl Peer {
    fn send(&mut self, frame: AgentFrame<'_>) {
        self.send_together(&[frame]);
    }

    /// `frames`, encoded back to back and sent in one write (so they arrive in one read).
    fn send_together(&mut self, frames: &[AgentFrame<'_>]) {
        let mut bytes = Vec::new();
        for frame in frames {
            let mut out = vec![0u8; MAX_FRAME];
            let n = encode_agent_frame(frame, &mut out).unwrap();
            bytes.extend_from_slice(&out[..n]);
        }
        self.raw(&bytes);
    }

    fn raw(&mut self, bytes: &[u8]) {
        // The client may have hung up already (it refused what came before): not our failure.
        let _ = self.stream.write_all(bytes);
    }

    /// The next whole client frame (header included), read through the same receive buffer
    /// type the library uses; `None` at EOF.
    fn recv_frame(&mut self) -> Option<Vec<u8>> {
        loop {
            let data = self.recv.data();
            if let Some((_, consumed)) = split_frame(data, MAX_FRAME_BODY).unwrap() {
                let frame = data[..consumed].to_vec();
                self.recv.consume(consumed);
                return Some(frame);
            }
            let spare = self.recv.spare().unwrap();
            match self.stream.read(spare) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.recv.commit(n),
            }
        }
    }

    /// The next client frame; `None` at EOF.
    fn recv(&mut self) -> Option<Sent> {
        let frame = self.recv_frame()?;
        Some(sent(&frame))
    }

    /// Sends the agent's hello (the agent speaks first) and takes the client's hello and, when
    /// secure, its proof, through a session that checks it. Returns the session, the agent's
    /// proof queued in it.
    fn greet(&mut self, limits: Limits) -> AgentSession {
        let config = AgentConfig {
            agent_version: "fake",
            limits,
            bounds: Bounds::default(),
            ..AgentConfig::DEFAULT
        };
        let auth = AgentAuth {
            nonce: [7; ferry_wire::limits::NONCE_LEN],
            secret: self.secret.clone(),
        };
        let mut session = AgentSession::new(config, 0, auth);
        self.transmit(&mut session);
        let frame = self.recv_frame().expect("the client's hello");
        let event = session.handle_input(&frame, 0).unwrap().event;
        assert!(matches!(event, Some(AgentEvent::Hello)), "{event:?}");
        if self.secret.is_some() {
            let frame = self.recv_frame().expect("the client's proof");
            let event = session.handle_input(&frame, 0).unwrap().event;
            assert!(
                matches!(event, Some(AgentEvent::Authenticated)),
                "{event:?}"
            );
        }
        session
    }

    /// Sends what `session` has queued.
    fn transmit(&mut self, session: &mut AgentSession) {
        let mut out = vec![0u8; MAX_FRAME];
        let n = session.poll_transmit(&mut out).unwrap();
        self.raw(&out[..n]);
    }

    /// The whole handshake: hellos, both proofs.
    fn hello_with(&mut self, limits: Limits) {
        let mut session = self.greet(limits);
        self.transmit(&mut session);
    }

    fn hello(&mut self) {
        self.hello_with(Limits::CURRENT);
    }

    fn started(&mut self) {
        assert!(matches!(self.recv(), Some(Sent::Exec(_))));
        self.send(AgentFrame::Started(Started { pid: 42 }));
    }

    fn exited(&mut self, code: u8) {
        self.send(AgentFrame::Exited(termination(code)));
    }
}

/// A client frame (header included), owned.
fn sent(frame: &[u8]) -> Sent {
    let (body, _) = split_frame(frame, MAX_FRAME_BODY).unwrap().unwrap();
    match decode_client_frame(body).unwrap() {
        ClientFrame::Hello(_) => Sent::Hello,
        ClientFrame::Auth(_) => Sent::Auth,
        ClientFrame::Exec(exec) => Sent::Exec(exec.argv.as_bytes().to_vec()),
        ClientFrame::KillAll => Sent::KillAll,
        ClientFrame::Stdin(data) => Sent::Stdin(data.0.to_vec()),
        ClientFrame::StdinEof => Sent::StdinEof,
        ClientFrame::Signal(n) => Sent::Signal(n),
        ClientFrame::Resize(size) => Sent::Resize(size.rows, size.cols),
        ClientFrame::Cancel(cancel) => Sent::Cancel(cancel.grace_ms),
        ClientFrame::ExecPart(part) => Sent::ExecPart(part.data.0.to_vec()),
        ClientFrame::Put(put) => Sent::Put(put.path.0.to_vec()),
        ClientFrame::PutEnd(digest) => Sent::PutEnd(digest.0),
        ClientFrame::Get(get) => Sent::Get(get.path.0.to_vec()),
        other => Sent::Other(format!("{other:?}")),
    }
}

fn termination(code: u8) -> Termination {
    Termination {
        status: ExitStatus::Code(code),
        duration_us: 1500,
        output_dropped: false,
        ending: ferry_wire::Ending::Exited,
        tree_kill: ferry_wire::TreeKill::None,
        stdout: ferry_wire::StreamRecord::default(),
        stderr: ferry_wire::StreamRecord::default(),
        pipes_held: false,
        oom_killed: false,
        peak_memory: 0,
    }
}

/// An agent hello written by hand (a second one, or a broken one).
fn hand_hello(magic: [u8; 4], version: u16) -> AgentFrame<'static> {
    AgentFrame::Hello(AgentHello {
        magic,
        // A version from the future is all the agent speaks.
        min_version: if version > PROTOCOL_VERSION {
            version
        } else {
            MIN_PROTOCOL_VERSION
        },
        version,
        agent_version: "x",
        limits: Limits::CURRENT,
        nonce: ByteArray([1; ferry_wire::limits::NONCE_LEN]),
        security: Security::Authenticated,
        bounds: Bounds::default(),
    })
}

fn agent_hello() -> AgentFrame<'static> {
    hand_hello(MAGIC, PROTOCOL_VERSION)
}

fn options(secret: Option<Secret>) -> ConnectOptions {
    ConnectOptions {
        connect_timeout: Duration::from_millis(500),
        secret,
        ..ConnectOptions::default()
    }
}

/// Serves one connection with `script` (as a secure agent); returns a client for it (with the
/// secret) and the fake's thread.
fn fake(script: impl FnOnce(&mut Peer) + Send + 'static) -> (Client, Dir, thread::JoinHandle<()>) {
    fake_with(Some(secret()), options(Some(secret())), script)
}

/// [`fake`] with the fake's secret (`None`: insecure) and the client's options chosen.
fn fake_with(
    agent_secret: Option<Secret>,
    options: ConnectOptions,
    script: impl FnOnce(&mut Peer) + Send + 'static,
) -> (Client, Dir, thread::JoinHandle<()>) {
    let (target, dir, handle) = serve(agent_secret, script);
    (Client::new(&target, options), dir, handle)
}

/// The fake agent's socket and thread.
fn serve(
    secret: Option<Secret>,
    script: impl FnOnce(&mut Peer) + Send + 'static,
) -> (Target, Dir, thread::JoinHandle<()>) {
    let dir = Dir::new("fake-agent");
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let handle = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        // A client that never sends what the script waits for fails the test instead of
        // hanging it.
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut peer = Peer {
            stream,
            // Sized like the agent's: one largest frame.
            recv: RecvBuf::new(vec![0u8; MAX_FRAME]),
            secret,
        };
        script(&mut peer);
    });
    (Target::Unix(path), dir, handle)
}

fn run(script: impl FnOnce(&mut Peer) + Send + 'static) -> Result<Output, Error> {
    run_command(&Command::new("x"), script)
}

fn run_command(
    command: &Command,
    script: impl FnOnce(&mut Peer) + Send + 'static,
) -> Result<Output, Error> {
    let (client, _dir, handle) = fake(script);
    let result = client.output(command);
    handle.join().unwrap();
    result
}

#[test]
fn collects_output_in_order_with_the_termination_record() {
    let output = run(|peer| {
        peer.hello();
        peer.started();
        peer.send(AgentFrame::Stdout(ferry_wire::Output {
            at_us: 0,
            data: Bytes(b"a\0"),
        }));
        peer.send(AgentFrame::Stderr(ferry_wire::Output {
            at_us: 0,
            data: Bytes(b"e"),
        }));
        peer.send(AgentFrame::Stdout(ferry_wire::Output {
            at_us: 0,
            data: Bytes(b"\xffb"),
        }));
        peer.exited(7);
    })
    .unwrap();
    assert_eq!(output.stdout, b"a\0\xffb");
    assert_eq!(output.stderr, b"e");
    assert_eq!(output.status, ExitStatus::Code(7));
    assert_eq!(output.duration, Duration::from_micros(1500));
    assert_eq!(output.pid, 42);
}

/// `output()` of a command with a stdin pipe nobody can write to (the execution is consumed):
/// the pipe is closed, so a command that reads to EOF ends instead of waiting forever.
#[test]
fn collecting_closes_a_stdin_pipe_nobody_took() {
    let mut command = Command::new("cat");
    command.stdin(Stdin::Pipe);
    let output = run_command(&command, |peer| {
        peer.hello();
        peer.started();
        assert_eq!(peer.recv(), Some(Sent::StdinEof));
        peer.exited(0);
    })
    .unwrap();
    assert_eq!(output.status, ExitStatus::Code(0));
}

#[test]
fn hello_proof_and_exec_go_out_in_one_write_and_the_answers_may_come_in_one() {
    let output = run(|peer| {
        let config = AgentConfig {
            agent_version: "fake",
            ..AgentConfig::DEFAULT
        };
        let auth = AgentAuth {
            nonce: [9; ferry_wire::limits::NONCE_LEN],
            secret: peer.secret.clone(),
        };
        let mut session = AgentSession::new(config, 0, auth);
        peer.transmit(&mut session);
        // All three frames are in the first read: the client waited for our hello, then sent
        // its hello, its proof and the request together.
        let mut first = vec![0u8; MAX_FRAME];
        let n = peer.stream.read(&mut first).unwrap();
        let mut input = &first[..n];
        let mut kinds = Vec::new();
        while !input.is_empty() {
            let (_, len) = split_frame(input, MAX_FRAME_BODY).unwrap().unwrap();
            kinds.push(sent(&input[..len]));
            let step = session.handle_input(input, 0).unwrap();
            if let Some(AgentEvent::Exec(_)) = step.event {
                session.started(7, 0).unwrap();
            }
            input = &input[step.consumed..];
        }
        assert_eq!(kinds[..2], [Sent::Hello, Sent::Auth]);
        assert!(matches!(kinds[2], Sent::Exec(_)), "{kinds:?}");
        assert_eq!(kinds.len(), 3);
        // The proof and `Started` from the session, the rest by hand: one write.
        let mut bytes = vec![0u8; MAX_FRAME];
        let n = session.poll_transmit(&mut bytes).unwrap();
        bytes.truncate(n);
        for frame in [
            AgentFrame::Stdout(ferry_wire::Output {
                at_us: 0,
                data: Bytes(b"out"),
            }),
            AgentFrame::Exited(termination(0)),
        ] {
            let mut out = vec![0u8; MAX_FRAME];
            let n = encode_agent_frame(&frame, &mut out).unwrap();
            bytes.extend_from_slice(&out[..n]);
        }
        peer.raw(&bytes);
    })
    .unwrap();
    assert_eq!((output.pid, &output.stdout[..]), (7, &b"out"[..]));
}

#[test]
fn start_failures_are_remote_errors_with_errno() {
    let err = run(|peer| {
        peer.hello();
        assert!(matches!(peer.recv(), Some(Sent::Exec(_))));
        peer.send(AgentFrame::Error(ErrorFrame {
            code: ErrorCode::NotFound,
            errno: 2,
            message: "no such program",
        }));
    })
    .unwrap_err();
    match err {
        Error::Remote(remote) => {
            assert_eq!(remote.code, ErrorCode::NotFound);
            assert_eq!(remote.errno, Some(2));
            assert_eq!(
                remote.to_string(),
                "no such file or directory: no such program (ENOENT)"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_agents_refusal_of_the_version_or_the_limits_is_typed() {
    let err = run(|peer| {
        peer.send(agent_hello());
        peer.recv();
        peer.send(AgentFrame::Error(ErrorFrame {
            code: ErrorCode::UnsupportedVersion,
            errno: 0,
            message: "speaks 7..=9",
        }));
    })
    .unwrap_err();
    match err {
        Error::UnsupportedVersion { message, .. } => assert_eq!(message, "speaks 7..=9"),
        other => panic!("{other:?}"),
    }
    // An agent with tighter limits than ours: the pipelined request reaches it, and it says no.
    let err = run(|peer| {
        peer.hello_with(Limits {
            max_args: 1,
            ..Limits::CURRENT
        });
        assert!(matches!(peer.recv(), Some(Sent::Exec(_))));
        peer.send(AgentFrame::Error(ErrorFrame {
            code: ErrorCode::LimitExceeded,
            errno: 0,
            message: "",
        }));
    })
    .unwrap_err();
    assert_eq!(err.remote_code(), Some(ErrorCode::LimitExceeded), "{err:?}");
}

#[test]
fn misbehaving_agents_give_typed_errors_not_hangs() {
    type Script = fn(&mut Peer);
    let cases: [(&str, Script); 21] = [
        ("oversized frame", |p| {
            p.raw(&(MAX_FRAME_BODY as u32 + 1).to_le_bytes());
        }),
        ("garbage body", |p| {
            p.raw(&[3, 0, 0, 0, 0xff, 0xff, 0xff]);
        }),
        ("wrong magic", |p| {
            p.send(hand_hello(*b"NOPE", PROTOCOL_VERSION));
        }),
        ("version from the future", |p| {
            p.send(hand_hello(MAGIC, 99));
        }),
        ("started before the hello", |p| {
            p.send(AgentFrame::Started(Started { pid: 1 }));
        }),
        ("a proof before the hello", |p| {
            p.send(AgentFrame::Authenticated(AgentProof {
                mac: ByteArray([0; 32]),
            }));
        }),
        ("a readiness report", |p| {
            p.send(AgentFrame::Ready(ReadyReport {
                cid: 3,
                init_started_us: 0,
                modules_us: 0,
                listening_us: 0,
                module_times: ferry_wire::StrList::new(b""),
            }));
        }),
        ("started before the proof", |p| {
            p.greet(Limits::CURRENT);
            p.recv();
            p.send(AgentFrame::Started(Started { pid: 1 }));
        }),
        ("output before started", |p| {
            p.hello();
            p.recv();
            p.send(AgentFrame::Stdout(ferry_wire::Output {
                at_us: 0,
                data: Bytes(b"x"),
            }));
        }),
        ("exited before started", |p| {
            p.hello();
            p.recv();
            p.exited(0);
        }),
        ("a done record for an exec", |p| {
            p.hello();
            p.recv();
            p.send(AgentFrame::Done(DoneReport { count: 1 }));
        }),
        ("credit never lent", |p| {
            p.hello();
            p.started();
            p.send(AgentFrame::StdinCredit(1));
        }),
        ("second hello", |p| {
            p.hello();
            p.started();
            p.send(agent_hello());
        }),
        ("second started", |p| {
            p.hello();
            p.started();
            p.send(AgentFrame::Started(Started { pid: 43 }));
        }),
        ("data after exited", |p| {
            p.hello();
            p.started();
            p.send_together(&[
                AgentFrame::Exited(termination(0)),
                AgentFrame::Stdout(ferry_wire::Output {
                    at_us: 0,
                    data: Bytes(b"late"),
                }),
            ]);
        }),
        ("eof mid-frame", |p| {
            p.hello();
            p.started();
            p.raw(&[10, 0, 0, 0, 2]);
        }),
        ("eof mid-header", |p| {
            p.hello();
            p.started();
            p.raw(&[10, 0]);
        }),
        ("eof mid-frame during the hello", |p| {
            p.raw(&[10, 0, 0, 0, 2]);
        }),
        ("silence", |_| {
            thread::sleep(Duration::from_millis(800));
        }),
        ("silence after the hello", |p| {
            p.greet(Limits::CURRENT);
            thread::sleep(Duration::from_millis(800));
        }),
        ("a trickle that never finishes the hello", |_p| {
            // One byte every 100 ms: each read makes progress, the deadline still holds.
            for byte in [20u8, 0, 0, 0, 1, 2, 3, 4, 5, 6] {
                _p.raw(&[byte]);
                thread::sleep(Duration::from_millis(100));
            }
        }),
    ];
    for (name, script) in cases {
        let started = Instant::now();
        let err = run(script).unwrap_err();
        match (name, &err) {
            ("version from the future", Error::UnsupportedVersion { .. }) => {}
            (
                "silence" | "silence after the hello" | "a trickle that never finishes the hello",
                Error::Io(io),
            ) => {
                assert_eq!(io.kind(), std::io::ErrorKind::TimedOut, "{name}");
                assert_eq!(io.to_string(), "the agent did not answer in time");
            }
            (_, Error::Protocol(_)) => {}
            _ => panic!("{name}: {err:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{name}: too slow"
        );
    }
}

#[test]
fn disconnects_are_reported_with_the_phase() {
    for (script, phase) in [
        ((|_: &mut Peer| {}) as fn(&mut Peer), "during the hello"),
        (
            // Our hello, proof and request are out: the operation is starting.
            |peer| {
                peer.greet(Limits::CURRENT);
            },
            "before the command started",
        ),
        (
            |peer| {
                peer.hello();
                peer.recv();
            },
            "before the command started",
        ),
        (
            |peer| {
                peer.hello();
                peer.started();
            },
            "while the command was running",
        ),
    ] {
        let err = run(script).unwrap_err();
        match err {
            Error::Disconnected(during) => assert_eq!(during, phase),
            other => panic!("{phase}: {other:?}"),
        }
    }
}

#[test]
fn a_health_check_is_the_handshake_and_nothing_else() {
    let (client, _dir, handle) = fake(|peer| {
        peer.hello();
        assert_eq!(
            peer.recv(),
            None,
            "the client sent more than its hello and proof"
        );
    });
    let health = client.health().unwrap();
    assert_eq!(health.info.agent_version, "fake");
    assert_eq!(health.info.limits, Limits::CURRENT);
    assert_eq!(health.info.security, Security::Authenticated);
    handle.join().unwrap();
}

#[test]
fn a_health_check_of_an_insecure_agent_is_two_hellos() {
    let (client, _dir, handle) = fake_with(None, options(None), |peer| {
        peer.hello();
        assert_eq!(peer.recv(), None, "the client sent more than its hello");
    });
    let health = client.health().unwrap();
    assert_eq!(health.info.security, Security::Insecure);
    handle.join().unwrap();
}

#[test]
fn a_health_check_waits_for_the_agents_proof() {
    let (client, _dir, handle) = fake(|peer| {
        peer.greet(Limits::CURRENT);
        // No proof: the client must not call the agent healthy.
        assert_eq!(peer.recv(), None);
    });
    let err = client.health().unwrap_err();
    assert!(
        matches!(&err, Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut),
        "{err:?}"
    );
    handle.join().unwrap();
}

#[test]
fn kill_all_reports_how_many_processes_were_signalled() {
    let (client, _dir, handle) = fake(|peer| {
        peer.hello();
        assert_eq!(peer.recv(), Some(Sent::KillAll));
        peer.send(AgentFrame::Done(DoneReport { count: 5 }));
    });
    assert_eq!(client.kill_all().unwrap(), 5);
    handle.join().unwrap();
}

/// The authentication failures a client must tell apart, each from one scripted agent: the
/// blocking client's error, and the async one's (feature `tokio`) for the same script.
fn auth_failure(
    agent_secret: Option<Secret>,
    client_secret: Option<Secret>,
    script: fn(&mut Peer),
) -> Vec<Error> {
    let mut errors = Vec::new();
    let (client, _dir, handle) =
        fake_with(agent_secret.clone(), options(client_secret.clone()), script);
    errors.push(client.health().unwrap_err());
    handle.join().unwrap();
    #[cfg(feature = "tokio")]
    {
        let (target, _dir, handle) = serve(agent_secret, script);
        let client = crate::tokio::Client::new(&target, options(client_secret));
        let runtime = ::tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        errors.push(runtime.block_on(client.health()).unwrap_err());
        handle.join().unwrap();
    }
    errors
}

#[test]
fn a_wrong_proof_from_the_agent_is_unauthenticated() {
    for err in auth_failure(Some(secret()), Some(secret()), |peer| {
        peer.greet(Limits::CURRENT);
        peer.send(AgentFrame::Authenticated(AgentProof {
            mac: ByteArray([0x5a; 32]),
        }));
        // The client hangs up without a word more.
        assert_eq!(peer.recv(), None);
    }) {
        assert!(matches!(err, Error::Unauthenticated(_)), "{err:?}");
    }
}

#[test]
fn an_agent_with_another_secret_is_unauthenticated() {
    // The agent's session refuses our proof: `ErrorCode::Unauthenticated`.
    let theirs = Secret::new(b"somebody else's secret").unwrap();
    for err in auth_failure(Some(theirs), Some(secret()), |peer| {
        let config = AgentConfig::DEFAULT;
        let auth = AgentAuth {
            nonce: [3; ferry_wire::limits::NONCE_LEN],
            secret: peer.secret.clone(),
        };
        let mut session = AgentSession::new(config, 0, auth);
        peer.transmit(&mut session);
        let hello = peer.recv_frame().unwrap();
        session.handle_input(&hello, 0).unwrap();
        let proof = peer.recv_frame().unwrap();
        let refused = session.handle_input(&proof, 0).unwrap_err();
        assert_eq!(refused, ferry_wire::session::SessionError::Unauthenticated);
        peer.transmit(&mut session);
    }) {
        assert!(matches!(err, Error::Unauthenticated(_)), "{err:?}");
    }
}

#[test]
fn an_insecure_agent_is_refused_by_a_client_with_a_secret() {
    for err in auth_failure(None, Some(secret()), |peer| {
        let mut session = AgentSession::new(
            AgentConfig::DEFAULT,
            0,
            AgentAuth {
                nonce: [4; ferry_wire::limits::NONCE_LEN],
                secret: None,
            },
        );
        peer.transmit(&mut session);
        // Nothing is sent to it: not even a hello.
        assert_eq!(peer.recv(), None);
    }) {
        assert!(matches!(err, Error::AgentInsecure), "{err:?}");
    }
}

#[test]
fn a_secure_agent_needs_a_secret() {
    for err in auth_failure(Some(secret()), None, |peer| {
        let mut session = AgentSession::new(
            AgentConfig::DEFAULT,
            0,
            AgentAuth {
                nonce: [5; ferry_wire::limits::NONCE_LEN],
                secret: peer.secret.clone(),
            },
        );
        peer.transmit(&mut session);
        assert_eq!(peer.recv(), None);
    }) {
        assert!(matches!(err, Error::SecretRequired), "{err:?}");
    }
}

#[test]
fn a_busy_agent_refuses_before_any_hello() {
    for err in auth_failure(Some(secret()), Some(secret()), |peer| {
        let mut out = [0u8; 256];
        let refusal = Refusal::new(ErrorCode::Busy, "too many connections");
        let n = encode_refusal(&refusal, &mut out).unwrap();
        peer.raw(&out[..n]);
    }) {
        match err {
            Error::Remote(remote) => {
                assert_eq!(remote.code, ErrorCode::Busy);
                assert!(remote.message.contains("too many"), "{remote:?}");
            }
            other => panic!("{other:?}"),
        }
    }
}

/// Feeds `data` as `Stdin::Bytes` to a fake that checks the credit the client keeps to and
/// grants `window` back in two uneven parts.
fn feed_within(window: usize, data: Vec<u8>) {
    let expected = data.clone();
    let (client, _dir, handle) = fake(move |peer| {
        peer.hello_with(Limits {
            stdin_window: window as u32,
            ..Limits::CURRENT
        });
        peer.started();
        let mut got = Vec::new();
        let mut outstanding = 0usize;
        loop {
            match peer.recv() {
                Some(Sent::Stdin(chunk)) => {
                    outstanding += chunk.len();
                    assert!(outstanding <= window, "client exceeded its credit");
                    got.extend_from_slice(&chunk);
                    if outstanding == window {
                        peer.send(AgentFrame::StdinCredit(1000));
                        peer.send(AgentFrame::StdinCredit(window as u32 - 1000));
                        outstanding = 0;
                    }
                }
                Some(Sent::StdinEof) => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got, expected);
        peer.exited(0);
    });
    let mut command = Command::new("cat");
    command.stdin(Stdin::Bytes(data));
    let output = client.output(&command).unwrap();
    assert!(output.success());
    handle.join().unwrap();
}

#[test]
fn stdin_bytes_are_fed_within_credit_then_eof() {
    feed_within(
        STDIN_WINDOW,
        (0..STDIN_WINDOW * 3).map(|i| (i % 251) as u8).collect(),
    );
}

#[test]
fn a_smaller_window_announced_by_the_agent_is_kept_to() {
    feed_within(4000, (0..10_000).map(|i| (i % 13) as u8).collect());
}

#[test]
fn credit_returned_beyond_what_was_sent_is_a_protocol_error() {
    let mut command = Command::new("cat");
    command.stdin(Stdin::Bytes(b"abc".to_vec()));
    let err = run_command(&command, |peer| {
        peer.hello();
        peer.started();
        assert_eq!(peer.recv(), Some(Sent::Stdin(b"abc".to_vec())));
        assert_eq!(peer.recv(), Some(Sent::StdinEof));
        peer.send(AgentFrame::StdinCredit(4));
    })
    .unwrap_err();
    assert!(matches!(err, Error::Protocol(_)), "{err:?}");
}

#[test]
fn a_stdin_writer_blocks_for_credit_and_fails_once_the_command_ended() {
    let (client, _dir, handle) = fake(|peer| {
        peer.hello();
        peer.started();
        let mut received = 0;
        while received < STDIN_WINDOW {
            match peer.recv() {
                Some(Sent::Stdin(chunk)) => received += chunk.len(),
                other => panic!("{other:?}"),
            }
        }
        // No credit back: the writer must now be blocked, until the command ends.
        thread::sleep(Duration::from_millis(100));
        peer.exited(0);
        // Keep the connection open until the client is done.
        while peer.recv().is_some() {}
    });
    let mut command = Command::new("cat");
    command.stdin(Stdin::Pipe);
    let mut execution = client.spawn(&command).unwrap();
    let mut writer = execution.take_stdin().unwrap();
    assert!(execution.take_stdin().is_none());
    let writer_thread = thread::spawn(move || {
        let chunk = vec![b'x'; 4096];
        loop {
            if let Err(err) = writer.write_all(&chunk) {
                return err.kind();
            }
        }
    });
    let Some(Event::Exited(end)) = execution.next_event().unwrap() else {
        panic!("expected the termination record");
    };
    assert!(end.success());
    assert_eq!(
        writer_thread.join().unwrap(),
        std::io::ErrorKind::BrokenPipe
    );
    assert!(execution.next_event().unwrap().is_none());
    drop(execution);
    handle.join().unwrap();
}

#[test]
fn a_writer_is_woken_by_credit_from_the_reading_thread() {
    let total = STDIN_WINDOW * 2 + 17;
    let (client, _dir, handle) = fake(move |peer| {
        peer.hello();
        peer.started();
        let mut received = 0;
        loop {
            match peer.recv() {
                Some(Sent::Stdin(chunk)) => {
                    received += chunk.len();
                    peer.send(AgentFrame::StdinCredit(chunk.len() as u32));
                }
                Some(Sent::StdinEof) => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(received, total);
        peer.exited(0);
    });
    let mut command = Command::new("cat");
    command.stdin(Stdin::Pipe);
    let mut execution = client.spawn(&command).unwrap();
    let mut writer = execution.take_stdin().unwrap();
    // Moved to another thread before any event was read: the writer waits, it does not refuse.
    let reader = thread::spawn(move || execution.collect());
    writer.write_all(&vec![b'y'; total]).unwrap();
    writer.close().unwrap();
    assert!(reader.join().unwrap().unwrap().success());
    handle.join().unwrap();
}

#[test]
fn writing_stdin_from_the_reading_thread_without_credit_fails_instead_of_hanging() {
    let (client, _dir, handle) = fake(|peer| {
        peer.hello();
        peer.started();
        peer.send(AgentFrame::Stdout(ferry_wire::Output {
            at_us: 0,
            data: Bytes(b"go"),
        }));
        // Take the window's worth, grant nothing; the client must give up, not hang.
        while peer.recv().is_some() {}
    });
    let mut command = Command::new("cat");
    command.stdin(Stdin::Pipe);
    let mut execution = client.spawn(&command).unwrap();
    let mut writer = execution.take_stdin().unwrap();
    let result = execution.pump(|_, _| writer.write_all(&vec![b'z'; STDIN_WINDOW + 1]));
    match result {
        Err(PumpError::Sink(err)) => assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock),
        other => panic!("{other:?}"),
    }
    drop(writer);
    handle.join().unwrap();
}

#[test]
fn dropping_an_execution_disconnects() {
    let (client, _dir, handle) = fake(|peer| {
        peer.hello();
        peer.started();
        // The client hangs up: recv sees EOF rather than blocking forever.
        assert_eq!(peer.recv(), None);
    });
    let execution = client.spawn(&Command::new("sleep")).unwrap();
    assert_eq!(execution.pid(), 42);
    drop(execution);
    handle.join().unwrap();
}

#[test]
fn dropping_an_execution_fails_a_waiting_writer() {
    let (client, _dir, handle) = fake(|peer| {
        peer.hello();
        peer.started();
        while peer.recv().is_some() {}
    });
    let mut command = Command::new("cat");
    command.stdin(Stdin::Pipe);
    let mut execution = client.spawn(&command).unwrap();
    let mut writer = execution.take_stdin().unwrap();
    let writer_thread = thread::spawn(move || writer.write_all(&vec![0u8; STDIN_WINDOW * 2]));
    thread::sleep(Duration::from_millis(100));
    drop(execution);
    let err = writer_thread.join().unwrap().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
    handle.join().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Protocol 3: controls, liveness, caps, timestamps, requests in pieces.

/// Limits whose keepalive interval is short, so liveness is tested in fractions of a second.
fn quick_keepalive() -> Limits {
    Limits {
        keepalive_ms: 100,
        ..Limits::CURRENT
    }
}

fn output_frame(at_us: u64, data: &[u8]) -> AgentFrame<'_> {
    AgentFrame::Stdout(ferry_wire::Output {
        at_us,
        data: Bytes(data),
    })
}

/// Runs `each` with a blocking execution of `command` against a fake agent playing `script`.
fn blocking_driver(command: &Command, script: fn(&mut Peer), each: impl FnOnce(Execution)) {
    let (client, _dir, handle) = fake(script);
    each(client.spawn(command).unwrap());
    handle.join().unwrap();
}

/// The future an async test body returns.
#[cfg(feature = "tokio")]
type Body = std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

/// [`blocking_driver`] for the async API.
#[cfg(feature = "tokio")]
fn async_driver(
    command: &Command,
    script: fn(&mut Peer),
    each: impl FnOnce(crate::tokio::Execution) -> Body,
) {
    let (target, _dir, handle) = serve(Some(secret()), script);
    let client = crate::tokio::Client::new(&target, options(Some(secret())));
    let runtime = ::tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let execution = client.spawn(command).await.unwrap();
        each(execution).await;
    });
    handle.join().unwrap();
}

/// Signal, resize and cancel go out as frames while the command runs, in order, from a handle
/// on another thread; after the end they do nothing and succeed.
#[test]
fn controls_reach_the_agent_and_do_nothing_after_the_end() {
    fn script(peer: &mut Peer) {
        peer.hello();
        peer.started();
        assert_eq!(peer.recv(), Some(Sent::Signal(15)));
        assert_eq!(peer.recv(), Some(Sent::Resize(50, 132)));
        assert_eq!(peer.recv(), Some(Sent::Cancel(Some(1500))));
        assert_eq!(peer.recv(), Some(Sent::Cancel(None)));
        let mut end = termination(0);
        end.status = ExitStatus::Signal {
            number: 15,
            core_dumped: false,
        };
        end.ending = ferry_wire::Ending::Cancelled;
        end.tree_kill = ferry_wire::TreeKill::Cgroup;
        peer.send(AgentFrame::Exited(end));
        // Nothing after the end: the client only hangs up.
        assert_eq!(peer.recv(), None);
    }
    let mut command = Command::new("sh");
    command.pty(WindowSize { rows: 24, cols: 80 });
    let size = WindowSize {
        rows: 50,
        cols: 132,
    };
    blocking_driver(&command, script, |mut execution| {
        let controller = execution.controller();
        thread::spawn(move || {
            controller.signal(15).unwrap();
            controller.resize(size).unwrap();
            controller
                .cancel(Some(Duration::from_micros(1_499_001)))
                .unwrap();
            controller.cancel(None).unwrap();
        })
        .join()
        .unwrap();
        let controller = execution.controller();
        let Some(Event::Exited(end)) = execution.next_event().unwrap() else {
            panic!("no end");
        };
        assert_eq!(end.ending, Ending::Cancelled);
        assert_eq!(end.tree_kill, TreeKill::Cgroup);
        controller.signal(9).unwrap();
        execution.resize(size).unwrap();
        execution.cancel(None).unwrap();
        drop(execution);
        controller.signal(9).unwrap();
    });
    #[cfg(feature = "tokio")]
    async_driver(&command, script, |mut execution| {
        Box::pin(async move {
            let controller = execution.controller();
            controller.signal(15).await.unwrap();
            execution.resize(size).await.unwrap();
            controller
                .cancel(Some(Duration::from_micros(1_499_001)))
                .await
                .unwrap();
            execution.cancel(None).await.unwrap();
            let Some(Event::Exited(end)) = execution.next_event().await.unwrap() else {
                panic!("no end");
            };
            assert_eq!(end.ending, Ending::Cancelled);
            controller.signal(9).await.unwrap();
            drop(execution);
            controller.cancel(None).await.unwrap();
        })
    });
}

/// Refused before anything is sent: a resize without a terminal, signals outside 1–64, a grace
/// the protocol cannot carry.
#[test]
fn invalid_controls_are_refused_locally() {
    fn script(peer: &mut Peer) {
        peer.hello();
        peer.started();
        peer.exited(0);
        assert_eq!(peer.recv(), None, "nothing was sent");
    }
    let command = Command::new("true");
    let too_long = Some(Duration::from_millis(u64::from(u32::MAX) + 1));
    blocking_driver(&command, script, |execution| {
        let size = WindowSize { rows: 1, cols: 1 };
        for result in [
            execution.resize(size),
            execution.signal(0),
            execution.signal(65),
            execution.signal(-1),
            execution.signal(256 + 15),
            execution.cancel(too_long),
        ] {
            assert!(
                matches!(result, Err(Error::InvalidRequest(_))),
                "{result:?}"
            );
        }
        execution.collect().unwrap();
    });
    #[cfg(feature = "tokio")]
    async_driver(&command, script, |execution| {
        Box::pin(async move {
            let size = WindowSize { rows: 1, cols: 1 };
            for result in [
                execution.resize(size).await,
                execution.signal(0).await,
                execution.signal(65).await,
                execution.signal(-1).await,
                execution.cancel(too_long).await,
            ] {
                assert!(
                    matches!(result, Err(Error::InvalidRequest(_))),
                    "{result:?}"
                );
            }
            execution.collect().await.unwrap();
        })
    });
}

/// An agent that stops answering mid-command (a paused VM) ends the execution with
/// `AgentSilent` after three keepalive intervals, not never.
#[test]
fn a_silent_agent_is_agent_silent_after_three_intervals() {
    fn script(peer: &mut Peer) {
        peer.hello_with(quick_keepalive());
        peer.started();
        // Silent, connection open, until the client gives up and hangs up.
        assert_eq!(peer.recv(), None);
    }
    let command = Command::new("sleep");
    blocking_driver(&command, script, |mut execution| {
        let started = Instant::now();
        let err = execution.next_event().unwrap_err();
        assert!(matches!(err, Error::AgentSilent), "{err:?}");
        assert_eq!(err.to_string(), "agent stopped answering");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(250), "{waited:?}");
        assert!(waited < Duration::from_secs(3), "{waited:?}");
    });
    #[cfg(feature = "tokio")]
    async_driver(&command, script, |mut execution| {
        Box::pin(async move {
            let err = execution.next_event().await.unwrap_err();
            assert!(matches!(err, Error::AgentSilent), "{err:?}");
        })
    });
}

/// Keepalives carry a silent command: no output for many intervals is not a silent agent.
#[test]
fn keepalives_keep_a_silent_command_alive() {
    fn script(peer: &mut Peer) {
        peer.hello_with(quick_keepalive());
        peer.started();
        for _ in 0..10 {
            thread::sleep(Duration::from_millis(50));
            peer.send(AgentFrame::Keepalive);
        }
        peer.exited(0);
    }
    let command = Command::new("sleep");
    blocking_driver(&command, script, |execution| {
        assert!(execution.collect().unwrap().success())
    });
    #[cfg(feature = "tokio")]
    async_driver(&command, script, |execution| {
        Box::pin(async move { assert!(execution.collect().await.unwrap().success()) })
    });
}

/// A caller that did not read for longer than the liveness deadline finds the agent's bytes
/// waiting: those are not silence.
#[test]
fn a_slow_reader_is_not_a_silent_agent() {
    fn script(peer: &mut Peer) {
        peer.hello_with(quick_keepalive());
        peer.started();
        // After the client took `Started` alone: these wait in its socket, unread.
        thread::sleep(Duration::from_millis(100));
        peer.send(output_frame(5, b"late"));
        peer.exited(0);
        // Held open until the client has read everything and hung up.
        assert_eq!(peer.recv(), None);
    }
    let command = Command::new("echo");
    blocking_driver(&command, script, |execution| {
        thread::sleep(Duration::from_millis(600));
        let output = execution.collect().unwrap();
        assert_eq!(output.stdout, b"late");
    });
    #[cfg(feature = "tokio")]
    async_driver(&command, script, |execution| {
        Box::pin(async move {
            ::tokio::time::sleep(Duration::from_millis(600)).await;
            let output = execution.collect().await.unwrap();
            assert_eq!(output.stdout, b"late");
        })
    });
}

/// An output cap's notice is counted per stream and marks where the tail begins; each chunk's
/// time is kept; the whole termination record reaches the caller.
#[test]
fn dropped_output_timestamps_and_the_full_record() {
    fn script(peer: &mut Peer) {
        peer.hello();
        peer.started();
        peer.send(output_frame(1_000, b"head"));
        peer.send(AgentFrame::OutputDropped(ferry_wire::Dropped {
            stream: Stream::Stdout,
            bytes: 5,
        }));
        peer.send(output_frame(2_500, b"tail"));
        peer.send(AgentFrame::Exited(Termination {
            stdout: StreamRecord {
                bytes: 13,
                dropped: 5,
            },
            stderr: StreamRecord {
                bytes: 0,
                dropped: 0,
            },
            output_dropped: true,
            ending: Ending::TimedOut,
            tree_kill: TreeKill::ProcessGroup,
            pipes_held: true,
            oom_killed: true,
            peak_memory: 4096,
            ..termination(0)
        }));
    }
    let command = Command::new("x");
    let check_end = |end: crate::Termination| {
        assert!(end.output_dropped && end.pipes_held && end.oom_killed);
        assert_eq!(end.ending, Ending::TimedOut);
        assert_eq!(end.tree_kill, TreeKill::ProcessGroup);
        assert_eq!((end.stdout.bytes, end.stdout.dropped), (13, 5));
        assert_eq!(end.peak_memory, Some(4096));
    };
    blocking_driver(&command, script, |mut execution| {
        assert_eq!(execution.last_output_at(), Duration::ZERO);
        assert_eq!(
            execution.next_event().unwrap(),
            Some(Event::Stdout(b"head"))
        );
        assert_eq!(execution.last_output_at(), Duration::from_millis(1));
        assert_eq!(execution.dropped(Stream::Stdout), 0);
        assert_eq!(
            execution.next_event().unwrap(),
            Some(Event::Stdout(b"tail"))
        );
        assert_eq!(execution.last_output_at(), Duration::from_micros(2_500));
        assert_eq!(execution.dropped(Stream::Stdout), 5);
        assert_eq!(execution.dropped(Stream::Stderr), 0);
        match execution.next_event().unwrap() {
            Some(Event::Exited(end)) => check_end(end),
            other => panic!("{other:?}"),
        }
    });
    #[cfg(feature = "tokio")]
    async_driver(&command, script, |mut execution| {
        Box::pin(async move {
            assert_eq!(
                execution.next_event().await.unwrap(),
                Some(Event::Stdout(b"head"))
            );
            assert_eq!(execution.last_output_at(), Duration::from_millis(1));
            assert_eq!(execution.dropped(Stream::Stdout), 0);
            assert_eq!(
                execution.next_event().await.unwrap(),
                Some(Event::Stdout(b"tail"))
            );
            assert_eq!(execution.dropped(Stream::Stdout), 5);
            match execution.next_event().await.unwrap() {
                Some(Event::Exited(end)) => check_end(end),
                other => panic!("{other:?}"),
            }
        })
    });
    // `Output` carries the record too.
    let output = run(script).unwrap();
    check_end(output.termination);
    assert_eq!(output.stdout, b"headtail");
}

/// A request larger than one frame goes as pieces, then the exec frame, all behind the hello
/// and proof in one write; the agent gets back exactly the lists.
#[test]
fn large_argv_and_env_travel_in_pieces() {
    use ferry_wire::limits::{MAX_ARG_LEN, MAX_INLINE_LIST};
    let mut command = Command::new("printf");
    command.arg("%s\n");
    command.args((0..20_000).map(|i| format!("{i:019}")));
    command.arg("x".repeat(MAX_ARG_LEN - 1));
    command.env("BIG", "e".repeat(100 * 1024));
    let request = command.request().unwrap();
    let (argv, env) = (
        request.argv.as_bytes().to_vec(),
        request.env.as_bytes().to_vec(),
    );
    let (client, _dir, handle) = fake(move |peer| {
        peer.hello();
        let (mut got_argv, mut got_env) = (Vec::new(), Vec::new());
        loop {
            let frame = peer.recv_frame().unwrap();
            let (body, _) = split_frame(&frame, MAX_FRAME_BODY).unwrap().unwrap();
            match decode_client_frame(body).unwrap() {
                ClientFrame::ExecPart(part) => match part.list {
                    ferry_wire::ListKind::Argv => got_argv.extend_from_slice(part.data.0),
                    ferry_wire::ListKind::Env => got_env.extend_from_slice(part.data.0),
                },
                ClientFrame::Exec(exec) => {
                    assert!(exec.argv.as_bytes().len() <= MAX_INLINE_LIST);
                    got_argv.extend_from_slice(exec.argv.as_bytes());
                    got_env.extend_from_slice(exec.env.as_bytes());
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(got_argv == argv, "argv differs");
        assert!(got_env == env, "env differs");
        peer.send(AgentFrame::Started(Started { pid: 42 }));
        peer.exited(0);
    });
    assert!(client.output(&command).unwrap().success());
    handle.join().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Protocol 4: file transfer.
mod transfers;
