//! The library against a scripted fake agent: every way a peer can misbehave must end in a typed
//! error, never a hang or a panic. (The real agent is exercised in `host/tests/`.)

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread;
use std::time::Duration;

use ferry_wire::limits::{MAX_FRAME, MAX_FRAME_BODY, STDIN_WINDOW};
use ferry_wire::{
    decode_client_frame, encode_agent_frame, split_frame, AgentFrame, AgentHello, ClientFrame,
    ErrorCode, ErrorFrame, ExitStatus, Limits, Started, Termination, MAGIC,
};

use crate::target::tests::tempdir::Dir;
use crate::*;

/// The agent side of one scripted connection.
struct Peer {
    stream: UnixStream,
    buf: Vec<u8>,
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
        let mut out = vec![0u8; MAX_FRAME];
        let n = encode_agent_frame(&frame, &mut out).unwrap();
        self.stream.write_all(&out[..n]).unwrap();
    }

    fn raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// The next client frame; `None` at EOF.
    fn recv(&mut self) -> Option<Sent> {
        loop {
            if let Some((body, used)) = split_frame(&self.buf, MAX_FRAME_BODY).unwrap() {
                let sent = match decode_client_frame(body).unwrap() {
                    ClientFrame::Hello(_) => Sent::Hello,
                    ClientFrame::Exec(exec) => Sent::Exec(exec.argv.as_bytes().to_vec()),
                    ClientFrame::Stdin(data) => Sent::Stdin(data.0.to_vec()),
                    ClientFrame::StdinEof => Sent::StdinEof,
                };
                self.buf.drain(..used);
                return Some(sent);
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn hello(&mut self) {
        assert_eq!(self.recv(), Some(Sent::Hello));
        self.send(AgentFrame::Hello(AgentHello {
            magic: MAGIC,
            version: 1,
            agent_version: "fake",
            limits: Limits::CURRENT,
        }));
    }

    fn started(&mut self) {
        assert!(matches!(self.recv(), Some(Sent::Exec(_))));
        self.send(AgentFrame::Started(Started { pid: 42 }));
    }

    fn exited(&mut self, code: u8) {
        self.send(AgentFrame::Exited(Termination {
            status: ExitStatus::Code(code),
            duration_us: 1500,
            output_dropped: false,
        }));
    }
}

/// Serves one connection with `script`; returns a client for it and the fake's thread.
fn fake(script: impl FnOnce(&mut Peer) + Send + 'static) -> (Client, Dir, thread::JoinHandle<()>) {
    let dir = Dir::new("fake-agent");
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let handle = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut peer = Peer {
            stream,
            buf: Vec::new(),
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
    let (client, _dir, handle) = fake(script);
    let result = client.output(&Command::new("x"));
    handle.join().unwrap();
    result
}

#[test]
fn collects_output_in_order_with_the_termination_record() {
    let output = run(|peer| {
        peer.hello();
        peer.started();
        peer.send(AgentFrame::Stdout(ferry_wire::Bytes(b"a\0")));
        peer.send(AgentFrame::Stderr(ferry_wire::Bytes(b"e")));
        peer.send(AgentFrame::Stdout(ferry_wire::Bytes(b"\xffb")));
        peer.exited(7);
    })
    .unwrap();
    assert_eq!(output.stdout, b"a\0\xffb");
    assert_eq!(output.stderr, b"e");
    assert_eq!(output.status, ExitStatus::Code(7));
    assert_eq!(output.duration, Duration::from_micros(1500));
    assert_eq!(output.pid, 42);
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
fn misbehaving_agents_give_typed_errors_not_hangs() {
    type Script = fn(&mut Peer);
    let cases: [(&str, Script); 9] = [
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
        ("output before started", |p| {
            p.hello();
            p.recv();
            p.send(AgentFrame::Stdout(ferry_wire::Bytes(b"x")));
        }),
        ("credit never lent", |p| {
            p.hello();
            p.started();
            p.send(AgentFrame::StdinCredit(1));
        }),
        ("second hello", |p| {
            p.hello();
            p.started();
            p.send(AgentFrame::Hello(AgentHello {
                magic: MAGIC,
                version: 1,
                agent_version: "x",
                limits: Limits::CURRENT,
            }));
        }),
        ("eof mid-frame", |p| {
            p.hello();
            p.started();
            p.raw(&[10, 0, 0, 0, 2]);
        }),
        ("silence", |p| {
            p.recv();
            thread::sleep(Duration::from_millis(800));
        }),
    ];
    for (name, script) in cases {
        let err = run(script).unwrap_err();
        match (name, &err) {
            ("version from the future", Error::UnsupportedVersion { .. }) => {}
            ("silence", Error::Io(io)) => assert_eq!(io.kind(), std::io::ErrorKind::TimedOut),
            (_, Error::Protocol(_)) => {}
            _ => panic!("{name}: {err:?}"),
        }
    }
}

#[test]
fn disconnects_are_reported_with_the_phase() {
    let err = run(|peer| {
        peer.hello();
        peer.started();
    })
    .unwrap_err();
    assert!(
        matches!(err, Error::Disconnected("while the command was running")),
        "{err:?}"
    );
    let err = run(|peer| {
        peer.recv();
    })
    .unwrap_err();
    assert!(
        matches!(err, Error::Disconnected("during the hello")),
        "{err:?}"
    );
}

#[test]
fn stdin_bytes_are_fed_within_credit_then_eof() {
    let data: Vec<u8> = (0..STDIN_WINDOW * 3).map(|i| (i % 251) as u8).collect();
    let expected = data.clone();
    let (client, _dir, handle) = fake(move |peer| {
        peer.hello();
        peer.started();
        let mut got = Vec::new();
        let mut outstanding = 0usize;
        loop {
            match peer.recv() {
                Some(Sent::Stdin(chunk)) => {
                    outstanding += chunk.len();
                    assert!(outstanding <= STDIN_WINDOW, "client exceeded its credit");
                    got.extend_from_slice(&chunk);
                    if outstanding == STDIN_WINDOW {
                        // Grant credit back in two uneven parts.
                        peer.send(AgentFrame::StdinCredit(1000));
                        peer.send(AgentFrame::StdinCredit(STDIN_WINDOW as u32 - 1000));
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
