//! The operations beyond exec (protocol 4), session against session: put, get, info, shutdown,
//! time sync and reseed, each run through, and each of their rules broken once.

use super::tests::edges::{agent, agent_frame, client_frame, client_with, secret};
use super::*;
use crate::limits::*;
use crate::msg::*;
use crate::ops::*;
use crate::{decode_agent_frame, split_frame, ByteArray, Bytes, DATA_HEADROOM};

/// A client and an agent session with the bytes between them.
struct Pair {
    client: ClientSession,
    agent: AgentSession,
    /// What the agent handed its driver, owned.
    got: Vec<Got>,
    /// What the client heard, owned.
    heard: Vec<Heard>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Got {
    Put(Vec<u8>),
    Content(Vec<u8>),
    PutEnd([u8; DIGEST_LEN]),
    Get(Vec<u8>, TransferKind),
    Info,
    Shutdown(ShutdownRequest),
    TimeSync(Timestamp),
    Reseed(Vec<u8>),
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Heard {
    Ready(FileHeader),
    Data(Vec<u8>),
    Skipped(Vec<u8>, SkipReason),
    Done(FileSummary),
    System(String),
    Mount(Vec<u8>),
    Interface(String),
    Clock(Timestamp),
    Acknowledged(u32),
    Credit(usize),
    Refused(ErrorCode),
}

const PUT: PutRequest<'static> = PutRequest {
    path: Bytes(b"/srv/app.bin"),
    kind: TransferKind::File,
    mode: Some(0o755),
    owner: None,
    mtime: None,
    size: None,
    create_parents: false,
    no_clobber: false,
    user: None,
};

const GET: GetRequest<'static> = GetRequest {
    path: Bytes(b"/var/log/app.log"),
    kind: TransferKind::File,
    user: None,
};

const HEADER: FileHeader = FileHeader {
    size: 5,
    mode: 0o100644,
    mtime: Timestamp {
        secs: 1_700_000_000,
        nanos: 0,
    },
    uid: 0,
    gid: 0,
};

fn summary(bytes: u64, byte: u8) -> FileSummary {
    FileSummary {
        bytes,
        sha256: ByteArray([byte; DIGEST_LEN]),
    }
}

impl Pair {
    /// A secure pair past the agent's hello: the client's next operation carries its hello and
    /// proof.
    fn new() -> Pair {
        let mut pair = Pair {
            client: client_with(Some(secret())),
            agent: agent(),
            got: Vec::new(),
            heard: Vec::new(),
        };
        pair.deliver_to_client().unwrap();
        pair
    }

    /// Hands `bytes` (whole frames) to the agent; its first error stops it.
    fn deliver_to_agent(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        let mut rest = bytes;
        while !rest.is_empty() {
            let input = self.agent.handle_input(rest, 0)?;
            assert!(input.consumed > 0, "bytes end mid-frame");
            self.got.extend(input.event.and_then(got));
            rest = &rest[input.consumed..];
        }
        Ok(())
    }

    /// Whatever the agent has queued, to the client.
    fn deliver_to_client(&mut self) -> Result<(), SessionError> {
        let mut out = vec![0u8; MAX_FRAME * 2];
        let n = self.agent.poll_transmit(&mut out).unwrap();
        self.bytes_to_client(&out[..n])
    }

    fn bytes_to_client(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        let mut rest = bytes;
        while !rest.is_empty() {
            let input = self.client.handle_input_at(rest, 0)?;
            assert!(input.consumed > 0, "bytes end mid-frame");
            self.heard.extend(input.event.and_then(heard));
            rest = &rest[input.consumed..];
        }
        Ok(())
    }

    /// Runs `start` on the client (an operation's encoder) and hands its bytes to the agent.
    fn start(
        &mut self,
        start: impl FnOnce(&mut ClientSession, &mut [u8]) -> Result<usize, SessionError>,
    ) -> Result<(), SessionError> {
        let mut out = vec![0u8; MAX_FRAME * 2];
        let n = start(&mut self.client, &mut out)?;
        self.deliver_to_agent(&out[..n])?;
        // The agent's proof, queued by the opening.
        self.deliver_to_client()
    }

    /// Sends `data` as a put's content, within credit; returns the bytes taken.
    fn send_content(&mut self, data: &[u8]) -> Result<usize, SessionError> {
        let mut out = vec![0u8; MAX_FRAME];
        let sent = self.client.send_stdin(data, &mut out)?;
        self.deliver_to_agent(&out[..sent.written])?;
        Ok(sent.taken)
    }
}

fn got(event: AgentEvent<'_>) -> Option<Got> {
    Some(match event {
        AgentEvent::Hello | AgentEvent::Authenticated => return None,
        AgentEvent::Put(put) => Got::Put(put.path.0.to_vec()),
        AgentEvent::Stdin(data) => Got::Content(data.to_vec()),
        AgentEvent::PutEnd(digest) => Got::PutEnd(digest),
        AgentEvent::Get(get) => Got::Get(get.path.0.to_vec(), get.kind),
        AgentEvent::Info => Got::Info,
        AgentEvent::Shutdown(request) => Got::Shutdown(request),
        AgentEvent::TimeSync(time) => Got::TimeSync(time),
        AgentEvent::Reseed(bytes) => Got::Reseed(bytes.to_vec()),
        other => Got::Other(format!("{other:?}")),
    })
}

fn heard(event: ClientEvent<'_>) -> Option<Heard> {
    Some(match event {
        ClientEvent::HelloAccepted(_) | ClientEvent::Authenticated => return None,
        ClientEvent::FileReady(header) => Heard::Ready(header),
        ClientEvent::FileData(data) => Heard::Data(data.to_vec()),
        ClientEvent::Skipped(skipped) => Heard::Skipped(skipped.path.0.to_vec(), skipped.reason),
        ClientEvent::FileDone(summary) => Heard::Done(summary),
        ClientEvent::SystemInfo(info) => Heard::System(info.hostname.to_owned()),
        ClientEvent::Mount(mount) => Heard::Mount(mount.target.0.to_vec()),
        ClientEvent::Interface(interface) => Heard::Interface(interface.name.to_owned()),
        ClientEvent::ClockSet(previous) => Heard::Clock(previous),
        ClientEvent::Done(report) => Heard::Acknowledged(report.count),
        ClientEvent::StdinCredit { available } => Heard::Credit(available),
        ClientEvent::Refused(err) => Heard::Refused(err.code),
        other => panic!("not an operation's event: {other:?}"),
    })
}

/// A put from request to summary: content before the agent's `FileReady` too (within the
/// initial window), credit only after it, the digest last.
#[test]
fn a_put_runs_through() {
    let mut pair = Pair::new();
    pair.start(|client, out| client.start_put(&PUT, out))
        .unwrap();
    assert_eq!(pair.agent.phase(), Phase::Starting);
    assert_eq!(pair.send_content(b"hello ").unwrap(), 6);
    // Consumed before the destination is ready (a driver that buffers): no credit yet.
    pair.agent.stdin_consumed(6);
    let mut out = vec![0u8; MAX_FRAME];
    assert_eq!(
        pair.agent.poll_transmit(&mut out).unwrap(),
        0,
        "nothing before ready"
    );
    pair.agent.file_ready(HEADER, 0).unwrap();
    pair.deliver_to_client().unwrap();
    assert_eq!(pair.send_content(b"world").unwrap(), 5);
    pair.agent.stdin_consumed(5);
    let mut end = [0u8; 64];
    let n = pair.client.end_put(&[7; DIGEST_LEN], &mut end).unwrap();
    pair.deliver_to_agent(&end[..n]).unwrap();
    assert!(!pair.agent.stdin_open(), "the digest ends the content");
    pair.agent.file_done(summary(11, 7), 0).unwrap();
    pair.deliver_to_client().unwrap();
    assert_eq!(
        pair.got,
        [
            Got::Put(b"/srv/app.bin".to_vec()),
            Got::Content(b"hello ".to_vec()),
            Got::Content(b"world".to_vec()),
            Got::PutEnd([7; DIGEST_LEN]),
        ]
    );
    assert_eq!(
        pair.heard,
        [
            Heard::Ready(HEADER),
            Heard::Credit(STDIN_WINDOW),
            // The last content's credit, owed as for stdin (none is left to use).
            Heard::Credit(0),
            Heard::Done(summary(11, 7)),
        ]
    );
    assert!(pair.client.is_finished() && pair.agent.is_closed());
}

/// A get: the header, content in place, a skipped entry, the summary.
#[test]
fn a_get_runs_through() {
    let mut pair = Pair::new();
    let tree = GetRequest {
        kind: TransferKind::Tree,
        ..GET
    };
    pair.start(|client, out| client.start_get(&tree, out))
        .unwrap();
    assert_eq!(
        pair.got,
        [Got::Get(GET.path.0.to_vec(), TransferKind::Tree)]
    );
    pair.agent.file_ready(HEADER, 0).unwrap();
    pair.deliver_to_client().unwrap();
    let mut buf = vec![0u8; DATA_HEADROOM + 5];
    buf[DATA_HEADROOM..].copy_from_slice(b"abcde");
    let start = pair.agent.frame_file_data(&mut buf, 5).unwrap();
    pair.bytes_to_client(&buf[start..]).unwrap();
    let mut out = vec![0u8; MAX_FRAME];
    let n = pair
        .agent
        .encode_skipped(b"dev/null", SkipReason::Special, &mut out)
        .unwrap();
    pair.bytes_to_client(&out[..n]).unwrap();
    pair.agent.file_done(summary(5, 1), 0).unwrap();
    pair.deliver_to_client().unwrap();
    assert_eq!(
        pair.heard,
        [
            Heard::Ready(HEADER),
            Heard::Data(b"abcde".to_vec()),
            Heard::Skipped(b"dev/null".to_vec(), SkipReason::Special),
            Heard::Done(summary(5, 1)),
        ]
    );
    assert!(pair.client.is_finished() && pair.agent.is_closed());
}

/// Info: the system first, then mounts and interfaces, then `Done` with their count.
#[test]
fn info_runs_through_in_its_order() {
    let mut pair = Pair::new();
    pair.start(|client, out| client.start_info(out)).unwrap();
    assert_eq!(pair.got, [Got::Info]);
    let mut out = vec![0u8; MAX_FRAME];
    let mount = AgentFrame::Mount(MountInfo {
        source: Bytes(b"/dev/vda"),
        target: Bytes(b"/"),
        fstype: "ext4",
        read_only: true,
        total: 1,
        free: 1,
        available: 1,
    });
    assert_eq!(
        pair.agent.encode_info(&mount, &mut out),
        Err(SessionError::InvalidState),
        "a mount before the system"
    );
    assert_eq!(pair.agent.done(0, 0), Err(SessionError::InvalidState));
    let system = AgentFrame::SystemInfo(system_info());
    let mut sent = Vec::new();
    for frame in [system, mount] {
        let n = pair.agent.encode_info(&frame, &mut out).unwrap();
        sent.extend_from_slice(&out[..n]);
    }
    assert_eq!(
        pair.agent.encode_info(&system, &mut out),
        Err(SessionError::InvalidState),
        "a second system frame"
    );
    assert_eq!(
        pair.agent.encode_info(&AgentFrame::Keepalive, &mut out),
        Err(SessionError::InvalidState),
        "not an info frame"
    );
    pair.bytes_to_client(&sent).unwrap();
    pair.agent.done(1, 0).unwrap();
    pair.deliver_to_client().unwrap();
    assert_eq!(
        pair.heard,
        [
            Heard::System("vm".into()),
            Heard::Mount(b"/".to_vec()),
            Heard::Acknowledged(1),
        ]
    );
    assert!(pair.client.is_finished() && pair.agent.is_closed());
}

fn system_info() -> SystemInfo<'static> {
    SystemInfo {
        kernel_release: "6.1.0",
        kernel_version: "#1 SMP",
        machine: "x86_64",
        hostname: "vm",
        uptime_ms: 1,
        now: Timestamp::default(),
        cpus: 1,
        cpu_model: "",
        load: [0; 3],
        memory_total: 1,
        memory_available: 1,
        processes: 1,
        agent_pid: 1,
        agent_rss: 1,
    }
}

/// Info frames are bounded on both ends: the agent encodes at most `MAX_INFO_ITEMS` after the
/// system, and a client refuses one more.
#[test]
fn info_items_are_bounded_at_the_edge() {
    let mut pair = Pair::new();
    pair.start(|client, out| client.start_info(out)).unwrap();
    let mut out = vec![0u8; MAX_FRAME];
    let interface = AgentFrame::Interface(InterfaceInfo {
        name: "eth0",
        up: true,
        mtu: 1500,
        mac: Bytes(&[2, 0, 0, 0, 0, 1]),
        addresses: StrList::new(b""),
        rx_bytes: 0,
        tx_bytes: 0,
    });
    let n = pair
        .agent
        .encode_info(&AgentFrame::SystemInfo(system_info()), &mut out)
        .unwrap();
    pair.bytes_to_client(&out[..n]).unwrap();
    for _ in 0..MAX_INFO_ITEMS {
        let n = pair.agent.encode_info(&interface, &mut out).unwrap();
        pair.bytes_to_client(&out[..n]).unwrap();
    }
    assert_eq!(
        pair.agent.encode_info(&interface, &mut out),
        Err(SessionError::InvalidState)
    );
    // An agent that sends one more anyway is refused by the client.
    let one_more = agent_frame(interface);
    assert!(matches!(
        pair.bytes_to_client(&one_more),
        Err(SessionError::InvalidRequest { .. })
    ));
}

/// Shutdown, time sync and reseed are answered with `Done`, `ClockSet` and `Done`; the
/// session takes nothing else for them.
#[test]
fn the_privileged_operations_run_through() {
    let mut pair = Pair::new();
    let request = ShutdownRequest {
        reboot: true,
        grace_ms: MAX_SHUTDOWN_GRACE_MS,
    };
    pair.start(|client, out| client.start_shutdown(request, out))
        .unwrap();
    assert_eq!(
        pair.agent.clock_set(Timestamp::default(), 0),
        Err(SessionError::InvalidState)
    );
    pair.agent.done(0, 0).unwrap();
    pair.deliver_to_client().unwrap();
    assert_eq!(pair.got, [Got::Shutdown(request)]);
    assert_eq!(pair.heard, [Heard::Acknowledged(0)]);

    let mut pair = Pair::new();
    let now = Timestamp {
        secs: 1_800_000_000,
        nanos: 999_999_999,
    };
    pair.start(|client, out| client.start_time_sync(now, out))
        .unwrap();
    assert_eq!(pair.agent.done(0, 0), Err(SessionError::InvalidState));
    let before = Timestamp {
        secs: 978_307_200,
        nanos: 0,
    };
    pair.agent.clock_set(before, 0).unwrap();
    pair.deliver_to_client().unwrap();
    assert_eq!(pair.got, [Got::TimeSync(now)]);
    assert_eq!(pair.heard, [Heard::Clock(before)]);
    assert!(pair.client.is_finished());

    let mut pair = Pair::new();
    let random = [9u8; MAX_RESEED];
    pair.start(|client, out| client.start_reseed(&random, out))
        .unwrap();
    pair.agent.done(MAX_RESEED as u32, 0).unwrap();
    pair.deliver_to_client().unwrap();
    assert_eq!(pair.got, [Got::Reseed(random.to_vec())]);
    assert_eq!(pair.heard, [Heard::Acknowledged(MAX_RESEED as u32)]);
}

/// Each request's limits hold on both ends: the client does not send a bad one, and the agent
/// refuses one sent anyway with the same code.
#[test]
fn bad_requests_are_refused_on_both_ends() {
    let cases: [(ClientFrame<'static>, ErrorCode); 6] = [
        (ClientFrame::Reseed(Bytes(b"")), ErrorCode::InvalidRequest),
        (
            ClientFrame::Reseed(Bytes(&[0; MAX_RESEED + 1])),
            ErrorCode::InvalidRequest,
        ),
        (
            ClientFrame::TimeSync(Timestamp {
                secs: 0,
                nanos: 1_000_000_000,
            }),
            ErrorCode::InvalidRequest,
        ),
        (
            ClientFrame::Shutdown(ShutdownRequest {
                reboot: false,
                grace_ms: MAX_SHUTDOWN_GRACE_MS + 1,
            }),
            ErrorCode::LimitExceeded,
        ),
        (
            ClientFrame::Put(PutRequest {
                path: Bytes(b"relative"),
                ..PUT
            }),
            ErrorCode::InvalidRequest,
        ),
        (
            ClientFrame::Get(GetRequest {
                path: Bytes(b"/a\0b"),
                ..GET
            }),
            ErrorCode::InvalidRequest,
        ),
    ];
    for (frame, code) in cases {
        let mut pair = Pair::new();
        let mut out = vec![0u8; MAX_FRAME * 2];
        let refused = match frame {
            ClientFrame::Reseed(Bytes(bytes)) => pair.client.start_reseed(bytes, &mut out),
            ClientFrame::TimeSync(time) => pair.client.start_time_sync(time, &mut out),
            ClientFrame::Shutdown(request) => pair.client.start_shutdown(request, &mut out),
            ClientFrame::Put(put) => pair.client.start_put(&put, &mut out),
            ClientFrame::Get(get) => pair.client.start_get(&get, &mut out),
            _ => unreachable!(),
        };
        assert!(
            matches!(refused, Err(SessionError::InvalidRequest { .. })),
            "{frame:?}: {refused:?}"
        );
        let code_sent = agent_refuses(&client_frame(frame));
        assert_eq!(code_sent, Some(code), "{frame:?}");
    }
}

/// An opening (hello and proof) from a client with the edges' secret, then `rest`, to a fresh
/// agent: the code of the error frame it answers with.
fn agent_refuses(rest: &[u8]) -> Option<ErrorCode> {
    let mut pair = Pair::new();
    let mut out = vec![0u8; MAX_FRAME];
    // The client's hello and proof come with its first operation: take them from an info.
    let n = pair.client.start_info(&mut out).unwrap();
    let info = client_frame(ClientFrame::Info);
    let opening = &out[..n - info.len()];
    let bytes = [opening, rest].concat();
    let err = pair.deliver_to_agent(&bytes).expect_err("refused");
    assert!(!matches!(err, SessionError::Unauthenticated), "{err}");
    let mut sent = vec![0u8; MAX_FRAME * 2];
    let n = pair.agent.poll_transmit(&mut sent).unwrap();
    let mut rest = &sent[..n];
    let mut code = None;
    while let Ok(Some((body, used))) = split_frame(rest, MAX_FRAME_BODY) {
        if let Ok(AgentFrame::Error(err)) = decode_agent_frame(body) {
            code = Some(err.code);
        }
        rest = &rest[used..];
    }
    code
}

/// A put's content ends with its digest: a bare stdin EOF is refused by both sessions, and a
/// client that closes before the digest has abandoned the put (nothing queued, nothing owed).
#[test]
fn a_put_ends_with_its_digest_or_not_at_all() {
    let mut pair = Pair::new();
    pair.start(|client, out| client.start_put(&PUT, out))
        .unwrap();
    assert_eq!(pair.client.close_stdin(), Err(SessionError::InvalidState));
    assert!(matches!(
        pair.deliver_to_agent(&client_frame(ClientFrame::StdinEof)),
        Err(SessionError::Unexpected {
            frame: FrameKind::StdinEof,
            ..
        })
    ));

    let mut pair = Pair::new();
    pair.start(|client, out| client.start_put(&PUT, out))
        .unwrap();
    pair.agent.file_ready(HEADER, 0).unwrap();
    pair.deliver_to_client().unwrap();
    pair.send_content(b"half").unwrap();
    assert_eq!(
        pair.agent.file_done(summary(4, 0), 0),
        Err(SessionError::InvalidState),
        "no summary before the digest"
    );
    assert!(matches!(
        pair.agent.handle_eof(),
        Err(SessionError::Disconnected { .. })
    ));
    assert!(pair.agent.is_closed());
    let mut out = vec![0u8; MAX_FRAME];
    assert_eq!(pair.agent.poll_transmit(&mut out).unwrap(), 0);

    // After the digest, a half-close is only the end of input: the summary still goes out.
    let mut pair = Pair::new();
    pair.start(|client, out| client.start_put(&PUT, out))
        .unwrap();
    let n = pair.client.end_put(&[1; DIGEST_LEN], &mut out).unwrap();
    pair.deliver_to_agent(&out[..n]).unwrap();
    assert_eq!(pair.agent.handle_eof(), Ok(()));
    pair.agent.file_ready(HEADER, 0).unwrap();
    pair.agent.file_done(summary(0, 1), 0).unwrap();
    pair.deliver_to_client().unwrap();
    assert_eq!(
        pair.heard,
        [Heard::Ready(HEADER), Heard::Done(summary(0, 1))]
    );
    assert_eq!(
        pair.client.end_put(&[1; DIGEST_LEN], &mut out),
        Err(SessionError::InvalidState),
        "one digest"
    );
}

/// Content beyond the credit, content after the digest, and a command's controls are refused
/// during a put; a get takes no content at all.
#[test]
fn a_transfer_takes_only_its_own_frames() {
    let mut pair = Pair::new();
    pair.start(|client, out| client.start_put(&PUT, out))
        .unwrap();
    let big = vec![0u8; MAX_DATA];
    for _ in 0..STDIN_WINDOW / MAX_DATA {
        pair.deliver_to_agent(&client_frame(ClientFrame::Stdin(Bytes(&big))))
            .unwrap();
    }
    assert_eq!(
        pair.deliver_to_agent(&client_frame(ClientFrame::Stdin(Bytes(b"x")))),
        Err(SessionError::CreditExceeded)
    );

    for control in [
        ClientFrame::Signal(15),
        ClientFrame::Cancel(Cancel { grace_ms: None }),
        ClientFrame::Resize(WindowSize::default()),
    ] {
        let mut pair = Pair::new();
        pair.start(|client, out| client.start_put(&PUT, out))
            .unwrap();
        assert!(
            matches!(
                pair.deliver_to_agent(&client_frame(control)),
                Err(SessionError::Unexpected { .. })
            ),
            "{control:?}"
        );
        let mut out = vec![0u8; 64];
        assert_eq!(
            pair.client.send_signal(15, &mut out),
            Err(SessionError::InvalidState),
            "the client sends no controls either"
        );
    }

    let mut pair = Pair::new();
    pair.start(|client, out| client.start_get(&GET, out))
        .unwrap();
    assert!(matches!(
        pair.deliver_to_agent(&client_frame(ClientFrame::Stdin(Bytes(b"x")))),
        Err(SessionError::Unexpected { .. })
    ));

    let mut pair = Pair::new();
    pair.start(|client, out| client.start_put(&PUT, out))
        .unwrap();
    let mut out = vec![0u8; 64];
    let n = pair.client.end_put(&[0; DIGEST_LEN], &mut out).unwrap();
    pair.deliver_to_agent(&out[..n]).unwrap();
    assert!(matches!(
        pair.deliver_to_agent(&client_frame(ClientFrame::Stdin(Bytes(b"late")))),
        Err(SessionError::Unexpected { .. })
    ));
}

/// The client believes only what its operation can produce, in order.
#[test]
fn the_client_refuses_frames_out_of_place() {
    let header = agent_frame(AgentFrame::FileReady(HEADER));
    let data = agent_frame(AgentFrame::FileData(Bytes(b"x")));
    let done = agent_frame(AgentFrame::FileDone(summary(1, 0)));
    let clock = agent_frame(AgentFrame::ClockSet(Timestamp::default()));
    let mount = agent_frame(AgentFrame::Mount(MountInfo {
        source: Bytes(b""),
        target: Bytes(b"/"),
        fstype: "",
        read_only: false,
        total: 0,
        free: 0,
        available: 0,
    }));
    type Start = fn(&mut ClientSession, &mut [u8]) -> Result<usize, SessionError>;
    let put: Start = |client, out| client.start_put(&PUT, out);
    let get: Start = |client, out| client.start_get(&GET, out);
    let info: Start = |client, out| client.start_info(out);
    let cases: [(&str, Start, Vec<&[u8]>); 7] = [
        ("data before the header", get, vec![&data]),
        ("data in a put", put, vec![&header, &data]),
        ("a summary before the digest", put, vec![&header, &done]),
        ("a summary before the header", get, vec![&done]),
        ("a mount before the system", info, vec![&mount]),
        ("a clock report for an info", info, vec![&clock]),
        ("a header for an info", info, vec![&header]),
    ];
    for (name, start, frames) in cases {
        let mut pair = Pair::new();
        pair.start(start).unwrap();
        let (last, before) = frames.split_last().unwrap();
        for frame in before {
            pair.bytes_to_client(frame).unwrap();
        }
        assert!(
            matches!(
                pair.bytes_to_client(last),
                Err(SessionError::Unexpected { .. })
            ),
            "{name}"
        );
        assert!(pair.client.is_finished(), "{name}: the client gave up");
    }
}

/// Every new request after a piece of an exec request is refused: only that exec may follow.
#[test]
fn no_other_request_after_exec_pieces() {
    let part = client_frame(ClientFrame::ExecPart(ExecPart {
        list: ListKind::Argv,
        data: Bytes(b"a"),
    }));
    let requests = [
        ClientFrame::Put(PUT),
        ClientFrame::Get(GET),
        ClientFrame::Info,
        ClientFrame::Shutdown(ShutdownRequest {
            reboot: false,
            grace_ms: 0,
        }),
        ClientFrame::TimeSync(Timestamp::default()),
        ClientFrame::Reseed(Bytes(b"r")),
    ];
    for request in requests {
        let bytes = [part.clone(), client_frame(request)].concat();
        assert_eq!(
            agent_refuses(&bytes),
            Some(ErrorCode::ProtocolViolation),
            "{request:?}"
        );
    }
}

/// A get that runs long is kept alive like a command; a put's content is credited back as the
/// driver writes it.
#[test]
fn transfers_are_kept_alive_and_credited() {
    let mut pair = Pair::new();
    pair.start(|client, out| client.start_get(&GET, out))
        .unwrap();
    pair.agent.file_ready(HEADER, 0).unwrap();
    let due = pair.agent.poll_timeout().expect("a keepalive is due");
    assert_eq!(due, u64::from(KEEPALIVE_MS) * 1000);
    pair.agent.handle_timeout(due).unwrap();
    pair.deliver_to_client().unwrap();
    assert_eq!(
        pair.heard,
        [Heard::Ready(HEADER)],
        "a keepalive is no event"
    );
    let deadline = pair.client.poll_timeout();
    assert!(
        deadline.is_some(),
        "the client watches a transfer's liveness"
    );

    let mut pair = Pair::new();
    pair.start(|client, out| client.start_put(&PUT, out))
        .unwrap();
    pair.agent.file_ready(HEADER, 0).unwrap();
    pair.deliver_to_client().unwrap();
    let content = vec![5u8; STDIN_WINDOW];
    let mut sent = 0;
    while sent < content.len() {
        sent += pair.send_content(&content[sent..]).unwrap();
    }
    assert_eq!(pair.client.stdin_credit(), 0);
    pair.agent.stdin_consumed(STDIN_WINDOW);
    pair.deliver_to_client().unwrap();
    assert_eq!(pair.client.stdin_credit(), STDIN_WINDOW);
}

/// An info's `Done` must count the frames that came: a client refuses any other count.
#[test]
fn an_info_count_that_does_not_match_is_refused() {
    for count in [0, 2] {
        let mut pair = Pair::new();
        pair.start(|client, out| client.start_info(out)).unwrap();
        let mut out = vec![0u8; MAX_FRAME];
        let n = pair
            .agent
            .encode_info(&AgentFrame::SystemInfo(system_info()), &mut out)
            .unwrap();
        pair.bytes_to_client(&out[..n]).unwrap();
        let mount = AgentFrame::Mount(MountInfo {
            source: Bytes(b"proc"),
            target: Bytes(b"/proc"),
            fstype: "proc",
            read_only: false,
            total: 0,
            free: 0,
            available: 0,
        });
        let n = pair.agent.encode_info(&mount, &mut out).unwrap();
        pair.bytes_to_client(&out[..n]).unwrap();
        let done = agent_frame(AgentFrame::Done(DoneReport { count }));
        assert!(
            matches!(
                pair.bytes_to_client(&done),
                Err(SessionError::InvalidRequest { .. })
            ),
            "count {count}"
        );
    }
}
