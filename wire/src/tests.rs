//! Golden byte vectors, round trips and garbage for the whole protocol.

use proptest::prelude::*;

use crate::limits::*;
use crate::*;

fn encode_agent(frame: &AgentFrame<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_FRAME];
    let n = encode_agent_frame(frame, &mut buf).expect("encodes");
    buf.truncate(n);
    buf
}

fn encode_client(frame: &ClientFrame<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_FRAME];
    let n = encode_client_frame(frame, &mut buf).expect("encodes");
    buf.truncate(n);
    buf
}

/// Checks the golden bytes both ways: encoding gives them, and they decode back to the frame.
fn golden_client(frame: ClientFrame<'_>, expected: &[u8]) {
    assert_eq!(encode_client(&frame), expected, "{frame:?}");
    let (body, used) = split_frame(expected, MAX_FRAME_BODY).unwrap().unwrap();
    assert_eq!(used, expected.len());
    assert_eq!(decode_client_frame(body), Ok(frame));
}

fn golden_agent(frame: AgentFrame<'_>, expected: &[u8]) {
    assert_eq!(encode_agent(&frame), expected, "{frame:?}");
    let (body, used) = split_frame(expected, MAX_FRAME_BODY).unwrap().unwrap();
    assert_eq!(used, expected.len());
    assert_eq!(decode_agent_frame(body), Ok(frame));
}

#[rustfmt::skip]
#[test]
fn golden_client_hello() {
    golden_client(ClientFrame::Hello(ClientHello::CURRENT), &[
        7, 0, 0, 0,             // body length
        0x00,                   // ClientFrame::Hello
        b'F', b'R', b'R', b'Y', // magic
        0x05,                   // min_version
        0x05,                   // max_version
    ]);
}

#[rustfmt::skip]
#[test]
fn golden_client_exec() {
    let exec = ExecRequest {
        argv: StrList::new(b"ls\0-l\0"),
        env: StrList::new(b"A=1\0"),
        clean_env: false,
        cwd: Some(Bytes(b"/tmp")),
        stdin: StdinMode::Pipe,
        user: None,
        pty: None,
        timeout_ms: 0,
        kill_grace_ms: None,
        kill_tree_on_exit: false,
        max_output: 0,
    };
    golden_client(ClientFrame::Exec(exec), &[
        27, 0, 0, 0,                       // body length
        0x01,                              // ClientFrame::Exec
        6, b'l', b's', 0, b'-', b'l', 0,   // argv: length, packed NUL-terminated entries
        4, b'A', b'=', b'1', 0,            // env: length, packed entries
        0x00,                              // clean_env: false
        0x01, 4, b'/', b't', b'm', b'p',   // cwd: Some, length, bytes
        0x01,                              // stdin: StdinMode::Pipe
        0x00,                              // user: None
        0x00,                              // pty: None
        0x00,                              // timeout_ms: 0 (none)
        0x00,                              // kill_grace_ms: None
        0x00,                              // kill_tree_on_exit: false
        0x00,                              // max_output: 0 (the agent's)
    ]);
    let exec = ExecRequest {
        argv: StrList::new(b"id\0"),
        env: StrList::new(b""),
        clean_env: true,
        cwd: None,
        stdin: StdinMode::Null,
        user: Some(Bytes(b"nobody:users")),
        pty: Some(WindowSize { rows: 24, cols: 80 }),
        timeout_ms: 1500,
        kill_grace_ms: Some(300),
        kill_tree_on_exit: true,
        max_output: 1 << 20,
    };
    golden_client(ClientFrame::Exec(exec), &[
        35, 0, 0, 0,                       // body length
        0x01,                              // ClientFrame::Exec
        3, b'i', b'd', 0,                  // argv: length, packed NUL-terminated entries
        0,                                 // env: empty
        0x01,                              // clean_env: true
        0x00,                              // cwd: None
        0x00,                              // stdin: StdinMode::Null
        0x01, 12,                          // user: Some, length
        b'n', b'o', b'b', b'o', b'd', b'y', b':', b'u', b's', b'e', b'r', b's',
        0x01, 24, 80,                      // pty: Some, rows, cols
        0xDC, 0x0B,                        // timeout_ms: 1500
        0x01, 0xAC, 0x02,                  // kill_grace_ms: Some(300)
        0x01,                              // kill_tree_on_exit: true
        0x80, 0x80, 0x40,                  // max_output: 1 MiB
    ]);
}

#[rustfmt::skip]
#[test]
fn golden_client_controls_and_parts() {
    golden_client(ClientFrame::Signal(15), &[
        2, 0, 0, 0,             // body length
        0x06,                   // ClientFrame::Signal
        15,                     // SIGTERM
    ]);
    golden_client(ClientFrame::Resize(WindowSize { rows: 50, cols: 200 }), &[
        4, 0, 0, 0,             // body length
        0x07,                   // ClientFrame::Resize
        50,                     // rows
        0xC8, 0x01,             // cols: 200
    ]);
    golden_client(ClientFrame::Cancel(Cancel { grace_ms: Some(500) }), &[
        4, 0, 0, 0,             // body length
        0x08,                   // ClientFrame::Cancel
        0x01, 0xF4, 0x03,       // grace_ms: Some(500)
    ]);
    golden_client(ClientFrame::Cancel(Cancel { grace_ms: None }), &[
        2, 0, 0, 0,             // body length
        0x08,                   // ClientFrame::Cancel
        0x00,                   // grace_ms: None (the request's)
    ]);
    golden_client(ClientFrame::ExecPart(ExecPart { list: ListKind::Env, data: Bytes(b"A=1\0") }), &[
        7, 0, 0, 0,             // body length
        0x09,                   // ClientFrame::ExecPart
        0x01,                   // list: ListKind::Env
        4, b'A', b'=', b'1', 0, // data: length, bytes
    ]);
}

#[rustfmt::skip]
#[test]
fn golden_client_stdin_and_eof() {
    golden_client(ClientFrame::Stdin(Bytes(b"hi")), &[
        4, 0, 0, 0,     // body length
        0x02,           // ClientFrame::Stdin
        2, b'h', b'i',  // length, bytes
    ]);
    golden_client(ClientFrame::StdinEof, &[
        1, 0, 0, 0,     // body length
        0x03,           // ClientFrame::StdinEof
    ]);
}

#[rustfmt::skip]
#[test]
fn golden_client_auth_and_kill_all() {
    golden_client(ClientFrame::Auth(ClientProof { nonce: ByteArray([1; NONCE_LEN]), mac: Bytes(&[0xAB; MAC_LEN]) }), &[
        67, 0, 0, 0,            // body length
        0x04,                   // ClientFrame::Auth
        32,                     // nonce: length (a ByteArray: exactly 32 decodes)
        1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
        1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
        32,                     // mac: length (a byte string: any length decodes)
        0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB,
        0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB, 0xAB,
    ]);
    // A proof of the wrong length still decodes: the session refuses it like a wrong one.
    golden_client(ClientFrame::Auth(ClientProof { nonce: ByteArray([1; NONCE_LEN]), mac: Bytes(b"") }), &[
        35, 0, 0, 0,            // body length
        0x04,                   // ClientFrame::Auth
        32,                     // nonce: length (a ByteArray: exactly 32 decodes)
        1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
        1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
        0,                      // mac: empty
    ]);
    golden_client(ClientFrame::KillAll, &[
        1, 0, 0, 0,             // body length
        0x05,                   // ClientFrame::KillAll
    ]);
}

/// A hello as an agent sends it: every field of limits and bounds, a nonce, the security mode.
const GOLDEN_BOUNDS: Bounds = Bounds {
    max_runtime_s: 300,
    max_output: 1_000_000,
    max_file_size: 0,
    max_connections: 64,
    handshake_timeout_ms: 5_000,
    memory_max: 0,
    pids_max: 0,
    cgroup: true,
    default_uid: 65534,
    default_gid: 65534,
};

#[rustfmt::skip]
#[test]
fn golden_agent_hello() {
    golden_agent(AgentFrame::Hello(AgentHello {
        magic: MAGIC,
        min_version: 5,
        version: 5,
        agent_version: "0.1.0",
        limits: Limits { idle_ms: 30_000, ..Limits::CURRENT },
        nonce: ByteArray([7; NONCE_LEN]),
        security: Security::Authenticated,
        bounds: GOLDEN_BOUNDS,
    }), &[
        98, 0, 0, 0,                       // body length
        0x00,                              // AgentFrame::Hello
        b'F', b'R', b'R', b'Y',            // magic
        0x05,                              // min_version
        0x05,                              // version
        5, b'0', b'.', b'1', b'.', b'0',   // agent_version
        0x8E, 0x80, 0x04,                  // limits.max_frame_body: 65550
        0x80, 0x80, 0x04,                  // limits.max_data: 65536
        0x80, 0x80, 0x80, 0x01,            // limits.max_argv_bytes: 2 MiB
        0x80, 0x80, 0x08,                  // limits.max_args: 131072
        0x80, 0x80, 0x40,                  // limits.max_env_bytes: 1 MiB
        0x80, 0x80, 0x02,                  // limits.max_env_vars: 32768
        0xFF, 0x1F,                        // limits.max_path: 4095
        0x80, 0x80, 0x08,                  // limits.stdin_window: 131072
        0x40,                              // limits.max_user: 64
        0x80, 0x80, 0x08,                  // limits.max_arg_len: 131072
        0x88, 0x27,                        // limits.keepalive_ms: 5000
        0xB0, 0xEA, 0x01,                  // limits.idle_ms: 30000 (protocol 5)
        32,                                // nonce: length (a ByteArray: exactly 32 decodes)
        7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
        7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
        0x00,                              // security: Security::Authenticated
        0xAC, 0x02,                        // bounds.max_runtime_s: 300
        0xC0, 0x84, 0x3D,                  // bounds.max_output: 1000000
        0x00,                              // bounds.max_file_size: 0 (no limit)
        0x40,                              // bounds.max_connections: 64
        0x88, 0x27,                        // bounds.handshake_timeout_ms: 5000
        0x00,                              // bounds.memory_max: 0 (no limit)
        0x00,                              // bounds.pids_max: 0 (no limit)
        0x01,                              // bounds.cgroup: true
        0xFE, 0xFF, 0x03,                  // bounds.default_uid: 65534
        0xFE, 0xFF, 0x03,                  // bounds.default_gid: 65534
    ]);
    // An insecure agent, the rest alike: only the security byte differs.
    let insecure = encode_agent(&AgentFrame::Hello(AgentHello {
        magic: MAGIC,
        min_version: 5,
        version: 5,
        agent_version: "0.1.0",
        limits: Limits { idle_ms: 30_000, ..Limits::CURRENT },
        nonce: ByteArray([7; NONCE_LEN]),
        security: Security::Insecure,
        bounds: GOLDEN_BOUNDS,
    }));
    assert_eq!(insecure[4 + 1 + 4 + 2 + 6 + 33 + 1 + 32], 0x01, "security: Security::Insecure");
}

#[rustfmt::skip]
#[test]
fn golden_agent_authenticated_and_done() {
    golden_agent(AgentFrame::Authenticated(AgentProof { mac: ByteArray([0xCD; MAC_LEN]) }), &[
        34, 0, 0, 0,            // body length
        0x08,                   // AgentFrame::Authenticated
        32,                     // mac: length (a ByteArray: exactly 32 decodes)
        0xCD, 0xCD, 0xCD, 0xCD, 0xCD, 0xCD, 0xCD, 0xCD, 0xCD, 0xCD, 0xCD, 0xCD, 0xCD, 0xCD, 0xCD, 0xCD,
        0xCD, 0xCD, 0xCD, 0xCD, 0xCD, 0xCD, 0xCD, 0xCD, 0xCD, 0xCD, 0xCD, 0xCD, 0xCD, 0xCD, 0xCD, 0xCD,
    ]);
    golden_agent(AgentFrame::Done(DoneReport { count: 300 }), &[
        3, 0, 0, 0,             // body length
        0x09,                   // AgentFrame::Done
        0xAC, 0x02,             // count: 300
    ]);
}

#[rustfmt::skip]
#[test]
fn golden_agent_started_data_credit() {
    golden_agent(AgentFrame::Started(Started { pid: 300 }), &[
        3, 0, 0, 0,         // body length
        0x01,               // AgentFrame::Started
        0xAC, 0x02,         // pid: 300
    ]);
    golden_agent(AgentFrame::Stdout(Output { at_us: 1500, data: Bytes(b"out") }), &[
        7, 0, 0, 0,         // body length
        0x02,               // AgentFrame::Stdout
        0xDC, 0x0B,         // at_us: 1500
        3, b'o', b'u', b't',
    ]);
    golden_agent(AgentFrame::Stderr(Output { at_us: 0, data: Bytes(b"err") }), &[
        6, 0, 0, 0,         // body length
        0x03,               // AgentFrame::Stderr
        0x00,               // at_us: 0
        3, b'e', b'r', b'r',
    ]);
    golden_agent(AgentFrame::StdinCredit(65536), &[
        4, 0, 0, 0,         // body length
        0x04,               // AgentFrame::StdinCredit
        0x80, 0x80, 0x04,   // 65536
    ]);
}

#[rustfmt::skip]
#[test]
fn golden_agent_exited() {
    golden_agent(AgentFrame::Exited(Termination {
        status: ExitStatus::Signal { number: 9, core_dumped: false },
        duration_us: 1500,
        output_dropped: true,
        ending: Ending::TimedOut,
        tree_kill: TreeKill::Cgroup,
        stdout: StreamRecord { bytes: 300, dropped: 0 },
        stderr: StreamRecord::default(),
        pipes_held: true,
        oom_killed: false,
        peak_memory: 4096,
    }), &[
        18, 0, 0, 0,    // body length
        0x05,           // AgentFrame::Exited
        0x01,           // ExitStatus::Signal
        9,              // number
        0x00,           // core_dumped: false
        0xDC, 0x0B,     // duration_us: 1500
        0x01,           // output_dropped: true
        0x01,           // ending: Ending::TimedOut
        0x01,           // tree_kill: TreeKill::Cgroup
        0xAC, 0x02,     // stdout.bytes: 300
        0x00,           // stdout.dropped: 0
        0x00, 0x00,     // stderr: bytes, dropped
        0x01,           // pipes_held: true
        0x00,           // oom_killed: false
        0x80, 0x20,     // peak_memory: 4096
    ]);
    golden_agent(AgentFrame::Exited(Termination {
        status: ExitStatus::Code(3),
        duration_us: 0,
        output_dropped: false,
        ending: Ending::Exited,
        tree_kill: TreeKill::None,
        stdout: StreamRecord::default(),
        stderr: StreamRecord::default(),
        pipes_held: false,
        oom_killed: false,
        peak_memory: 0,
    }), &[
        14, 0, 0, 0,    // body length
        0x05,           // AgentFrame::Exited
        0x00,           // ExitStatus::Code
        3,              // code
        0x00,           // duration_us: 0
        0x00,           // output_dropped: false
        0x00,           // ending: Ending::Exited
        0x00,           // tree_kill: TreeKill::None
        0x00, 0x00,     // stdout: bytes, dropped
        0x00, 0x00,     // stderr: bytes, dropped
        0x00,           // pipes_held: false
        0x00,           // oom_killed: false
        0x00,           // peak_memory: 0 (unknown)
    ]);
}

#[rustfmt::skip]
#[test]
fn golden_agent_keepalive_and_output_dropped() {
    golden_agent(AgentFrame::Keepalive, &[
        1, 0, 0, 0,         // body length
        0x0A,               // AgentFrame::Keepalive
    ]);
    golden_agent(AgentFrame::OutputDropped(Dropped { stream: Stream::Stderr, bytes: 1000 }), &[
        4, 0, 0, 0,         // body length
        0x0B,               // AgentFrame::OutputDropped
        0x01,               // stream: Stream::Stderr
        0xE8, 0x07,         // bytes: 1000
    ]);
}

#[rustfmt::skip]
#[test]
fn golden_agent_error_and_ready() {
    golden_agent(AgentFrame::Error(ErrorFrame {
        code: ErrorCode::NotFound,
        errno: 2,
        message: "x",
    }), &[
        5, 0, 0, 0,     // body length
        0x06,           // AgentFrame::Error
        0x06,           // ErrorCode::NotFound
        0x02,           // errno: ENOENT
        1, b'x',        // message
    ]);
    golden_agent(AgentFrame::Ready(ReadyReport {
        cid: 3,
        init_started_us: 1000,
        modules_us: 200,
        listening_us: 1300,
        module_times: StrList::new(b"vsock=90\0"),
    }), &[
        18, 0, 0, 0,    // body length
        0x07,           // AgentFrame::Ready
        0x03,           // cid
        0xE8, 0x07,     // init_started_us: 1000
        0xC8, 0x01,     // modules_us: 200
        0x94, 0x0A,     // listening_us: 1300
        9, b'v', b's', b'o', b'c', b'k', b'=', b'9', b'0', 0, // module_times
    ]);
}

/// Each error code's wire byte is its position; appending is the only allowed change.
#[test]
fn error_codes_are_pinned() {
    use ErrorCode::*;
    let all = [
        UnsupportedVersion,
        Malformed,
        FrameTooLarge,
        ProtocolViolation,
        LimitExceeded,
        InvalidRequest,
        NotFound,
        PermissionDenied,
        ExecFormat,
        BadCwd,
        SpawnFailed,
        ResourceExhausted,
        Busy,
        Internal,
        Unauthenticated,
        Unsupported,
        ArgumentsTooLong,
        AlreadyExists,
        WrongFileType,
        FileTooLarge,
        NoSpace,
        IntegrityMismatch,
        PathEscape,
        Io,
        BadArchive,
    ];
    for (index, code) in all.into_iter().enumerate() {
        let frame = AgentFrame::Error(ErrorFrame {
            code,
            errno: 0,
            message: "",
        });
        assert_eq!(encode_agent(&frame)[5], index as u8, "{code:?}");
        assert!(!code.as_str().is_empty());
    }
}

/// Each frame variant's first body byte is its position: append only, never reorder.
#[test]
fn variant_tags_are_pinned() {
    let proof = [0u8; MAC_LEN];
    let client = [
        ClientFrame::Hello(ClientHello::CURRENT),
        ClientFrame::Exec(exec_with(b"a\0", b"", None)),
        ClientFrame::Stdin(Bytes(b"")),
        ClientFrame::StdinEof,
        ClientFrame::Auth(ClientProof {
            nonce: ByteArray([0; NONCE_LEN]),
            mac: Bytes(&proof),
        }),
        ClientFrame::KillAll,
        ClientFrame::Signal(1),
        ClientFrame::Resize(WindowSize::default()),
        ClientFrame::Cancel(Cancel { grace_ms: None }),
        ClientFrame::ExecPart(ExecPart {
            list: ListKind::Argv,
            data: Bytes(b""),
        }),
        ClientFrame::Put(PUT),
        ClientFrame::PutEnd(ByteArray([0; DIGEST_LEN])),
        ClientFrame::Get(GET),
        ClientFrame::Info,
        ClientFrame::Shutdown(ShutdownRequest {
            reboot: false,
            grace_ms: 0,
        }),
        ClientFrame::TimeSync(Timestamp::default()),
        ClientFrame::Reseed(Bytes(b"r")),
        ClientFrame::StartJob(JobStart { name: None }),
        ClientFrame::Jobs(JobQuery { user: None }),
        ClientFrame::Attach(ATTACH),
        ClientFrame::Wait(JOB),
        ClientFrame::Kill(KILL),
        ClientFrame::Remove(JOB),
    ];
    for (index, frame) in client.iter().enumerate() {
        assert_eq!(encode_client(frame)[HEADER_LEN], index as u8, "{frame:?}");
    }
    assert_eq!(client.len(), usize::from(CLIENT_VARIANTS));
    let hello = AgentHello {
        magic: MAGIC,
        min_version: MIN_PROTOCOL_VERSION,
        version: PROTOCOL_VERSION,
        agent_version: "",
        limits: Limits::CURRENT,
        nonce: ByteArray([0; NONCE_LEN]),
        security: Security::Authenticated,
        bounds: Bounds::default(),
    };
    let agent = [
        AgentFrame::Hello(hello),
        AgentFrame::Started(Started { pid: 1 }),
        AgentFrame::Stdout(crate::Output {
            at_us: 0,
            data: Bytes(b""),
        }),
        AgentFrame::Stderr(crate::Output {
            at_us: 0,
            data: Bytes(b""),
        }),
        AgentFrame::StdinCredit(1),
        AgentFrame::Exited(Termination {
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
        }),
        AgentFrame::Error(ErrorFrame {
            code: ErrorCode::Internal,
            errno: 0,
            message: "",
        }),
        AgentFrame::Ready(ReadyReport {
            cid: 0,
            init_started_us: 0,
            modules_us: 0,
            listening_us: 0,
            module_times: StrList::new(b""),
        }),
        AgentFrame::Authenticated(AgentProof {
            mac: ByteArray(proof),
        }),
        AgentFrame::Done(DoneReport { count: 0 }),
        AgentFrame::Keepalive,
        AgentFrame::OutputDropped(Dropped {
            stream: Stream::Stdout,
            bytes: 0,
        }),
        AgentFrame::FileReady(HEADER),
        AgentFrame::FileData(Bytes(b"")),
        AgentFrame::Skipped(Skipped {
            path: Bytes(b"x"),
            reason: SkipReason::Special,
        }),
        AgentFrame::FileDone(FileSummary {
            bytes: 0,
            sha256: ByteArray([0; DIGEST_LEN]),
        }),
        AgentFrame::SystemInfo(SYSTEM),
        AgentFrame::Mount(MOUNT),
        AgentFrame::Interface(INTERFACE),
        AgentFrame::ClockSet(Timestamp::default()),
        AgentFrame::Detached(JobStarted { id: 1, pid: 2 }),
        AgentFrame::Job(JOB_RECORD),
        AgentFrame::Attached(ATTACHED),
    ];
    for (index, frame) in agent.iter().enumerate() {
        assert_eq!(encode_agent(frame)[HEADER_LEN], index as u8, "{frame:?}");
    }
    assert_eq!(agent.len(), usize::from(AGENT_VARIANTS));
    // The security mode's byte, at the end of the hello's fixed part.
    for (index, security) in [Security::Authenticated, Security::Insecure]
        .into_iter()
        .enumerate()
    {
        let bytes = encode_agent(&AgentFrame::Hello(AgentHello { security, ..hello }));
        let at = HEADER_LEN + 1 + 4 + 1 + 1 + 1 + 31 + 1 + NONCE_LEN;
        assert_eq!(bytes[at], index as u8, "{security:?}");
    }
    // And the stdin modes (before the user and the five 1-byte defaults after it).
    for (index, stdin) in [StdinMode::Null, StdinMode::Pipe].into_iter().enumerate() {
        let exec = ExecRequest {
            stdin,
            ..exec_with(b"a\0", b"", None)
        };
        let bytes = encode_client(&ClientFrame::Exec(exec));
        assert_eq!(bytes[bytes.len() - 7], index as u8, "{stdin:?}");
    }
}

#[test]
fn data_in_place_matches_encoder() {
    // Every length-varint width, and timestamps of every varint width (output only).
    for len in [0usize, 1, 127, 128, 16383, 16384, MAX_DATA] {
        let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
        for at_us in [0u64, 1, 127, 128, 1 << 21, u64::from(u32::MAX), u64::MAX] {
            for (kind, agent_frame) in [
                (
                    DataKind::Stdout,
                    AgentFrame::Stdout(crate::Output {
                        at_us,
                        data: Bytes(&payload),
                    }),
                ),
                (
                    DataKind::Stderr,
                    AgentFrame::Stderr(crate::Output {
                        at_us,
                        data: Bytes(&payload),
                    }),
                ),
            ] {
                let mut buf = vec![0u8; DATA_HEADROOM + len];
                buf[DATA_HEADROOM..].copy_from_slice(&payload);
                let start = frame_data_in_place(&mut buf, kind, len, at_us).unwrap();
                assert_eq!(
                    buf[start..],
                    encode_agent(&agent_frame)[..],
                    "{kind:?} {len} at {at_us}"
                );
            }
            // File data has no timestamp either.
            let mut buf = vec![0u8; DATA_HEADROOM + len];
            buf[DATA_HEADROOM..].copy_from_slice(&payload);
            let start = frame_data_in_place(&mut buf, DataKind::FileData, len, at_us).unwrap();
            assert_eq!(
                buf[start..],
                encode_agent(&AgentFrame::FileData(Bytes(&payload)))[..]
            );
            // Stdin has no timestamp: whatever is passed, the frame is the encoder's.
            let mut buf = vec![0u8; DATA_HEADROOM + len];
            buf[DATA_HEADROOM..].copy_from_slice(&payload);
            let start = frame_data_in_place(&mut buf, DataKind::Stdin, len, at_us).unwrap();
            assert_eq!(
                buf[start..],
                encode_client(&ClientFrame::Stdin(Bytes(&payload)))[..]
            );
        }
    }
}

#[test]
fn data_limit_edges() {
    let mut buf = vec![0u8; DATA_HEADROOM + MAX_DATA + 1];
    assert!(frame_data_in_place(&mut buf, DataKind::Stdout, MAX_DATA, 0).is_ok());
    assert_eq!(
        frame_data_in_place(&mut buf, DataKind::Stdout, MAX_DATA + 1, 0),
        Err(EncodeError::TooLarge)
    );
    assert_eq!(
        frame_data_in_place(&mut buf[..DATA_HEADROOM + 9], DataKind::Stdout, 10, 0),
        Err(EncodeError::BufferTooSmall)
    );
}

#[test]
fn encode_refuses_oversized_and_short_buffers() {
    let big = vec![7u8; MAX_FRAME_BODY];
    let mut out = vec![0u8; MAX_FRAME + 64];
    assert_eq!(
        encode_agent_frame(
            &AgentFrame::Stdout(crate::Output {
                at_us: 0,
                data: Bytes(&big)
            }),
            &mut out
        ),
        Err(EncodeError::TooLarge)
    );
    let mut small = [0u8; 6];
    assert_eq!(
        encode_agent_frame(
            &AgentFrame::Stdout(crate::Output {
                at_us: 0,
                data: Bytes(b"abc")
            }),
            &mut small
        ),
        Err(EncodeError::BufferTooSmall)
    );
    assert_eq!(
        encode_client_frame(&ClientFrame::StdinEof, &mut [0u8; 3]),
        Err(EncodeError::BufferTooSmall)
    );
}

#[test]
fn split_frame_edges() {
    assert_eq!(split_frame(&[], MAX_FRAME_BODY), Ok(None));
    assert_eq!(split_frame(&[1, 0, 0], MAX_FRAME_BODY), Ok(None));
    assert_eq!(split_frame(&[1, 0, 0, 0], MAX_FRAME_BODY), Ok(None));
    assert_eq!(
        split_frame(&[1, 0, 0, 0, 9, 9], MAX_FRAME_BODY),
        Ok(Some((&[9u8][..], 5)))
    );
    let at_limit = (MAX_FRAME_BODY as u32).to_le_bytes();
    assert_eq!(split_frame(&at_limit, MAX_FRAME_BODY), Ok(None));
    let over = (MAX_FRAME_BODY as u32 + 1).to_le_bytes();
    assert_eq!(
        split_frame(&over, MAX_FRAME_BODY),
        Err(FrameTooLarge {
            declared: MAX_FRAME_BODY as u32 + 1
        })
    );
    assert_eq!(
        split_frame(&[11, 0, 0, 0], 10),
        Err(FrameTooLarge { declared: 11 })
    );
}

#[test]
fn negotiation() {
    assert_eq!(ClientHello::CURRENT.negotiate(), Some(PROTOCOL_VERSION));
    let future = ClientHello {
        magic: MAGIC,
        min_version: 1,
        max_version: 9,
    };
    assert_eq!(future.negotiate(), Some(PROTOCOL_VERSION));
    let too_new = ClientHello {
        magic: MAGIC,
        min_version: PROTOCOL_VERSION + 1,
        max_version: 9,
    };
    assert_eq!(too_new.negotiate(), None);
    // Protocol 1 (the client spoke first, no authentication) is no longer spoken.
    let too_old = ClientHello {
        magic: MAGIC,
        min_version: 1,
        max_version: 1,
    };
    assert_eq!(too_old.negotiate(), None);
    let inverted = ClientHello {
        magic: MAGIC,
        min_version: 2,
        max_version: 1,
    };
    assert_eq!(inverted.negotiate(), None);
    let stranger = ClientHello {
        magic: *b"HTTP",
        ..ClientHello::CURRENT
    };
    assert_eq!(stranger.negotiate(), None);
}

fn exec_with<'a>(argv: &'a [u8], env: &'a [u8], cwd: Option<&'a [u8]>) -> ExecRequest<'a> {
    ExecRequest {
        argv: StrList::new(argv),
        env: StrList::new(env),
        clean_env: false,
        cwd: cwd.map(Bytes),
        stdin: StdinMode::Null,
        user: None,
        pty: None,
        timeout_ms: 0,
        kill_grace_ms: None,
        kill_tree_on_exit: false,
        max_output: 0,
    }
}

fn packed(entry: &[u8], count: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..count {
        out.extend_from_slice(entry);
        out.push(0);
    }
    out
}

#[test]
fn exec_validation_rules() {
    let code = |r: Result<ValidExec<'_>, RequestError>| r.err().map(|e| e.code);
    assert_eq!(code(exec_with(b"true\0", b"", None).validate()), None);
    assert_eq!(
        code(exec_with(b"", b"", None).validate()),
        Some(ErrorCode::InvalidRequest)
    );
    assert_eq!(
        code(exec_with(b"\0", b"", None).validate()),
        Some(ErrorCode::InvalidRequest)
    );
    assert_eq!(
        code(exec_with(b"true", b"", None).validate()),
        Some(ErrorCode::InvalidRequest)
    );
    assert_eq!(
        code(exec_with(b"true\0", b"NOEQ\0", None).validate()),
        Some(ErrorCode::InvalidRequest)
    );
    assert_eq!(
        code(exec_with(b"true\0", b"=v\0", None).validate()),
        Some(ErrorCode::InvalidRequest)
    );
    assert_eq!(code(exec_with(b"true\0", b"K=\0", None).validate()), None);
    assert_eq!(
        code(exec_with(b"true\0", b"", Some(b"")).validate()),
        Some(ErrorCode::InvalidRequest)
    );
    assert_eq!(
        code(exec_with(b"true\0", b"", Some(b"/a\0b")).validate()),
        Some(ErrorCode::InvalidRequest)
    );
    // Empty arguments after argv[0] are legitimate.
    assert_eq!(code(exec_with(b"echo\0\0\0", b"", None).validate()), None);
}

#[test]
fn exec_limits_at_their_edges() {
    let code = |r: Result<ValidExec<'_>, RequestError>| r.err().map(|e| e.code);
    // MAX_ARGS entries of one byte plus NUL: both the count and the byte limit hold exactly.
    let at_count = packed(b"a", MAX_ARGS);
    assert_eq!(code(exec_with(&at_count, b"", None).validate()), None);
    let over_count = packed(b"a", MAX_ARGS + 1);
    assert_eq!(
        code(exec_with(&over_count, b"", None).validate()),
        Some(ErrorCode::LimitExceeded)
    );
    // Entries of MAX_ARG_LEN bytes with their NULs, MAX_ARGV_BYTES in all, then one byte more.
    let at_bytes = packed(&vec![b'x'; MAX_ARG_LEN - 1], MAX_ARGV_BYTES / MAX_ARG_LEN);
    assert_eq!(at_bytes.len(), MAX_ARGV_BYTES);
    assert_eq!(code(exec_with(&at_bytes, b"", None).validate()), None);
    let over_bytes = [at_bytes.as_slice(), b"\0"].concat();
    assert_eq!(
        code(exec_with(&over_bytes, b"", None).validate()),
        Some(ErrorCode::LimitExceeded)
    );
    // One entry of MAX_ARG_LEN with its NUL, then one byte longer.
    let at_entry = packed(&vec![b'x'; MAX_ARG_LEN - 1], 1);
    assert_eq!(code(exec_with(&at_entry, b"", None).validate()), None);
    let over_entry = packed(&vec![b'x'; MAX_ARG_LEN], 1);
    assert_eq!(
        code(exec_with(&over_entry, b"", None).validate()),
        Some(ErrorCode::LimitExceeded)
    );
    let env_at = packed(b"K=", MAX_ENV_VARS);
    assert_eq!(code(exec_with(b"a\0", &env_at, None).validate()), None);
    let env_over = packed(b"K=", MAX_ENV_VARS + 1);
    assert_eq!(
        code(exec_with(b"a\0", &env_over, None).validate()),
        Some(ErrorCode::LimitExceeded)
    );
    let env_entry = [b"K=".as_slice(), &vec![b'v'; MAX_ARG_LEN - 3]].concat();
    let env_bytes_at = packed(&env_entry, MAX_ENV_BYTES / MAX_ARG_LEN);
    assert_eq!(env_bytes_at.len(), MAX_ENV_BYTES);
    assert_eq!(
        code(exec_with(b"a\0", &env_bytes_at, None).validate()),
        None
    );
    let env_bytes_over = [env_bytes_at.as_slice(), b"K=\0"].concat();
    assert_eq!(
        code(exec_with(b"a\0", &env_bytes_over, None).validate()),
        Some(ErrorCode::LimitExceeded)
    );
    let cwd_at = vec![b'd'; MAX_PATH];
    assert_eq!(code(exec_with(b"a\0", b"", Some(&cwd_at)).validate()), None);
    let cwd_over = vec![b'd'; MAX_PATH + 1];
    assert_eq!(
        code(exec_with(b"a\0", b"", Some(&cwd_over)).validate()),
        Some(ErrorCode::LimitExceeded)
    );
}

/// The largest exec frame (its lists at the inline bound, every other field at its largest)
/// must fit in one frame, or the limits contradict each other.
#[test]
fn largest_exec_frame_fits_a_frame() {
    let argv = packed(&vec![b'x'; MAX_INLINE_LIST - 1], 1);
    let env = packed(
        &[b"K=".as_slice(), &vec![b'v'; MAX_INLINE_LIST - 3]].concat(),
        1,
    );
    let cwd = vec![b'd'; MAX_PATH];
    let user = vec![b'u'; MAX_USER];
    let exec = ExecRequest {
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
    assert!(exec.validate().is_ok());
    let bytes = encode_client(&ClientFrame::Exec(exec));
    assert!(bytes.len() <= MAX_FRAME);
    // And the largest piece of a list.
    let piece = vec![b'x'; MAX_DATA];
    let part = ClientFrame::ExecPart(ExecPart {
        list: ListKind::Argv,
        data: Bytes(&piece),
    });
    assert!(encode_client(&part).len() <= MAX_FRAME);
    // And the largest output chunk, at the latest time.
    let chunk = AgentFrame::Stdout(Output {
        at_us: u64::MAX,
        data: Bytes(&piece),
    });
    assert_eq!(encode_agent(&chunk).len(), DATA_HEADROOM + MAX_DATA);
}

/// A list checked in pieces cut anywhere gives the answer of the whole list.
#[test]
fn list_checks_in_pieces_agree_with_the_whole() {
    let lists: [(&[u8], ListKind); 8] = [
        (b"ls\0-l\0\0x\0", ListKind::Argv),
        (b"\0a\0", ListKind::Argv),
        (b"ls", ListKind::Argv),
        (b"", ListKind::Argv),
        (b"A=1\0B==\0", ListKind::Env),
        (b"A=1\0=B\0", ListKind::Env),
        (b"AB\0", ListKind::Env),
        (b"A\0=\0", ListKind::Env),
    ];
    for (list, kind) in lists {
        let whole = {
            let mut check = ListCheck::new(kind, &Limits::CURRENT);
            check.feed(list).and_then(|()| check.finish())
        };
        for cut_a in 0..=list.len() {
            for cut_b in cut_a..=list.len() {
                let mut check = ListCheck::new(kind, &Limits::CURRENT);
                let result = check
                    .feed(&list[..cut_a])
                    .and_then(|()| check.feed(&list[cut_a..cut_b]))
                    .and_then(|()| check.feed(&list[cut_b..]))
                    .and_then(|()| check.finish());
                assert_eq!(
                    result.is_ok(),
                    whole.is_ok(),
                    "{list:?} cut at {cut_a}, {cut_b}"
                );
            }
        }
    }
}

#[test]
fn exec_user_rules_and_limit() {
    let code = |r: Result<ValidExec<'_>, RequestError>| r.err().map(|e| e.code);
    let with_user = |user: &'static [u8]| ExecRequest {
        user: Some(Bytes(user)),
        pty: None,
        timeout_ms: 0,
        kill_grace_ms: None,
        kill_tree_on_exit: false,
        max_output: 0,
        ..exec_with(b"id\0", b"", None)
    };
    assert_eq!(code(with_user(b"nobody").validate()), None);
    assert_eq!(code(with_user(b"1000:1000").validate()), None);
    assert_eq!(
        code(with_user(b"").validate()),
        Some(ErrorCode::InvalidRequest)
    );
    assert_eq!(
        code(with_user(b"ro\0ot").validate()),
        Some(ErrorCode::InvalidRequest)
    );
    let at = vec![b'u'; MAX_USER];
    let over = vec![b'u'; MAX_USER + 1];
    let exec = |user: &[u8]| {
        code(
            ExecRequest {
                user: Some(Bytes(user)),
                pty: None,
                timeout_ms: 0,
                kill_grace_ms: None,
                kill_tree_on_exit: false,
                max_output: 0,
                ..exec_with(b"id\0", b"", None)
            }
            .validate(),
        )
    };
    assert_eq!(exec(&at), None);
    assert_eq!(exec(&over), Some(ErrorCode::LimitExceeded));
    // An agent that announces a tighter bound enforces it.
    let tight = Limits {
        max_user: 4,
        ..Limits::CURRENT
    };
    let five = ExecRequest {
        user: Some(Bytes(b"users")),
        pty: None,
        timeout_ms: 0,
        kill_grace_ms: None,
        kill_tree_on_exit: false,
        max_output: 0,
        ..exec_with(b"id\0", b"", None)
    };
    assert_eq!(
        five.validate_within(&tight).err().map(|e| e.code),
        Some(ErrorCode::LimitExceeded)
    );
}

#[test]
fn str_list_entries() {
    let list = StrList::new(b"a\0\0bc\0");
    assert_eq!(list.entries().collect::<Vec<_>>(), [&b"a"[..], b"", b"bc"]);
    assert_eq!(
        list.entries_with_nul().collect::<Vec<_>>(),
        [&b"a\0"[..], b"\0", b"bc\0"]
    );
    assert_eq!(list.len(), 3);
    assert!(StrList::new(b"").is_empty());
}

#[test]
fn shell_codes() {
    assert_eq!(ExitStatus::Code(0).shell_code(), 0);
    assert_eq!(ExitStatus::Code(255).shell_code(), 255);
    assert_eq!(
        ExitStatus::Signal {
            number: 9,
            core_dumped: false
        }
        .shell_code(),
        137
    );
    assert_eq!(
        ExitStatus::Signal {
            number: 200,
            core_dumped: false
        }
        .shell_code(),
        255
    );
}

fn arb_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..300)
}

fn arb_error_code() -> impl Strategy<Value = ErrorCode> {
    (0u8..17).prop_map(|i| {
        let body = [0x06, i, 0, 0];
        match decode_agent_frame(&body) {
            Ok(AgentFrame::Error(e)) => e.code,
            other => panic!("{other:?}"),
        }
    })
}

fn arb_window() -> impl Strategy<Value = Option<WindowSize>> {
    prop::option::of(
        (any::<u16>(), any::<u16>()).prop_map(|(rows, cols)| WindowSize { rows, cols }),
    )
}

fn arb_ending() -> impl Strategy<Value = Ending> {
    prop_oneof![
        Just(Ending::Exited),
        Just(Ending::TimedOut),
        Just(Ending::Cancelled),
        Just(Ending::RuntimeLimit),
        Just(Ending::OutputLimit),
    ]
}

fn arb_tree_kill() -> impl Strategy<Value = TreeKill> {
    prop_oneof![
        Just(TreeKill::None),
        Just(TreeKill::Cgroup),
        Just(TreeKill::ProcessGroup),
    ]
}

fn arb_record() -> impl Strategy<Value = StreamRecord> {
    (any::<u64>(), any::<u64>()).prop_map(|(bytes, dropped)| StreamRecord { bytes, dropped })
}

/// The fields a request gained in protocol 3.
#[derive(Debug, Clone, Copy)]
struct ExecExtras {
    pty: Option<WindowSize>,
    timeout_ms: u64,
    kill_grace_ms: Option<u32>,
    kill_tree_on_exit: bool,
    max_output: u64,
}

fn arb_exec_extras() -> impl Strategy<Value = ExecExtras> {
    (
        arb_window(),
        any::<u64>(),
        any::<Option<u32>>(),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(pty, timeout_ms, kill_grace_ms, kill_tree_on_exit, max_output)| ExecExtras {
                pty,
                timeout_ms,
                kill_grace_ms,
                kill_tree_on_exit,
                max_output,
            },
        )
}

/// What a termination record carries beyond the status, the duration and the dropped flag.
#[derive(Debug, Clone, Copy)]
struct EndExtras {
    ending: Ending,
    tree_kill: TreeKill,
    stdout: StreamRecord,
    stderr: StreamRecord,
    pipes_held: bool,
    oom_killed: bool,
    peak_memory: u64,
}

fn arb_end_extras() -> impl Strategy<Value = EndExtras> {
    (
        arb_ending(),
        arb_tree_kill(),
        arb_record(),
        arb_record(),
        any::<(bool, bool)>(),
        any::<u64>(),
    )
        .prop_map(
            |(ending, tree_kill, stdout, stderr, (pipes_held, oom_killed), peak_memory)| {
                EndExtras {
                    ending,
                    tree_kill,
                    stdout,
                    stderr,
                    pipes_held,
                    oom_killed,
                    peak_memory,
                }
            },
        )
}

proptest! {
    #[test]
    fn client_frames_round_trip(
        which in 0u8..10, a in arb_bytes(), b in arb_bytes(), c in arb_bytes(),
        v1 in any::<u16>(), v2 in any::<u16>(), flag in any::<bool>(), has_cwd in any::<bool>(),
        has_user in any::<bool>(), nonce in any::<[u8; NONCE_LEN]>(), extras in arb_exec_extras(),
        small in any::<u8>(), grace in any::<Option<u32>>()
    ) {
        let frame = match which {
            0 => ClientFrame::Hello(ClientHello { magic: MAGIC, min_version: v1, max_version: v2 }),
            1 => ClientFrame::Exec(ExecRequest {
                argv: StrList::new(&a), env: StrList::new(&b), clean_env: flag,
                cwd: has_cwd.then_some(Bytes(&c)),
                stdin: if flag { StdinMode::Pipe } else { StdinMode::Null },
                user: has_user.then_some(Bytes(&b)),
                pty: extras.pty,
                timeout_ms: extras.timeout_ms,
                kill_grace_ms: extras.kill_grace_ms,
                kill_tree_on_exit: extras.kill_tree_on_exit,
                max_output: extras.max_output,
            }),
            2 => ClientFrame::Stdin(Bytes(&a)),
            3 => ClientFrame::StdinEof,
            4 => ClientFrame::Auth(ClientProof { nonce: ByteArray(nonce), mac: Bytes(&c) }),
            5 => ClientFrame::KillAll,
            6 => ClientFrame::Signal(small),
            7 => ClientFrame::Resize(WindowSize { rows: v1, cols: v2 }),
            8 => ClientFrame::Cancel(Cancel { grace_ms: grace }),
            _ => ClientFrame::ExecPart(ExecPart {
                list: if flag { ListKind::Env } else { ListKind::Argv },
                data: Bytes(&a),
            }),
        };
        let bytes = encode_client(&frame);
        let (body, used) = split_frame(&bytes, MAX_FRAME_BODY).unwrap().unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(decode_client_frame(body), Ok(frame));
    }

    #[test]
    fn agent_frames_round_trip(
        which in 0u8..12, a in arb_bytes(), s in "[a-z .]{0,32}", n in any::<u32>(),
        big in any::<u64>(), small in any::<u8>(), flag in any::<bool>(), code in arb_error_code(),
        nonce in any::<[u8; NONCE_LEN]>(), extras in arb_end_extras()
    ) {
        let frame = match which {
            0 => AgentFrame::Hello(AgentHello {
                magic: MAGIC, min_version: small as u16, version: n as u16, agent_version: &s,
                limits: Limits { max_user: n, keepalive_ms: n / 3, idle_ms: n / 7, ..Limits::CURRENT },
                nonce: ByteArray(nonce),
                security: if flag { Security::Authenticated } else { Security::Insecure },
                bounds: Bounds {
                    max_runtime_s: big, max_output: big / 2, max_file_size: big / 3,
                    max_connections: n, handshake_timeout_ms: n / 2, memory_max: big / 5,
                    pids_max: n / 3, cgroup: flag, default_uid: n / 5, default_gid: n / 7,
                },
            }),
            1 => AgentFrame::Started(Started { pid: n }),
            2 => AgentFrame::Stdout(crate::Output { at_us: big, data: Bytes(&a) }),
            3 => AgentFrame::Stderr(crate::Output { at_us: big / 3, data: Bytes(&a) }),
            4 => AgentFrame::StdinCredit(n),
            5 => AgentFrame::Exited(Termination {
                status: if flag { ExitStatus::Code(small) }
                        else { ExitStatus::Signal { number: small, core_dumped: n % 2 == 0 } },
                duration_us: big,
                output_dropped: flag,
                ending: extras.ending,
                tree_kill: extras.tree_kill,
                stdout: extras.stdout,
                stderr: extras.stderr,
                pipes_held: extras.pipes_held,
                oom_killed: extras.oom_killed,
                peak_memory: extras.peak_memory,
            }),
            6 => AgentFrame::Error(ErrorFrame { code, errno: n, message: &s }),
            7 => AgentFrame::Ready(ReadyReport {
                cid: n, init_started_us: big, modules_us: big / 2, listening_us: big / 3,
                module_times: StrList::new(b"m=1\0"),
            }),
            8 => AgentFrame::Authenticated(AgentProof { mac: ByteArray(nonce) }),
            9 => AgentFrame::Done(DoneReport { count: n }),
            10 => AgentFrame::Keepalive,
            _ => AgentFrame::OutputDropped(Dropped {
                stream: if flag { Stream::Stderr } else { Stream::Stdout },
                bytes: big,
            }),
        };
        let bytes = encode_agent(&frame);
        let (body, used) = split_frame(&bytes, MAX_FRAME_BODY).unwrap().unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(decode_agent_frame(body), Ok(frame));
    }

    /// The decoders are total: any bytes give a frame or an error, never a panic.
    #[test]
    fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_client_frame(&bytes);
        let _ = decode_agent_frame(&bytes);
        if let Ok(ClientFrame::Exec(exec)) = decode_client_frame(&bytes) {
            let _ = exec.validate();
        }
        let _ = split_frame(&bytes, MAX_FRAME_BODY);
    }

    /// Every tag byte beyond the last variant is refused, not misread. (Protocol 4 has
    /// seventeen client variants and twenty agent ones: `[13]` is an info request and `[10]` a
    /// keepalive.)
    #[test]
    fn unknown_tags_are_malformed(tag in CLIENT_VARIANTS..=255, rest in arb_bytes()) {
        let mut body = vec![tag];
        body.extend(rest);
        prop_assert!(decode_client_frame(&body).is_err());
        if tag >= AGENT_VARIANTS {
            prop_assert!(decode_agent_frame(&body).is_err());
        }
    }
}

/// How many variants each frame enum has (`variant_tags_are_pinned` lists them all).
const CLIENT_VARIANTS: u8 = 23;
const AGENT_VARIANTS: u8 = 23;

const PUT: PutRequest<'static> = PutRequest {
    path: Bytes(b"/tmp/f"),
    kind: TransferKind::File,
    mode: Some(0o640),
    owner: None,
    mtime: Some(Timestamp {
        secs: 1_000_000_000,
        nanos: 5,
    }),
    size: Some(3),
    create_parents: true,
    no_clobber: false,
    user: Some(Bytes(b"app")),
};

const GET: GetRequest<'static> = GetRequest {
    path: Bytes(b"/etc/x"),
    kind: TransferKind::Tree,
    user: None,
};

const HEADER: FileHeader = FileHeader {
    size: 300,
    mode: 0o100644,
    mtime: Timestamp { secs: -1, nanos: 0 },
    uid: 0,
    gid: 65534,
};

const SYSTEM: SystemInfo<'static> = SystemInfo {
    kernel_release: "6.1",
    kernel_version: "#1",
    machine: "x86_64",
    hostname: "vm",
    uptime_ms: 1500,
    now: Timestamp {
        secs: 1_700_000_000,
        nanos: 0,
    },
    cpus: 2,
    cpu_model: "cpu",
    load: [1, 20, 300],
    memory_total: 1 << 30,
    memory_available: 1 << 29,
    processes: 3,
    agent_pid: 1,
    agent_rss: 160 << 10,
};

const MOUNT: MountInfo<'static> = MountInfo {
    source: Bytes(b"tmpfs"),
    target: Bytes(b"/tmp"),
    fstype: "tmpfs",
    read_only: false,
    total: 4096,
    free: 2048,
    available: 1024,
};

const INTERFACE: InterfaceInfo<'static> = InterfaceInfo {
    name: "lo",
    up: true,
    mtu: 65536,
    mac: Bytes(&[0; 6]),
    addresses: StrList::new(b"127.0.0.1/8\0"),
    rx_bytes: 7,
    tx_bytes: 8,
};

#[rustfmt::skip]
#[test]
fn golden_put_and_its_end() {
    golden_client(ClientFrame::Put(PUT), &[
        29, 0, 0, 0,                        // body length
        0x0A,                               // ClientFrame::Put
        6, b'/', b't', b'm', b'p', b'/', b'f', // path
        0x00,                               // kind: File
        0x01, 0xA0, 0x03,                   // mode: Some(0o640)
        0x00,                               // owner: None
        0x01, 0x80, 0xA8, 0xD6, 0xB9, 0x07, 0x05, // mtime: Some(1e9 s zigzag, 5 ns)
        0x01, 0x03,                         // size: Some(3)
        0x01,                               // create_parents
        0x00,                               // no_clobber
        0x01, 3, b'a', b'p', b'p',          // user: Some("app")
    ]);
    let mut end = vec![34, 0, 0, 0, 0x0B, 32];
    end.extend_from_slice(&[0xAB; DIGEST_LEN]);
    golden_client(ClientFrame::PutEnd(ByteArray([0xAB; DIGEST_LEN])), &end);
}

#[rustfmt::skip]
#[test]
fn golden_get_info_and_the_privileged_operations() {
    golden_client(ClientFrame::Get(GET), &[
        10, 0, 0, 0,                        // body length
        0x0C,                               // ClientFrame::Get
        6, b'/', b'e', b't', b'c', b'/', b'x', // path
        0x01,                               // kind: Tree
        0x00,                               // user: None
    ]);
    golden_client(ClientFrame::Info, &[1, 0, 0, 0, 0x0D]);
    golden_client(ClientFrame::Shutdown(ShutdownRequest { reboot: true, grace_ms: 5000 }), &[
        4, 0, 0, 0,
        0x0E,                               // ClientFrame::Shutdown
        0x01,                               // reboot
        0x88, 0x27,                         // grace_ms: 5000
    ]);
    golden_client(ClientFrame::TimeSync(Timestamp { secs: -2, nanos: 999_999_999 }), &[
        7, 0, 0, 0,
        0x0F,                               // ClientFrame::TimeSync
        0x03,                               // secs: -2 (zigzag)
        0xFF, 0x93, 0xEB, 0xDC, 0x03,       // nanos: 999_999_999
    ]);
    golden_client(ClientFrame::Reseed(Bytes(&[1, 2, 3])), &[
        5, 0, 0, 0, 0x10, 3, 1, 2, 3,
    ]);
}

#[rustfmt::skip]
#[test]
fn golden_transfer_frames() {
    golden_agent(AgentFrame::FileReady(HEADER), &[
        12, 0, 0, 0,                        // body length
        0x0C,                               // AgentFrame::FileReady
        0xAC, 0x02,                         // size: 300
        0xA4, 0x83, 0x02,                   // mode: 0o100644
        0x01, 0x00,                         // mtime: -1 s (zigzag), 0 ns
        0x00,                               // uid: 0
        0xFE, 0xFF, 0x03,                   // gid: 65534
    ]);
    golden_agent(AgentFrame::FileData(Bytes(b"ab")), &[4, 0, 0, 0, 0x0D, 2, b'a', b'b']);
    golden_agent(AgentFrame::Skipped(Skipped { path: Bytes(b"d/fifo"), reason: SkipReason::Special }), &[
        9, 0, 0, 0,
        0x0E,                               // AgentFrame::Skipped
        6, b'd', b'/', b'f', b'i', b'f', b'o',
        0x00,                               // SkipReason::Special
    ]);
    // Every reason's byte: the enum is append-only.
    for (reason, byte) in [
        (SkipReason::Special, 0),
        (SkipReason::HardLink, 1),
        (SkipReason::UnknownType, 2),
        (SkipReason::Unreadable, 3),
    ] {
        golden_agent(AgentFrame::Skipped(Skipped { path: Bytes(b"x"), reason }), &[4, 0, 0, 0, 0x0E, 1, b'x', byte]);
    }
    let mut done = vec![37, 0, 0, 0, 0x0F, 0x80, 0x80, 0x04, 32];
    done.extend_from_slice(&[0x11; DIGEST_LEN]);
    golden_agent(AgentFrame::FileDone(FileSummary { bytes: 65536, sha256: ByteArray([0x11; DIGEST_LEN]) }), &done);
    golden_agent(AgentFrame::ClockSet(Timestamp { secs: 978_307_200, nanos: 1 }), &[
        7, 0, 0, 0,
        0x13,                               // AgentFrame::ClockSet
        0x80, 0xA2, 0xFE, 0xA4, 0x07,       // secs: 978307200 (zigzag)
        0x01,                               // nanos
    ]);
}

#[rustfmt::skip]
#[test]
fn golden_info_frames() {
    golden_agent(AgentFrame::Mount(MOUNT), &[
        25, 0, 0, 0,                        // body length
        0x11,                               // AgentFrame::Mount
        5, b't', b'm', b'p', b'f', b's',    // source
        4, b'/', b't', b'm', b'p',          // target
        5, b't', b'm', b'p', b'f', b's',    // fstype
        0x00,                               // read_only
        0x80, 0x20,                         // total: 4096
        0x80, 0x10,                         // free: 2048
        0x80, 0x08,                         // available: 1024
    ]);
    golden_agent(AgentFrame::Interface(INTERFACE), &[
        30, 0, 0, 0,                        // body length
        0x12,                               // AgentFrame::Interface
        2, b'l', b'o',                      // name
        0x01,                               // up
        0x80, 0x80, 0x04,                   // mtu: 65536
        6, 0, 0, 0, 0, 0, 0,                // mac
        12, b'1', b'2', b'7', b'.', b'0', b'.', b'0', b'.', b'1', b'/', b'8', 0, // addresses
        0x07,                               // rx_bytes
        0x08,                               // tx_bytes
    ]);
    let info = encode_agent(&AgentFrame::SystemInfo(SYSTEM));
    assert_eq!(info[HEADER_LEN], 0x10, "AgentFrame::SystemInfo");
    let (body, _) = split_frame(&info, MAX_FRAME_BODY).unwrap().unwrap();
    assert_eq!(decode_agent_frame(body), Ok(AgentFrame::SystemInfo(SYSTEM)));
}

/// The requests beyond exec are validated alike on both sides: each rule at its edge.
#[test]
fn transfer_requests_are_validated_at_their_edges() {
    let limits = Limits::CURRENT;
    assert!(PUT.validate_within(&limits).is_ok());
    let long = vec![b'/'; MAX_PATH];
    let put = |request: PutRequest<'_>| request.validate_within(&limits).map_err(|e| e.code);
    assert_eq!(
        put(PutRequest {
            path: Bytes(&long),
            ..PUT
        }),
        Ok(())
    );
    let longer = vec![b'/'; MAX_PATH + 1];
    assert_eq!(
        put(PutRequest {
            path: Bytes(&longer),
            ..PUT
        }),
        Err(ErrorCode::LimitExceeded)
    );
    assert_eq!(
        put(PutRequest {
            path: Bytes(b"rel/x"),
            ..PUT
        }),
        Err(ErrorCode::InvalidRequest)
    );
    assert_eq!(
        put(PutRequest {
            path: Bytes(b""),
            ..PUT
        }),
        Err(ErrorCode::InvalidRequest)
    );
    assert_eq!(
        put(PutRequest {
            path: Bytes(b"/a\0b"),
            ..PUT
        }),
        Err(ErrorCode::InvalidRequest)
    );
    assert_eq!(
        put(PutRequest {
            mode: Some(0o7777),
            ..PUT
        }),
        Ok(())
    );
    assert_eq!(
        put(PutRequest {
            mode: Some(0o10000),
            ..PUT
        }),
        Err(ErrorCode::InvalidRequest)
    );
    let nanos = |nanos| Timestamp { secs: 0, nanos };
    assert_eq!(
        put(PutRequest {
            mtime: Some(nanos(999_999_999)),
            ..PUT
        }),
        Ok(())
    );
    assert_eq!(
        put(PutRequest {
            mtime: Some(nanos(1_000_000_000)),
            ..PUT
        }),
        Err(ErrorCode::InvalidRequest)
    );
    let user = [b'u'; MAX_USER];
    assert_eq!(
        put(PutRequest {
            owner: Some(Bytes(&user)),
            ..PUT
        }),
        Ok(())
    );
    let longer_user = [b'u'; MAX_USER + 1];
    assert_eq!(
        put(PutRequest {
            owner: Some(Bytes(&longer_user)),
            ..PUT
        }),
        Err(ErrorCode::LimitExceeded)
    );
    assert_eq!(
        put(PutRequest {
            user: Some(Bytes(b"")),
            ..PUT
        }),
        Err(ErrorCode::InvalidRequest)
    );
    assert_eq!(
        put(PutRequest {
            kind: TransferKind::Tree,
            size: None,
            mode: None,
            ..PUT
        }),
        Ok(())
    );
    assert_eq!(
        put(PutRequest {
            kind: TransferKind::Tree,
            mode: None,
            ..PUT
        }),
        Err(ErrorCode::InvalidRequest),
        "a tree carries its own sizes"
    );
    assert_eq!(
        put(PutRequest {
            kind: TransferKind::Tree,
            size: None,
            owner: None,
            ..PUT
        }),
        Ok(()),
        "a tree's mode is its directory's"
    );
    assert_eq!(
        put(PutRequest {
            kind: TransferKind::Tree,
            size: None,
            mode: None,
            owner: Some(Bytes(b"app")),
            ..PUT
        }),
        Err(ErrorCode::InvalidRequest),
        "a tree's entries are the user's"
    );
    assert!(GET.validate_within(&limits).is_ok());
    let get = GetRequest {
        path: Bytes(b"etc"),
        ..GET
    };
    assert_eq!(
        get.validate_within(&limits).map_err(|e| e.code),
        Err(ErrorCode::InvalidRequest)
    );
    let shutdown = |grace_ms| {
        ShutdownRequest {
            reboot: false,
            grace_ms,
        }
        .validate()
        .map_err(|e| e.code)
    };
    assert_eq!(shutdown(MAX_SHUTDOWN_GRACE_MS), Ok(()));
    assert_eq!(
        shutdown(MAX_SHUTDOWN_GRACE_MS + 1),
        Err(ErrorCode::LimitExceeded)
    );
}

/// What postcard itself makes of a client frame body: the frame, or why not.
fn postcard_client_frame(body: &[u8]) -> Result<ClientFrame<'_>, DecodeError> {
    match postcard::take_from_bytes::<ClientFrame<'_>>(body) {
        Ok((frame, [])) => Ok(frame),
        Ok(_) => Err(DecodeError::TrailingBytes),
        Err(_) => Err(DecodeError::Malformed),
    }
}

/// Bodies of every client frame with each optional part both ways, integers at their edges.
fn client_bodies() -> Vec<Vec<u8>> {
    let proof = [7u8; MAC_LEN];
    let mut put_all = PUT;
    put_all.mode = Some(u32::MAX);
    put_all.owner = Some(Bytes(b"root:root"));
    put_all.mtime = Some(Timestamp {
        secs: i64::MIN,
        nanos: 999_999_999,
    });
    put_all.size = Some(u64::MAX);
    put_all.create_parents = true;
    put_all.user = Some(Bytes(b"nobody"));
    let mut put_none = PUT;
    put_none.mode = None;
    put_none.owner = None;
    put_none.mtime = None;
    put_none.size = None;
    let mut exec = exec_with(b"sh\0-c\0x\0", b"A=1\0", Some(b"/tmp"));
    exec.user = Some(Bytes(b"1:2"));
    exec.pty = Some(WindowSize {
        rows: u16::MAX,
        cols: 80,
    });
    exec.timeout_ms = u64::MAX;
    exec.kill_grace_ms = Some(u32::MAX);
    exec.kill_tree_on_exit = true;
    exec.clean_env = true;
    exec.stdin = StdinMode::Pipe;
    exec.max_output = 1 << 40;
    let frames = [
        ClientFrame::Hello(ClientHello::CURRENT),
        ClientFrame::Exec(exec_with(b"a\0", b"", None)),
        ClientFrame::Exec(exec),
        ClientFrame::Stdin(Bytes(&[0x80; 200])),
        ClientFrame::StdinEof,
        ClientFrame::Auth(ClientProof {
            nonce: ByteArray([9; NONCE_LEN]),
            mac: Bytes(&proof),
        }),
        ClientFrame::KillAll,
        ClientFrame::Signal(255),
        ClientFrame::Resize(WindowSize { rows: 1, cols: 300 }),
        ClientFrame::Cancel(Cancel { grace_ms: None }),
        ClientFrame::Cancel(Cancel {
            grace_ms: Some(1 << 28),
        }),
        ClientFrame::ExecPart(ExecPart {
            list: ListKind::Env,
            data: Bytes(b"B=2\0"),
        }),
        ClientFrame::Put(PUT),
        ClientFrame::Put(put_all),
        ClientFrame::Put(put_none),
        ClientFrame::PutEnd(ByteArray([0xab; DIGEST_LEN])),
        ClientFrame::Get(GET),
        ClientFrame::Get(GetRequest {
            path: Bytes(b"/"),
            kind: TransferKind::File,
            user: Some(Bytes(b"u")),
        }),
        ClientFrame::Info,
        ClientFrame::Shutdown(ShutdownRequest {
            reboot: true,
            grace_ms: u32::MAX,
        }),
        ClientFrame::TimeSync(Timestamp { secs: -1, nanos: 0 }),
        ClientFrame::TimeSync(Timestamp {
            secs: i64::MAX,
            nanos: u32::MAX,
        }),
        ClientFrame::Reseed(Bytes(b"r")),
        ClientFrame::StartJob(JobStart { name: None }),
        ClientFrame::StartJob(JobStart {
            name: Some(Bytes(b"web")),
        }),
        ClientFrame::Jobs(JobQuery { user: None }),
        ClientFrame::Jobs(JobQuery {
            user: Some(Bytes(b"root")),
        }),
        ClientFrame::Attach(ATTACH),
        ClientFrame::Attach(AttachRequest {
            job: Bytes(b"4294967295"),
            user: Some(Bytes(b"0:0")),
            since_stdout: u64::MAX,
            since_stderr: 1 << 35,
            follow: false,
            stdin: true,
        }),
        ClientFrame::Wait(JOB),
        ClientFrame::Kill(KILL),
        ClientFrame::Kill(KillJob {
            job: Bytes(b"x"),
            user: Some(Bytes(b"u")),
            signal: 255,
            grace_ms: Some(u32::MAX),
        }),
        ClientFrame::Remove(JobRequest {
            job: Bytes(b"17"),
            user: Some(Bytes(b"nobody")),
        }),
    ];
    frames
        .iter()
        .map(|frame| encode_client(frame)[HEADER_LEN..].to_vec())
        .collect()
}

/// The hand-written client frame decoder (`decode.rs`) accepts, refuses and decodes exactly as
/// postcard does: every variant, each cut short at every length, each byte replaced by the
/// values varints, booleans, options and tags turn on, and bytes appended.
#[test]
fn hand_decoder_matches_postcard() {
    let mut checked = 0;
    for body in client_bodies() {
        assert_eq!(decode_client_frame(&body), postcard_client_frame(&body));
        assert!(decode_client_frame(&body).is_ok());
        for len in 0..body.len() {
            let cut = &body[..len];
            assert_eq!(
                decode_client_frame(cut),
                postcard_client_frame(cut),
                "{cut:?}"
            );
        }
        for at in 0..body.len() {
            for value in [0, 1, 2, 3, 4, 15, 16, 17, 0x7f, 0x80, 0x81, 0xfe, 0xff] {
                let mut mutated = body.clone();
                mutated[at] = value;
                assert_eq!(
                    decode_client_frame(&mutated),
                    postcard_client_frame(&mutated),
                    "{mutated:?}"
                );
                mutated.push(0);
                assert_eq!(
                    decode_client_frame(&mutated),
                    postcard_client_frame(&mutated)
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 1000);
    // Varints at and past their types' edges, in every integer position of a few frames.
    let over = |tag: u8, varint: &[u8]| [&[tag][..], varint].concat();
    for varint in [
        &[0xff, 0xff, 0x03][..],
        &[0xff, 0xff, 0x04],
        &[0xff, 0xff, 0xff, 0xff, 0x0f],
        &[0xff, 0xff, 0xff, 0xff, 0x10],
        &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
        &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02],
        &[
            0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00,
        ],
        &[0x80, 0x00],
    ] {
        for body in [
            over(7, &[varint, &[1]].concat()),
            over(8, &[&[1], varint].concat()),
            over(14, &[&[0], varint].concat()),
            over(15, &[varint, &[0]].concat()),
            over(15, &[&[0], varint].concat()),
            over(2, varint),
            [varint, &[0]].concat(),
        ] {
            assert_eq!(
                decode_client_frame(&body),
                postcard_client_frame(&body),
                "{body:?}"
            );
        }
    }
}

proptest! {
    /// Any bytes after any tag: the same answer from both decoders.
    #[test]
    fn hand_decoder_matches_postcard_on_garbage(
        tag in 0u8..20, rest in proptest::collection::vec(any::<u8>(), 0..96)
    ) {
        let body = [&[tag][..], &rest].concat();
        prop_assert_eq!(decode_client_frame(&body), postcard_client_frame(&body));
    }
}

/// What postcard itself writes for an agent frame: the length prefix and its body, or `None`
/// when it does not fit `len` bytes.
fn postcard_agent_frame(frame: &AgentFrame<'_>, len: usize) -> Option<Vec<u8>> {
    let mut body = vec![0u8; len.saturating_sub(HEADER_LEN)];
    let used = postcard::to_slice(frame, &mut body).ok()?.len();
    (len >= HEADER_LEN).then(|| [&(used as u32).to_le_bytes()[..], &body[..used]].concat())
}

/// The values one agent frame of each variant is built from.
#[derive(Debug, Clone)]
struct AgentValues {
    big: u64,
    n: u32,
    half: u16,
    secs: i64,
    small: u8,
    flag: bool,
    /// Picks each enum's variant (modulo its count).
    pick: usize,
    bytes: Vec<u8>,
    text: String,
}

/// Every agent frame variant (and every variant of the enums in them) built from `v`.
fn every_agent_frame(v: &AgentValues) -> Vec<AgentFrame<'_>> {
    let code = match decode_agent_frame(&[6, (v.pick % 25) as u8, 0, 0]) {
        Ok(AgentFrame::Error(e)) => e.code,
        other => panic!("{other:?}"),
    };
    let ending = [
        Ending::Exited,
        Ending::TimedOut,
        Ending::Cancelled,
        Ending::RuntimeLimit,
        Ending::OutputLimit,
    ][v.pick % 5];
    let tree_kill = [TreeKill::None, TreeKill::Cgroup, TreeKill::ProcessGroup][v.pick % 3];
    let stream = [Stream::Stdout, Stream::Stderr][v.pick % 2];
    let reason = [
        SkipReason::Special,
        SkipReason::HardLink,
        SkipReason::UnknownType,
        SkipReason::Unreadable,
    ][v.pick % 4];
    let record = StreamRecord {
        bytes: v.big,
        dropped: v.big / 3,
    };
    let stamp = Timestamp {
        secs: v.secs,
        nanos: v.n,
    };
    let digest = [v.small; DIGEST_LEN];
    let termination = |status| Termination {
        status,
        duration_us: v.big,
        output_dropped: v.flag,
        ending,
        tree_kill,
        stdout: record,
        stderr: StreamRecord {
            bytes: v.n.into(),
            dropped: v.big,
        },
        pipes_held: !v.flag,
        oom_killed: v.flag,
        peak_memory: v.big / 7,
    };
    let text = v.text.as_str();
    let bytes = Bytes(&v.bytes);
    vec![
        AgentFrame::Hello(AgentHello {
            magic: [v.small, 0, 0xff, b'Y'],
            min_version: v.half,
            version: v.half / 3,
            agent_version: text,
            limits: Limits {
                max_frame_body: v.n,
                max_user: v.n / 3,
                keepalive_ms: v.n / 5,
                idle_ms: v.n / 9,
                ..Limits::CURRENT
            },
            nonce: ByteArray([v.small; NONCE_LEN]),
            security: [Security::Authenticated, Security::Insecure][v.pick % 2],
            bounds: Bounds {
                max_runtime_s: v.big,
                max_output: v.big / 2,
                max_file_size: v.big / 3,
                max_connections: v.n,
                handshake_timeout_ms: v.n / 2,
                memory_max: v.big / 5,
                pids_max: v.n / 3,
                cgroup: v.flag,
                default_uid: v.n / 5,
                default_gid: v.n / 7,
            },
        }),
        AgentFrame::Started(Started { pid: v.n }),
        AgentFrame::Stdout(crate::Output {
            at_us: v.big,
            data: bytes,
        }),
        AgentFrame::Stderr(crate::Output {
            at_us: v.big / 3,
            data: bytes,
        }),
        AgentFrame::StdinCredit(v.n),
        AgentFrame::Exited(termination(ExitStatus::Code(v.small))),
        AgentFrame::Exited(termination(ExitStatus::Signal {
            number: v.small,
            core_dumped: v.flag,
        })),
        AgentFrame::Error(ErrorFrame {
            code,
            errno: v.n,
            message: text,
        }),
        AgentFrame::Ready(ReadyReport {
            cid: v.n,
            init_started_us: v.big,
            modules_us: v.big / 2,
            listening_us: v.big / 3,
            module_times: StrList(bytes),
        }),
        AgentFrame::Authenticated(AgentProof {
            mac: ByteArray([v.small; MAC_LEN]),
        }),
        AgentFrame::Done(DoneReport { count: v.n }),
        AgentFrame::Keepalive,
        AgentFrame::OutputDropped(Dropped {
            stream,
            bytes: v.big,
        }),
        AgentFrame::FileReady(FileHeader {
            size: v.big,
            mode: v.n,
            mtime: stamp,
            uid: v.n / 3,
            gid: v.half.into(),
        }),
        AgentFrame::FileData(bytes),
        AgentFrame::Skipped(Skipped {
            path: bytes,
            reason,
        }),
        AgentFrame::FileDone(FileSummary {
            bytes: v.big,
            sha256: ByteArray(digest),
        }),
        AgentFrame::SystemInfo(SystemInfo {
            kernel_release: text,
            kernel_version: "#1 SMP",
            machine: text,
            hostname: "",
            uptime_ms: v.big,
            now: stamp,
            cpus: v.n,
            cpu_model: text,
            load: [v.n, v.n / 2, v.half.into()],
            memory_total: v.big,
            memory_available: v.big / 2,
            processes: v.n / 3,
            agent_pid: v.n,
            agent_rss: v.big / 5,
        }),
        AgentFrame::Mount(MountInfo {
            source: bytes,
            target: Bytes(b"/"),
            fstype: text,
            read_only: v.flag,
            total: v.big,
            free: v.big / 2,
            available: v.big / 4,
        }),
        AgentFrame::Interface(InterfaceInfo {
            name: text,
            up: v.flag,
            mtu: v.n,
            mac: bytes,
            addresses: StrList(bytes),
            rx_bytes: v.big,
            tx_bytes: v.big / 2,
        }),
        AgentFrame::ClockSet(stamp),
        AgentFrame::Detached(JobStarted {
            id: v.n,
            pid: v.n / 3,
        }),
        AgentFrame::Job(JobRecord {
            id: v.n,
            name: v.flag.then_some(bytes),
            argv: StrList(bytes),
            uid: v.n / 3,
            gid: v.half.into(),
            pid: v.n / 5,
            state: [
                JobState::Running,
                JobState::Exited,
                JobState::Killed,
                JobState::Lost,
            ][usize::from(v.small % 4)],
            started: stamp,
            duration_us: v.big,
            stdout_bytes: v.big / 2,
            stderr_bytes: v.big / 3,
            termination: (!v.flag).then(|| termination(ExitStatus::Code(v.small))),
        }),
        AgentFrame::Attached(AttachHeader {
            id: v.n,
            stdout: Resume {
                from: v.big,
                lost: v.big / 2,
            },
            stderr: Resume {
                from: v.big / 3,
                lost: 0,
            },
            stdin: v.flag,
            running: !v.flag,
        }),
    ]
}

/// The hand encoder's frame, or `None` when it refused the buffer.
fn hand_agent_frame(frame: &AgentFrame<'_>, len: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let n = encode_agent_frame(frame, &mut buf).ok()?;
    Some(buf[..n].to_vec())
}

fn check_hand_encoder(v: &AgentValues) {
    let frames = every_agent_frame(v);
    // Every variant is here (the last one's tag is the highest).
    assert_eq!(
        frames.iter().map(|f| encode_agent(f)[HEADER_LEN]).max(),
        Some(AGENT_VARIANTS - 1)
    );
    for frame in &frames {
        let expected = postcard_agent_frame(frame, MAX_FRAME).expect("fits");
        assert_eq!(encode_agent(frame), expected, "{frame:?}");
        // Each shorter buffer is refused by both, the exact one accepted.
        for len in 0..=expected.len() {
            assert_eq!(
                hand_agent_frame(frame, len),
                postcard_agent_frame(frame, len),
                "{frame:?} in {len}"
            );
        }
    }
}

/// The hand-written agent frame encoder (`encode.rs`) writes exactly postcard's bytes: every
/// variant, every enum's variants, integers at their varint edges, and every buffer size up to
/// the frame's.
#[test]
fn hand_encoder_matches_postcard() {
    let edges: [(u64, u32, u16, i64); 8] = [
        (0, 0, 0, 0),
        (1, 1, 1, -1),
        (127, 127, 127, 63),
        (128, 128, 128, -64),
        (16_383, 16_383, 16_383, -65),
        (16_384, 16_384, 16_384, 64),
        (u64::MAX, u32::MAX, u16::MAX, i64::MIN),
        (u64::MAX / 2, u32::MAX / 2, u16::MAX / 2, i64::MAX),
    ];
    for (i, (big, n, half, secs)) in edges.into_iter().enumerate() {
        for pick in 0..25 {
            check_hand_encoder(&AgentValues {
                big,
                n,
                half,
                secs,
                small: [0, 1, 0x7f, 0x80, 0xff][pick % 5],
                flag: pick % 2 == 1,
                pick,
                bytes: vec![pick as u8; [0, 1, 127, 128, 300][(i + pick) % 5]],
                text: "é".repeat(pick * 7),
            });
        }
    }
    // The largest data frame is written whole, one byte more is too large for both.
    let data = vec![0x80; MAX_DATA];
    let frame = AgentFrame::FileData(Bytes(&data));
    assert_eq!(
        encode_agent(&frame),
        postcard_agent_frame(&frame, MAX_FRAME).unwrap()
    );
    let over = vec![0u8; MAX_FRAME_BODY];
    let frame = AgentFrame::FileData(Bytes(&over));
    let mut buf = vec![0u8; MAX_FRAME + 16];
    assert_eq!(
        encode_agent_frame(&frame, &mut buf),
        Err(EncodeError::TooLarge)
    );
}

proptest! {
    /// Random values in every variant: the same bytes as postcard.
    #[test]
    fn hand_encoder_matches_postcard_on_random_frames(
        big in any::<u64>(), n in any::<u32>(), half in any::<u16>(), secs in any::<i64>(),
        small in any::<u8>(), flag in any::<bool>(), pick in 0usize..1000, bytes in arb_bytes(),
        text in "\\PC{0,40}"
    ) {
        let v = AgentValues { big, n, half, secs, small, flag, pick, bytes, text };
        for frame in &every_agent_frame(&v) {
            let expected = postcard_agent_frame(frame, MAX_FRAME).expect("fits");
            prop_assert_eq!(&encode_agent(frame), &expected);
            let cut = expected.len() - 1 - (pick % expected.len().min(8));
            prop_assert_eq!(hand_agent_frame(frame, cut), None);
        }
    }
}

const JOB: JobRequest<'static> = JobRequest {
    job: Bytes(b"web"),
    user: None,
};

const KILL: KillJob<'static> = KillJob {
    job: Bytes(b"7"),
    user: None,
    signal: 0,
    grace_ms: None,
};

const ATTACH: AttachRequest<'static> = AttachRequest {
    job: Bytes(b"7"),
    user: None,
    since_stdout: 0,
    since_stderr: 300,
    follow: true,
    stdin: false,
};

const ATTACHED: AttachHeader = AttachHeader {
    id: 7,
    stdout: Resume { from: 0, lost: 0 },
    stderr: Resume {
        from: 1000,
        lost: 200,
    },
    stdin: true,
    running: true,
};

const JOB_RECORD: JobRecord<'static> = JobRecord {
    id: 7,
    name: Some(Bytes(b"web")),
    argv: StrList::new(b"sleep\x009\0"),
    uid: 65534,
    gid: 65534,
    pid: 42,
    state: JobState::Running,
    started: Timestamp {
        secs: 978_307_200,
        nanos: 0,
    },
    duration_us: 1_000_000,
    stdout_bytes: 128,
    stderr_bytes: 0,
    termination: None,
};

#[rustfmt::skip]
#[test]
fn golden_job_requests() {
    golden_client(ClientFrame::StartJob(JobStart { name: Some(Bytes(b"web")) }), &[
        6, 0, 0, 0,                         // body length
        0x11,                               // ClientFrame::StartJob
        0x01, 0x03, b'w', b'e', b'b',       // Some(name)
    ]);
    golden_client(ClientFrame::Jobs(JobQuery { user: None }), &[
        2, 0, 0, 0,
        0x12,                               // ClientFrame::Jobs
        0x00,                               // user: None
    ]);
    golden_client(ClientFrame::Attach(ATTACH), &[
        9, 0, 0, 0,
        0x13,                               // ClientFrame::Attach
        0x01, b'7',                         // job
        0x00,                               // user: None
        0x00,                               // since_stdout
        0xAC, 0x02,                         // since_stderr = 300
        0x01,                               // follow
        0x00,                               // stdin
    ]);
    golden_client(ClientFrame::Wait(JOB), &[
        6, 0, 0, 0,
        0x14,                               // ClientFrame::Wait
        0x03, b'w', b'e', b'b',
        0x00,
    ]);
    golden_client(ClientFrame::Kill(KILL), &[
        6, 0, 0, 0,
        0x15,                               // ClientFrame::Kill
        0x01, b'7',
        0x00,                               // user
        0x00,                               // signal 0: the tree, as a cancel
        0x00,                               // grace: None
    ]);
    golden_client(ClientFrame::Remove(JOB), &[
        6, 0, 0, 0,
        0x16,                               // ClientFrame::Remove
        0x03, b'w', b'e', b'b',
        0x00,
    ]);
}

#[rustfmt::skip]
#[test]
fn golden_job_answers() {
    golden_agent(AgentFrame::Detached(JobStarted { id: 7, pid: 300 }), &[
        4, 0, 0, 0,
        0x14,                               // AgentFrame::Detached
        0x07,                               // id
        0xAC, 0x02,                         // pid 300
    ]);
    golden_agent(AgentFrame::Attached(ATTACHED), &[
        10, 0, 0, 0,
        0x16,                               // AgentFrame::Attached
        0x07,                               // id
        0x00, 0x00,                         // stdout from, lost
        0xE8, 0x07, 0xC8, 0x01,             // stderr from 1000, lost 200
        0x01, 0x01,                         // stdin granted, running
    ]);
    golden_agent(AgentFrame::Job(JOB_RECORD), &[
        37, 0, 0, 0,
        0x15,                               // AgentFrame::Job
        0x07,                               // id
        0x01, 0x03, b'w', b'e', b'b',       // name
        0x08, b's', b'l', b'e', b'e', b'p', 0, b'9', 0, // argv
        0xFE, 0xFF, 0x03,                   // uid 65534
        0xFE, 0xFF, 0x03,                   // gid
        0x2A,                               // pid 42
        0x00,                               // Running
        0x80, 0xA2, 0xFE, 0xA4, 0x07, 0x00, // started: zigzag(978307200), 0 ns
        0xC0, 0x84, 0x3D,                   // duration 1 s
        0x80, 0x01,                         // stdout bytes
        0x00,                               // stderr bytes
        0x00,                               // termination: None
    ]);
}
