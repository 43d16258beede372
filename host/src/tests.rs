//! The library against a scripted fake agent: every way a peer can misbehave must end in a typed
//! error, never a hang or a panic. (The real agent is exercised in `host/tests/`.)

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread;
use std::time::{Duration, Instant};

use ferry_wire::limits::{MAX_FRAME, MAX_FRAME_BODY, STDIN_WINDOW};
use ferry_wire::{
    decode_client_frame, encode_agent_frame, AgentFrame, AgentHello, Bytes, ClientFrame, ErrorCode,
    ErrorFrame, ExitStatus, Limits, ReadyReport, RecvBuf, Started, Termination, MAGIC,
};

use crate::target::tests::tempdir::Dir;
use crate::*;

/// The agent side of one scripted connection.
struct Peer {
    stream: UnixStream,
    recv: RecvBuf<Vec<u8>>,
}

/// What the client sent, owned.
#[derive(Debug, PartialEq)]
enum Sent {
    Hello,
    Exec(Vec<u8>),
    Stdin(Vec<u8>),
    StdinEof,
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

    /// The next client frame, read through the same receive buffer type the library uses;
    /// `None` at EOF.
    fn recv(&mut self) -> Option<Sent> {
        loop {
            if let Some(body) = self.recv.next_frame().unwrap() {
                return Some(match decode_client_frame(body).unwrap() {
                    ClientFrame::Hello(_) => Sent::Hello,
                    ClientFrame::Exec(exec) => Sent::Exec(exec.argv.as_bytes().to_vec()),
                    ClientFrame::Stdin(data) => Sent::Stdin(data.0.to_vec()),
                    ClientFrame::StdinEof => Sent::StdinEof,
                });
            }
            let spare = self.recv.spare().unwrap();
            match self.stream.read(spare) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.recv.commit(n),
            }
        }
    }

    fn hello_with(&mut self, limits: Limits) {
        assert_eq!(self.recv(), Some(Sent::Hello));
        self.send(AgentFrame::Hello(AgentHello {
            magic: MAGIC,
            version: 1,
            agent_version: "fake",
            limits,
        }));
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

fn termination(code: u8) -> Termination {
    Termination {
        status: ExitStatus::Code(code),
        duration_us: 1500,
        output_dropped: false,
    }
}

fn agent_hello() -> AgentFrame<'static> {
    AgentFrame::Hello(AgentHello {
        magic: MAGIC,
        version: 1,
        agent_version: "x",
        limits: Limits::CURRENT,
    })
}

/// Serves one connection with `script`; returns a client for it and the fake's thread.
fn fake(script: impl FnOnce(&mut Peer) + Send + 'static) -> (Client, Dir, thread::JoinHandle<()>) {
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
        };
        script(&mut peer);
    });
    let options = ConnectOptions {
        connect_timeout: Duration::from_millis(500),
        ..ConnectOptions::default()
    };
    (Client::new(&Target::Unix(path), options), dir, handle)
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
        peer.send(AgentFrame::Stdout(Bytes(b"a\0")));
        peer.send(AgentFrame::Stderr(Bytes(b"e")));
        peer.send(AgentFrame::Stdout(Bytes(b"\xffb")));
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
fn hello_and_exec_go_out_in_one_write_and_the_answers_may_come_in_one() {
    let output = run(|peer| {
        // Both frames are in the first read: the client did not wait for our hello.
        let mut first = vec![0u8; MAX_FRAME];
        let n = peer.stream.read(&mut first).unwrap();
        let mut recv = RecvBuf::new(&mut first[..n]);
        recv.commit(n);
        let mut kinds = Vec::new();
        while let Some(body) = recv.next_frame().unwrap() {
            kinds.push(match decode_client_frame(body).unwrap() {
                ClientFrame::Hello(_) => "hello",
                ClientFrame::Exec(_) => "exec",
                _ => "other",
            });
        }
        assert_eq!(kinds, ["hello", "exec"]);
        peer.send_together(&[
            agent_hello(),
            AgentFrame::Started(Started { pid: 7 }),
            AgentFrame::Stdout(Bytes(b"out")),
            AgentFrame::Exited(termination(0)),
        ]);
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
    let cases: [(&str, Script); 17] = [
        ("oversized frame", |p| {
            p.recv();
            p.raw(&(MAX_FRAME_BODY as u32 + 1).to_le_bytes());
        }),
        ("garbage body", |p| {
            p.recv();
            p.raw(&[3, 0, 0, 0, 0xff, 0xff, 0xff]);
        }),
        ("wrong magic", |p| {
            p.recv();
            p.send(AgentFrame::Hello(AgentHello {
                magic: *b"NOPE",
                version: 1,
                agent_version: "x",
                limits: Limits::CURRENT,
            }));
        }),
        ("version from the future", |p| {
            p.recv();
            p.send(AgentFrame::Hello(AgentHello {
                magic: MAGIC,
                version: 99,
                agent_version: "x",
                limits: Limits::CURRENT,
            }));
        }),
        ("started before the hello", |p| {
            p.recv();
            p.send(AgentFrame::Started(Started { pid: 1 }));
        }),
        ("a readiness report", |p| {
            p.recv();
            p.send(AgentFrame::Ready(ReadyReport {
                cid: 3,
                init_started_us: 0,
                modules_us: 0,
                listening_us: 0,
            }));
        }),
        ("output before started", |p| {
            p.hello();
            p.recv();
            p.send(AgentFrame::Stdout(Bytes(b"x")));
        }),
        ("exited before started", |p| {
            p.hello();
            p.recv();
            p.exited(0);
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
                AgentFrame::Stdout(Bytes(b"late")),
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
            p.recv();
            p.raw(&[10, 0, 0, 0, 2]);
        }),
        ("silence", |p| {
            p.recv();
            thread::sleep(Duration::from_millis(800));
        }),
        ("a trickle that never finishes the hello", |p| {
            p.recv();
            // One byte every 100 ms: each read makes progress, the deadline still holds.
            for byte in [20u8, 0, 0, 0, 1, 2, 3, 4, 5, 6] {
                p.raw(&[byte]);
                thread::sleep(Duration::from_millis(100));
            }
        }),
    ];
    for (name, script) in cases {
        let started = Instant::now();
        let err = run(script).unwrap_err();
        match (name, &err) {
            ("version from the future", Error::UnsupportedVersion { .. }) => {}
            ("silence" | "a trickle that never finishes the hello", Error::Io(io)) => {
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
        (
            (|peer: &mut Peer| {
                peer.recv();
            }) as fn(&mut Peer),
            "during the hello",
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
fn a_health_check_is_a_hello_and_nothing_else() {
    let (client, _dir, handle) = fake(|peer| {
        peer.hello();
        assert_eq!(peer.recv(), None, "the client sent more than its hello");
    });
    let health = client.health().unwrap();
    assert_eq!(health.info.agent_version, "fake");
    assert_eq!(health.info.limits, Limits::CURRENT);
    handle.join().unwrap();
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
        peer.send(AgentFrame::Stdout(Bytes(b"go")));
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
