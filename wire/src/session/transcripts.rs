//! Golden transcripts: whole conversations stored as byte files in `wire/transcripts/`, one file
//! per direction, that both sessions are checked against. The agent session, fed the client's
//! bytes and driven by the transcript's script, must send exactly the agent's bytes; the client
//! session, fed the agent's bytes, must send exactly the client's and report the listed events.
//! Another implementation can check itself against the same files (see `transcripts/README.md`).
//!
//! `FERRY_BLESS=1 cargo test -p ferry-wire transcripts` rewrites the files from the sessions:
//! only ever after a deliberate protocol change, reviewed byte by byte.

use std::path::PathBuf;
use std::string::String;
use std::sync::LazyLock;
use std::vec::Vec;

use super::*;
use crate::jobs::{AttachHeader, AttachRequest, JobRequest, JobStarted, Resume};
use crate::limits::{MAX_FRAME, MAX_INLINE_LIST, NONCE_LEN};
use crate::msg::{
    ClientFrame, Ending, ErrorCode, ExecRequest, ExitStatus, ListKind, StdinMode, StrList, Stream,
    TreeKill, WindowSize,
};
use crate::msg::{StreamRecord, Termination};
use crate::ops::{
    FileHeader, FileSummary, GetRequest, MountInfo, PutRequest, SkipReason, SystemInfo, Timestamp,
    TransferKind,
};
use crate::{encode_client_frame, Bytes, DataKind, DATA_HEADROOM};

/// What the agent's driver does, in order, as the transcript's conversation unfolds.
#[derive(Debug, Clone, Copy)]
enum Act {
    /// Answer the exec: the command runs as this pid.
    Start(u32),
    /// Refuse the exec.
    Refuse(ErrorCode, u32, &'static str),
    /// Write all stdin received so far to the command (credit goes back).
    ConsumeStdin,
    Stdout(&'static [u8]),
    Stderr(&'static [u8]),
    /// The command ended after this many microseconds.
    Exit(ExitStatus, u64),
    /// The kill-all is done: this many processes were ended.
    Done(u32),
    /// The driver's clock reads this many microseconds (0 until set): output is stamped with
    /// it, deadlines are checked at it, the command is started at it.
    At(u64),
    /// The driver checks its deadlines (a keepalive goes out when one is due).
    Tick,
    /// The output cap dropped this many bytes of a stream: the notice, in order with the data.
    Dropped(Stream, u64),
    /// The command ended at this time; output may still follow until `Finish`.
    Exited(ExitStatus, u64),
    /// The output is done: the record, with what the driver knows about the end.
    Finish(EndFacts),
    /// The transfer was checked and begins.
    FileReady(FileHeader),
    /// A chunk of a get's content.
    FileData(&'static [u8]),
    /// A tree's entry was left out.
    Skipped(&'static [u8]),
    /// The transfer is complete.
    FileDone(FileSummary),
    /// An info frame (system, mount or interface).
    Info(AgentFrame<'static>),
    /// The job was started and registered.
    Detached(JobStarted),
    /// The attachment begins; the job started at this time on the driver's clock.
    Attached(AttachHeader, u64),
    /// The job attached to (or waited for) has ended.
    JobEnded(Termination),
    /// The job waited for still runs.
    Waiting,
}

/// What the client does beyond the operation.
#[derive(Debug, Clone, Copy)]
enum Send {
    Stdin(&'static [u8]),
    Eof,
    Signal(u8),
    Resize(WindowSize),
    Cancel(Option<u32>),
    /// A put's digest, its last send.
    PutEnd([u8; 32]),
}

/// The operation a transcript's client asks for.
#[derive(Debug, Clone, Copy)]
enum Operation {
    Exec(ExecRequest<'static>),
    /// An exec whose request is built at run time (too large to write out).
    Built(fn() -> ExecRequest<'static>),
    KillAll,
    Put(PutRequest<'static>),
    Get(GetRequest<'static>),
    Info,
    /// A detached job with this name, and its exec.
    StartJob(&'static [u8], ExecRequest<'static>),
    Attach(AttachRequest<'static>),
    Wait(JobRequest<'static>),
}

impl Operation {
    fn request(&self) -> Option<ExecRequest<'static>> {
        match *self {
            Operation::Exec(request) | Operation::StartJob(_, request) => Some(request),
            Operation::Built(build) => Some(build()),
            _ => None,
        }
    }
}

struct Transcript {
    name: &'static str,
    operation: Operation,
    /// The agent's secret; `None`: an insecure agent.
    agent_secret: Option<&'static [u8]>,
    /// The client's secret (a different one: a refused proof).
    client_secret: Option<&'static [u8]>,
    /// The client's sends, made once its operation started (stdin needs the hello's credit).
    sends: &'static [Send],
    /// The agent's script, run once the whole client side has been handled.
    acts: &'static [Act],
    /// The events the client session must report, in order, as text.
    events: &'static [&'static str],
}

/// SHA-256 of `hello\n`.
const HELLO_SHA256: [u8; 32] = [
    0x58, 0x91, 0xb5, 0xb5, 0x22, 0xd5, 0xdf, 0x08, 0x6d, 0x0f, 0xf0, 0xb1, 0x10, 0xfb, 0xd9, 0xd2,
    0x1b, 0xb4, 0xfc, 0x71, 0x63, 0xaf, 0x34, 0xd0, 0x82, 0x86, 0xa2, 0xe8, 0x46, 0xf6, 0xbe, 0x03,
];

/// The per-VM secret of the transcripts (both ends read it from the same file).
const SECRET: &[u8] = b"ferry golden transcript secret";
/// A secret that is not the agent's.
const WRONG_SECRET: &[u8] = b"not the agent's secret at all";

/// A nonce that reads well in a hex dump: `start`, `start + 1`, …
const fn counting(start: u8) -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    let mut i = 0;
    while i < NONCE_LEN {
        nonce[i] = start + i as u8;
        i += 1;
    }
    nonce
}

/// The agent's nonce in every transcript: 00 01 … 1f.
const AGENT_NONCE: [u8; NONCE_LEN] = counting(0x00);
/// The client's nonce in every transcript: 80 81 … 9f.
const CLIENT_NONCE: [u8; NONCE_LEN] = counting(0x80);

const fn exec(argv: &'static [u8], stdin: StdinMode) -> Operation {
    Operation::Exec(ExecRequest {
        argv: StrList::new(argv),
        env: StrList::new(b"LANG=C\0"),
        clean_env: false,
        cwd: None,
        stdin,
        user: None,
        pty: None,
        timeout_ms: 0,
        kill_grace_ms: None,
        kill_tree_on_exit: false,
        max_output: 0,
    })
}

/// `yes` on a terminal (`y\r\n` lines), capped at 64 bytes: its first 32 bytes and its last 32
/// of 3000.
const YES_HEAD: &[u8] = b"y\r\ny\r\ny\r\ny\r\ny\r\ny\r\ny\r\ny\r\ny\r\ny\r\ny\r";
const YES_TAIL: &[u8] = b"\r\ny\r\ny\r\ny\r\ny\r\ny\r\ny\r\ny\r\ny\r\ny\r\ny\r\n";

/// `sh -c 'echo $#' sh` and 300 arguments of 64 bytes (`argument-000-xxx…`).
static PIECES_ARGV: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let mut argv = b"sh\0-c\0echo $#\0sh\0".to_vec();
    for i in 0..300 {
        let entry = format!("argument-{i:03}-");
        argv.extend_from_slice(entry.as_bytes());
        argv.resize(argv.len() + 64 - entry.len(), b'x');
        argv.push(0);
    }
    argv
});

/// `LANG=C` and 150 variables of 124 bytes (`FERRY_V_000=vvv…`).
static PIECES_ENV: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let mut env = b"LANG=C\0".to_vec();
    for i in 0..150 {
        let entry = format!("FERRY_V_{i:03}=");
        env.extend_from_slice(entry.as_bytes());
        env.resize(env.len() + 124 - entry.len(), b'v');
        env.push(0);
    }
    env
});

fn pieces_request() -> ExecRequest<'static> {
    ExecRequest {
        argv: StrList::new(&PIECES_ARGV),
        env: StrList::new(&PIECES_ENV),
        clean_env: false,
        cwd: None,
        stdin: StdinMode::Null,
        user: None,
        pty: None,
        timeout_ms: 0,
        kill_grace_ms: None,
        kill_tree_on_exit: false,
        max_output: 0,
    }
}

const TRANSCRIPTS: &[Transcript] = &[
    Transcript {
        name: "exec_output",
        operation: exec(b"sh\0-c\0echo hi; echo warn >&2\0", StdinMode::Null),
        agent_secret: Some(SECRET),
        client_secret: Some(SECRET),
        sends: &[],
        acts: &[
            Act::Start(7),
            Act::Stdout(b"hi\n"),
            Act::Stderr(b"warn\n"),
            Act::Exit(ExitStatus::Code(0), 1500),
        ],
        events: &[
            "hello v5 agent golden Authenticated",
            "authenticated",
            "started 7",
            "stdout \"hi\\n\"",
            "stderr \"warn\\n\"",
            "exited Code(0) 1500us dropped=false Exited tree_kill=None out=3/0 err=5/0 held=false oom=false peak=0",
        ],
    },
    Transcript {
        name: "exec_stdin_credit",
        operation: exec(b"cat\0", StdinMode::Pipe),
        agent_secret: Some(SECRET),
        client_secret: Some(SECRET),
        sends: &[Send::Stdin(b"abc"), Send::Stdin(b"defg"), Send::Eof],
        acts: &[
            Act::Start(8),
            Act::ConsumeStdin,
            Act::Stdout(b"abcdefg"),
            Act::Exit(ExitStatus::Code(0), 2000),
        ],
        events: &[
            "hello v5 agent golden Authenticated",
            "authenticated",
            "started 8",
            "credit 0",
            "stdout \"abcdefg\"",
            "exited Code(0) 2000us dropped=false Exited tree_kill=None out=7/0 err=0/0 held=false oom=false peak=0",
        ],
    },
    Transcript {
        name: "exec_signal_death",
        operation: exec(b"sleep\0infinity\0", StdinMode::Null),
        agent_secret: Some(SECRET),
        client_secret: Some(SECRET),
        sends: &[],
        acts: &[
            Act::Start(9),
            Act::Exit(
                ExitStatus::Signal {
                    number: 9,
                    core_dumped: false,
                },
                30,
            ),
        ],
        events: &[
            "hello v5 agent golden Authenticated",
            "authenticated",
            "started 9",
            "exited Signal { number: 9, core_dumped: false } 30us dropped=false Exited tree_kill=None out=0/0 err=0/0 \
             held=false oom=false peak=0",
        ],
    },
    Transcript {
        name: "exec_not_found",
        operation: exec(b"no-such-program\0", StdinMode::Null),
        agent_secret: Some(SECRET),
        client_secret: Some(SECRET),
        sends: &[],
        acts: &[Act::Refuse(
            ErrorCode::NotFound,
            2,
            "no such file or directory",
        )],
        events: &[
            "hello v5 agent golden Authenticated",
            "authenticated",
            "refused NotFound errno 2 \"no such file or directory\"",
        ],
    },
    Transcript {
        name: "exec_invalid_request",
        // The agent refuses an env entry without '='; the client session would never send it,
        // so the client side of this one is checked only through the agent.
        operation: Operation::Exec(ExecRequest {
            argv: StrList::new(b"true\0"),
            env: StrList::new(b"NOEQUALS\0"),
            clean_env: false,
            cwd: None,
            stdin: StdinMode::Null,
            user: None,
            pty: None,
            timeout_ms: 0,
            kill_grace_ms: None,
            kill_tree_on_exit: false,
            max_output: 0,
        }),
        agent_secret: Some(SECRET),
        client_secret: Some(SECRET),
        sends: &[],
        acts: &[],
        events: &[],
    },
    Transcript {
        name: "auth_refused",
        // The client's secret is not the agent's: its proof is wrong, and the agent says only
        // that (no proof of its own, nothing about the request behind it).
        operation: exec(b"true\0", StdinMode::Null),
        agent_secret: Some(SECRET),
        client_secret: Some(WRONG_SECRET),
        sends: &[],
        acts: &[],
        events: &[
            "hello v5 agent golden Authenticated",
            "refused Unauthenticated errno 0 \"authentication failed\"",
        ],
    },
    Transcript {
        name: "kill_all",
        operation: Operation::KillAll,
        agent_secret: Some(SECRET),
        client_secret: Some(SECRET),
        sends: &[],
        acts: &[Act::Done(3)],
        events: &[
            "hello v5 agent golden Authenticated",
            "authenticated",
            "done 3",
        ],
    },
    Transcript {
        name: "exec_insecure",
        // An agent started with --insecure and a client without a secret: no proofs.
        operation: Operation::Exec(ExecRequest {
            argv: StrList::new(b"id\0"),
            env: StrList::new(b""),
            clean_env: true,
            cwd: Some(crate::Bytes(b"/")),
            stdin: StdinMode::Null,
            user: Some(crate::Bytes(b"nobody")),
            pty: None,
            timeout_ms: 0,
            kill_grace_ms: None,
            kill_tree_on_exit: false,
            max_output: 0,
        }),
        agent_secret: None,
        client_secret: None,
        sends: &[],
        acts: &[
            Act::Start(10),
            Act::Stdout(b"uid=65534(nobody)\n"),
            Act::Exit(ExitStatus::Code(0), 700),
        ],
        events: &[
            "hello v5 agent golden Insecure",
            "started 10",
            "stdout \"uid=65534(nobody)\\n\"",
            "exited Code(0) 700us dropped=false Exited tree_kill=None out=18/0 err=0/0 held=false oom=false peak=0",
        ],
    },
    Transcript {
        name: "exec_terminal_timeout",
        // Protocol 3 on a terminal: a timeout, a grace, an output cap. The client resizes the
        // terminal and sends SIGINT (the command ignores it); a keepalive while the command is
        // quiet; the cap sends the head, then (once the command ended) the notice of what it
        // dropped and the tail; the timeout ended it (SIGTERM, its tree through its cgroup).
        operation: Operation::Exec(ExecRequest {
            argv: StrList::new(b"sh\0-c\0trap '' INT; yes | head -n 1000; sleep 60\0"),
            env: StrList::new(b"TERM=xterm-256color\0"),
            clean_env: false,
            cwd: None,
            stdin: StdinMode::Null,
            user: None,
            pty: Some(WindowSize { rows: 24, cols: 80 }),
            timeout_ms: 6_000,
            kill_grace_ms: Some(500),
            kill_tree_on_exit: false,
            max_output: 64,
        }),
        agent_secret: Some(SECRET),
        client_secret: Some(SECRET),
        sends: &[
            Send::Resize(WindowSize {
                rows: 50,
                cols: 132,
            }),
            Send::Signal(2),
        ],
        acts: &[
            Act::At(1_000),
            Act::Start(11),
            Act::At(13_000),
            Act::Stdout(YES_HEAD),
            // The first keepalive is due an interval after the start.
            Act::At(5_001_000),
            Act::Tick,
            Act::At(6_001_250),
            Act::Exited(
                ExitStatus::Signal {
                    number: 15,
                    core_dumped: false,
                },
                6_001_250,
            ),
            Act::At(6_001_400),
            Act::Dropped(Stream::Stdout, 2_936),
            Act::Stdout(YES_TAIL),
            Act::Finish(EndFacts {
                ending: Ending::TimedOut,
                tree_kill: TreeKill::Cgroup,
                pipes_held: false,
                oom_killed: false,
                peak_memory: 1_048_576,
            }),
        ],
        events: &[
            "hello v5 agent golden Authenticated",
            "authenticated",
            "started 11",
            "stdout \"y\\r\\ny\\r\\ny\\r\\ny\\r\\ny\\r\\ny\\r\\ny\\r\\ny\\r\\ny\\r\\ny\\r\\ny\\r\" at 12000us",
            "keepalive",
            "output dropped Stdout 2936",
            "stdout \"\\r\\ny\\r\\ny\\r\\ny\\r\\ny\\r\\ny\\r\\ny\\r\\ny\\r\\ny\\r\\ny\\r\\ny\\r\\n\" at 6000400us",
            "exited Signal { number: 15, core_dumped: false } 6000250us dropped=true TimedOut \
             tree_kill=Cgroup out=3000/2936 err=0/0 held=false oom=false peak=1048576",
        ],
    },
    Transcript {
        name: "exec_in_pieces",
        // A request larger than one frame: argv (300 arguments) and the environment (150
        // variables) each go as a piece, then the exec frame carries the last 16 KiB of each
        // (both cuts fall mid-entry). The agent's driver appends them.
        operation: Operation::Built(pieces_request),
        agent_secret: Some(SECRET),
        client_secret: Some(SECRET),
        sends: &[],
        acts: &[
            Act::Start(12),
            Act::Stdout(b"300\n"),
            Act::Exit(ExitStatus::Code(0), 900),
        ],
        events: &[
            "hello v5 agent golden Authenticated",
            "authenticated",
            "started 12",
            "stdout \"300\\n\"",
            "exited Code(0) 900us dropped=false Exited tree_kill=None out=4/0 err=0/0 held=false \
             oom=false peak=0",
        ],
    },
    Transcript {
        name: "exec_cancelled",
        // The client cancels with a grace of its own; the command dies of the SIGTERM, and
        // without a cgroup its tree was killed through its process group.
        operation: exec(b"sleep\0infinity\0", StdinMode::Null),
        agent_secret: Some(SECRET),
        client_secret: Some(SECRET),
        sends: &[Send::Cancel(Some(250))],
        acts: &[
            Act::Start(13),
            Act::Exited(
                ExitStatus::Signal {
                    number: 15,
                    core_dumped: false,
                },
                400,
            ),
            Act::At(450),
            Act::Finish(EndFacts {
                ending: Ending::Cancelled,
                tree_kill: TreeKill::ProcessGroup,
                pipes_held: false,
                oom_killed: false,
                peak_memory: 0,
            }),
        ],
        events: &[
            "hello v5 agent golden Authenticated",
            "authenticated",
            "started 13",
            "exited Signal { number: 15, core_dumped: false } 400us dropped=false Cancelled \
             tree_kill=ProcessGroup out=0/0 err=0/0 held=false oom=false peak=0",
        ],
    },
    Transcript {
        name: "put_file",
        operation: Operation::Put(PutRequest {
            path: Bytes(b"/srv/greeting"),
            kind: TransferKind::File,
            mode: Some(0o644),
            owner: None,
            mtime: Some(Timestamp { secs: 1_700_000_000, nanos: 0 }),
            size: Some(6),
            create_parents: true,
            no_clobber: false,
            user: None,
        }),
        agent_secret: Some(SECRET),
        client_secret: Some(SECRET),
        sends: &[Send::Stdin(b"hello\n"), Send::PutEnd(HELLO_SHA256)],
        acts: &[
            Act::FileReady(FileHeader {
                size: 6,
                mode: 0o100644,
                mtime: Timestamp { secs: 1_700_000_000, nanos: 0 },
                uid: 65534,
                gid: 65534,
            }),
            Act::ConsumeStdin,
            Act::FileDone(FileSummary { bytes: 6, sha256: crate::ByteArray(HELLO_SHA256) }),
        ],
        events: &[
            "hello v5 agent golden Authenticated",
            "authenticated",
            "file ready: size 6 mode 100644 mtime 1700000000.000000000 owner 65534:65534",
            "credit 0",
            "file done: 6 bytes, sha256 5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03",
        ],
    },
    Transcript {
        name: "get_tree",
        operation: Operation::Get(GetRequest {
            path: Bytes(b"/etc/app"),
            kind: TransferKind::Tree,
            user: None,
        }),
        agent_secret: Some(SECRET),
        client_secret: Some(SECRET),
        sends: &[],
        acts: &[
            Act::FileReady(FileHeader {
                size: 0,
                mode: 0o40755,
                mtime: Timestamp { secs: 1_700_000_000, nanos: 0 },
                uid: 0,
                gid: 0,
            }),
            Act::FileData(b"(tar bytes)"),
            Act::Skipped(b"run/app.sock"),
            Act::FileDone(FileSummary { bytes: 11, sha256: crate::ByteArray([0x5A; 32]) }),
        ],
        events: &[
            "hello v5 agent golden Authenticated",
            "authenticated",
            "file ready: size 0 mode 40755 mtime 1700000000.000000000 owner 0:0",
            "file data \"(tar bytes)\"",
            "skipped \"run/app.sock\" (Special)",
            "file done: 11 bytes, sha256 5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a",
        ],
    },
    Transcript {
        name: "info",
        operation: Operation::Info,
        agent_secret: Some(SECRET),
        client_secret: Some(SECRET),
        sends: &[],
        acts: &[
            Act::Info(AgentFrame::SystemInfo(SystemInfo {
                kernel_release: "6.1.0-golden",
                kernel_version: "#1 SMP",
                machine: "x86_64",
                hostname: "vm",
                uptime_ms: 1234,
                now: Timestamp { secs: 1_700_000_000, nanos: 5 },
                cpus: 2,
                cpu_model: "golden cpu",
                load: [1, 2, 3],
                memory_total: 256 << 20,
                memory_available: 200 << 20,
                processes: 4,
                agent_pid: 1,
                agent_rss: 160 << 10,
            })),
            Act::Info(AgentFrame::Mount(MountInfo {
                source: Bytes(b"rootfs"),
                target: Bytes(b"/"),
                fstype: "rootfs",
                read_only: false,
                total: 1 << 20,
                free: 1 << 19,
                available: 1 << 19,
            })),
            Act::Done(1),
        ],
        events: &[
            "hello v5 agent golden Authenticated",
            "authenticated",
            "SystemInfo(SystemInfo { kernel_release: \"6.1.0-golden\", kernel_version: \"#1 SMP\", machine: \"x86_64\", hostname: \"vm\", uptime_ms: 1234, now: Timestamp { secs: 1700000000, nanos: 5 }, cpus: 2, cpu_model: \"golden cpu\", load: [1, 2, 3], memory_total: 268435456, memory_available: 209715200, processes: 4, agent_pid: 1, agent_rss: 163840 })",
            "Mount(MountInfo { source: Bytes(len=6), target: Bytes(len=1), fstype: \"rootfs\", read_only: false, total: 1048576, free: 524288, available: 524288 })",
            "done 1",
        ],
    },
    Transcript {
        name: "job_start",
        // A detached job named `web`: the start and its exec (whole, in one frame), answered
        // with the job's id once its command runs. Its stdin is for an attacher.
        operation: Operation::StartJob(
            b"web",
            ExecRequest {
                argv: StrList::new(b"./build.sh\0"),
                env: StrList::new(b"LANG=C\0"),
                clean_env: false,
                cwd: None,
                stdin: StdinMode::Null,
                user: None,
                pty: None,
                timeout_ms: 0,
                kill_grace_ms: None,
                kill_tree_on_exit: false,
                max_output: 0,
            },
        ),
        agent_secret: Some(SECRET),
        client_secret: Some(SECRET),
        sends: &[],
        acts: &[Act::Detached(JobStarted { id: 1, pid: 20 })],
        events: &[
            "hello v5 agent golden Authenticated",
            "authenticated",
            "detached 1 pid 20",
        ],
    },
    Transcript {
        name: "job_attach",
        // Another connection attaches to `web` from the start of each stream, asking for its
        // stdin (granted: nobody else holds it; it sends none here). Its stderr's
        // first 10 bytes are no longer retained (the header says so); stdout is replayed from
        // the spool's head, then the ring overran (4096 bytes the attacher never gets), then
        // the live tail and the job's record. Output is stamped with the time since the job
        // started (at 500000 µs on the agent's clock).
        operation: Operation::Attach(AttachRequest {
            job: Bytes(b"web"),
            user: None,
            since_stdout: 0,
            since_stderr: 0,
            follow: true,
            stdin: true,
        }),
        agent_secret: Some(SECRET),
        client_secret: Some(SECRET),
        sends: &[],
        acts: &[
            Act::At(2_000_000),
            Act::Attached(
                AttachHeader {
                    id: 1,
                    stdout: Resume { from: 0, lost: 0 },
                    stderr: Resume { from: 10, lost: 10 },
                    stdin: true,
                    running: true,
                },
                500_000,
            ),
            Act::Stdout(b"one\n"),
            Act::Dropped(Stream::Stdout, 4096),
            Act::At(2_600_000),
            Act::Stderr(b"two\n"),
            Act::Stdout(b"three\n"),
            Act::JobEnded(Termination {
                status: ExitStatus::Code(0),
                duration_us: 2_050_000,
                output_dropped: false,
                ending: Ending::Exited,
                tree_kill: TreeKill::None,
                stdout: StreamRecord { bytes: 4106, dropped: 0 },
                stderr: StreamRecord { bytes: 14, dropped: 0 },
                pipes_held: false,
                oom_killed: false,
                peak_memory: 0,
            }),
        ],
        events: &[
            "hello v5 agent golden Authenticated",
            "authenticated",
            "attached 1: stdout from 0 lost 0, stderr from 10 lost 10, stdin=true running=true",
            "stdout \"one\\n\" at 1500000us",
            "output dropped Stdout 4096",
            "stderr \"two\\n\" at 2100000us",
            "stdout \"three\\n\" at 2100000us",
            "exited Code(0) 2050000us dropped=false Exited tree_kill=None out=4106/0 err=14/0 \
             held=false oom=false peak=0",
        ],
    },
    Transcript {
        name: "job_wait_kept",
        // An agent that keeps connections (protocol 5: `idle_ms` 30000 in its hello) answers a
        // wait for `web`: keepalives while the job runs, then its record; the connection stays
        // open for the client's next operation.
        operation: Operation::Wait(JobRequest {
            job: Bytes(b"web"),
            user: None,
        }),
        agent_secret: Some(SECRET),
        client_secret: Some(SECRET),
        sends: &[],
        acts: &[
            Act::Waiting,
            Act::At(5_000_000),
            Act::Tick,
            Act::At(6_000_000),
            Act::JobEnded(Termination {
                status: ExitStatus::Code(2),
                duration_us: 6_500_000,
                output_dropped: false,
                ending: Ending::Exited,
                tree_kill: TreeKill::None,
                stdout: StreamRecord { bytes: 12, dropped: 0 },
                stderr: StreamRecord { bytes: 0, dropped: 0 },
                pipes_held: false,
                oom_killed: false,
                peak_memory: 0,
            }),
        ],
        events: &[
            "hello v5 agent golden Authenticated",
            "authenticated",
            "keepalive",
            "exited Code(2) 6500000us dropped=false Exited tree_kill=None out=12/0 err=0/0 \
             held=false oom=false peak=0",
        ],
    },
];

fn secret(bytes: Option<&[u8]>) -> Option<Secret> {
    bytes.map(|bytes| Secret::new(bytes).expect("a valid secret"))
}

fn agent_session(t: &Transcript) -> AgentSession {
    let auth = AgentAuth {
        nonce: AGENT_NONCE,
        secret: secret(t.agent_secret),
    };
    AgentSession::new(config(t), 0, auth)
}

fn client_session(t: &Transcript) -> ClientSession {
    let auth = ClientAuth {
        nonce: CLIENT_NONCE,
        secret: secret(t.client_secret),
    };
    ClientSession::new(0, None, auth)
}

/// Starts the transcript's operation; returns the bytes written (our hello and proof first).
fn start(
    t: &Transcript,
    session: &mut ClientSession,
    out: &mut [u8],
) -> Result<usize, SessionError> {
    match t.operation {
        Operation::Put(put) => return session.start_put(&put, out),
        Operation::Get(get) => return session.start_get(&get, out),
        Operation::Info => return session.start_info(out),
        Operation::StartJob(name, request) => return session.start_job(Some(name), &request, out),
        Operation::Attach(request) => return session.start_attach(&request, out),
        Operation::Wait(request) => return session.start_wait(&request, out),
        _ => {}
    }
    match t.operation.request() {
        Some(request) => session.start_exec(&request, out),
        None => session.start_kill_all(out),
    }
}

/// A buffer for what the client writes: a request in pieces needs more than a frame.
fn client_buffer(t: &Transcript) -> Vec<u8> {
    let len = t.operation.request().map_or(MAX_FRAME, |request| {
        ClientSession::exec_buffer_len(&request)
    });
    vec![0u8; len]
}

/// The transcripts whose agent keeps connections (protocol 5): idle for up to 30 s.
const KEPT: &[&str] = &["job_wait_kept"];

fn config(t: &Transcript) -> AgentConfig {
    let mut config = CONFIG;
    if KEPT.contains(&t.name) {
        config.limits.idle_ms = 30_000;
    }
    config
}

const CONFIG: AgentConfig = AgentConfig {
    agent_version: "golden",
    ..AgentConfig::DEFAULT
};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("transcripts")
}

/// Compares `bytes` with the stored file (or writes it when blessing).
fn golden(file: &str, bytes: &[u8]) {
    let path = dir().join(file);
    if std::env::var_os("FERRY_BLESS").is_some() {
        std::fs::create_dir_all(dir()).expect("transcripts dir");
        std::fs::write(&path, bytes).expect("writing a transcript");
        return;
    }
    let stored = std::fs::read(&path)
        .unwrap_or_else(|err| panic!("{}: {err} (FERRY_BLESS=1 writes it)", path.display()));
    assert_eq!(
        stored,
        bytes,
        "{} differs from the session's bytes",
        path.display()
    );
}

/// The client's side of a transcript, encoded the way a client sends it once the agent's hello
/// is in (raw for requests the client session refuses to encode).
fn client_bytes(t: &Transcript, agent_hello: &[u8]) -> Vec<u8> {
    let mut out = client_buffer(t);
    let mut session = client_session(t);
    let input = session.handle_input(agent_hello).expect("hello accepted");
    assert_eq!(input.consumed, agent_hello.len());
    let mut bytes = Vec::new();
    match start(t, &mut session, &mut out) {
        Ok(n) => bytes.extend_from_slice(&out[..n]),
        Err(_) => {
            // Our hello and proof as the session sends them, then the request as it is.
            let n = session.poll_transmit(&mut out).expect("hello and proof");
            bytes.extend_from_slice(&out[..n]);
            let Some(request) = t.operation.request() else {
                panic!("{}: a kill-all is always encoded", t.name);
            };
            let n = encode_client_frame(&ClientFrame::Exec(request), &mut out).expect("encodes");
            bytes.extend_from_slice(&out[..n]);
            return bytes;
        }
    }
    bytes.extend(client_sends(t, &mut session, &mut out));
    bytes
}

/// The transcript's sends (stdin, its end), as the client session encodes them.
fn client_sends(t: &Transcript, session: &mut ClientSession, out: &mut [u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for send in t.sends {
        match send {
            Send::Stdin(data) => {
                let sent = session.send_stdin(data, out).expect("within credit");
                assert_eq!(sent.taken, data.len());
                bytes.extend_from_slice(&out[..sent.written]);
            }
            Send::Eof => session.close_stdin().expect("stdin open"),
            Send::Signal(number) => {
                let n = session.send_signal(*number, out).expect("a signal");
                bytes.extend_from_slice(&out[..n]);
            }
            Send::Resize(size) => {
                let n = session.send_resize(*size, out).expect("a resize");
                bytes.extend_from_slice(&out[..n]);
            }
            Send::Cancel(grace_ms) => {
                let n = session.send_cancel(*grace_ms, out).expect("a cancel");
                bytes.extend_from_slice(&out[..n]);
            }
            Send::PutEnd(digest) => {
                let n = session.end_put(digest, out).expect("a put's end");
                bytes.extend_from_slice(&out[..n]);
            }
        }
        let n = session.poll_transmit(out).expect("transmits");
        bytes.extend_from_slice(&out[..n]);
    }
    bytes
}

/// The agent's hello: the first thing it sends, before it has read anything.
fn agent_hello_bytes(t: &Transcript) -> Vec<u8> {
    let mut session = agent_session(t);
    let mut out = vec![0u8; 256];
    let n = session.poll_transmit(&mut out).expect("hello out");
    out.truncate(n);
    out
}

/// Runs the agent session over the client's bytes with the transcript's script; returns what it
/// sends.
fn agent_bytes(t: &Transcript, client: &[u8]) -> Vec<u8> {
    let mut session = agent_session(t);
    let mut out = vec![0u8; MAX_FRAME];
    let mut sent = Vec::new();
    let mut flush = |session: &mut AgentSession, sent: &mut Vec<u8>| {
        let n = session.poll_transmit(&mut out).expect("transmits");
        sent.extend_from_slice(&out[..n]);
    };
    // The agent speaks first.
    flush(&mut session, &mut sent);
    assert_eq!(sent, agent_hello_bytes(t), "{}", t.name);
    let mut stdin_received = 0;
    let mut rest = client;
    let mut operation_seen = false;
    // The driver appends the pieces of a request, then the exec's own lists.
    let (mut argv, mut env) = (Vec::new(), Vec::new());
    while !rest.is_empty() {
        let input = match session.handle_input(rest, 0) {
            Ok(input) => input,
            Err(_) => break,
        };
        match input.event {
            Some(AgentEvent::ExecPart { list, data }) => match list {
                ListKind::Argv => argv.extend_from_slice(data),
                ListKind::Env => env.extend_from_slice(data),
            },
            Some(AgentEvent::Exec(valid)) => {
                operation_seen = true;
                argv.extend_from_slice(valid.request().argv.as_bytes());
                env.extend_from_slice(valid.request().env.as_bytes());
                let sent = t.operation.request().expect("an exec");
                assert!(argv == sent.argv.as_bytes(), "{}: argv", t.name);
                assert!(env == sent.env.as_bytes(), "{}: env", t.name);
                let large = |list: StrList<'_>| list.as_bytes().len() > MAX_INLINE_LIST;
                assert_eq!(
                    valid.has_parts(),
                    large(sent.argv) || large(sent.env),
                    "{}",
                    t.name
                );
            }
            Some(
                AgentEvent::KillAll
                | AgentEvent::Put(_)
                | AgentEvent::Get(_)
                | AgentEvent::Info
                | AgentEvent::Attach(_)
                | AgentEvent::Wait(_),
            ) => operation_seen = true,
            Some(AgentEvent::Stdin(data)) => stdin_received += data.len(),
            _ => {}
        }
        assert!(input.consumed > 0, "{}: client bytes end mid-frame", t.name);
        rest = &rest[input.consumed..];
    }
    flush(&mut session, &mut sent);
    assert_eq!(operation_seen, !session.is_closing(), "{}", t.name);
    let mut frame = vec![0u8; MAX_FRAME];
    let mut now = 0;
    for act in t.acts {
        match *act {
            Act::Start(pid) => session.started(pid, now).expect("started"),
            Act::Refuse(code, errno, message) => session
                .refuse(Refusal::os(code, errno, message), 0)
                .expect("refuse"),
            Act::ConsumeStdin => session.stdin_consumed(stdin_received),
            Act::Stdout(data) | Act::Stderr(data) => {
                flush(&mut session, &mut sent);
                let kind = match act {
                    Act::Stdout(_) => DataKind::Stdout,
                    _ => DataKind::Stderr,
                };
                frame[DATA_HEADROOM..DATA_HEADROOM + data.len()].copy_from_slice(data);
                let start = session
                    .frame_output(&mut frame, kind, data.len(), now)
                    .unwrap();
                sent.extend_from_slice(&frame[start..DATA_HEADROOM + data.len()]);
            }
            Act::Exit(status, after) => {
                session.child_exited(status, after).expect("exit");
                session.finish(after).expect("finish");
            }
            Act::Done(count) => session.done(count, 0).expect("done"),
            Act::At(micros) => now = micros,
            Act::Tick => session.handle_timeout(now).expect("no deadline broken"),
            Act::Dropped(stream, bytes) => {
                flush(&mut session, &mut sent);
                let n = session
                    .encode_output_dropped(stream, bytes, &mut frame)
                    .expect("the notice");
                sent.extend_from_slice(&frame[..n]);
            }
            Act::Exited(status, at) => session.child_exited(status, at).expect("exit"),
            Act::Finish(facts) => session.finish_with(now, facts).expect("finish"),
            Act::FileReady(header) => session.file_ready(header, now).expect("ready"),
            Act::FileData(data) => {
                flush(&mut session, &mut sent);
                frame[DATA_HEADROOM..DATA_HEADROOM + data.len()].copy_from_slice(data);
                let start = session.frame_file_data(&mut frame, data.len()).unwrap();
                sent.extend_from_slice(&frame[start..DATA_HEADROOM + data.len()]);
            }
            Act::Skipped(path) => {
                flush(&mut session, &mut sent);
                let n = session
                    .encode_skipped(path, SkipReason::Special, &mut frame)
                    .expect("the note");
                sent.extend_from_slice(&frame[..n]);
            }
            Act::FileDone(summary) => session.file_done(summary, now).expect("done"),
            Act::Info(info) => {
                flush(&mut session, &mut sent);
                let n = session.encode_info(&info, &mut frame).expect("info");
                sent.extend_from_slice(&frame[..n]);
            }
            Act::Detached(job) => {
                assert!(session.is_job(), "{}", t.name);
                session.detached(job, now).expect("detached");
            }
            Act::Attached(header, started_at) => {
                session.attached(header, started_at, now).expect("attached")
            }
            Act::JobEnded(end) => session.job_ended(end, now).expect("ended"),
            Act::Waiting => session.waiting(now).expect("waiting"),
        }
        flush(&mut session, &mut sent);
    }
    assert!(
        session.is_closed() || (KEPT.contains(&t.name) && session.can_continue()),
        "{}: the conversation did not end",
        t.name
    );
    sent
}

/// Feeds the agent's bytes to a client session that starts the transcript's operation as soon
/// as the agent's hello is in; returns the events as text and what the client sent.
fn client_events(t: &Transcript, agent: &[u8]) -> (Vec<String>, Vec<u8>) {
    let mut session = client_session(t);
    let mut out = client_buffer(t);
    let mut events = Vec::new();
    let mut sent = Vec::new();
    let mut rest = agent;
    while !rest.is_empty() {
        let input = session
            .handle_input(rest)
            .expect("the client accepts the agent's bytes");
        let Some(event) = input.event else {
            // The one frame that is no event: a keepalive.
            events.push(String::from("keepalive"));
            rest = &rest[input.consumed..];
            continue;
        };
        // Output with its time (when it was read, since the start), unless it is 0.
        let at = match session.last_output_at() {
            0 => String::new(),
            at => format!(" at {at}us"),
        };
        let text = match event {
            ClientEvent::HelloAccepted(info) => {
                // Our operation (behind our hello and proof), then stdin within its credit.
                let n = start(t, &mut session, &mut out).expect("operation");
                sent.extend_from_slice(&out[..n]);
                sent.extend(client_sends(t, &mut session, &mut out));
                format!(
                    "hello v{} agent {} {:?}",
                    info.protocol_version, info.agent_version, info.security
                )
            }
            ClientEvent::Authenticated => String::from("authenticated"),
            ClientEvent::Started { pid } => format!("started {pid}"),
            ClientEvent::Stdout(data) => {
                format!("stdout {:?}{at}", String::from_utf8_lossy(data))
            }
            ClientEvent::Stderr(data) => {
                format!("stderr {:?}{at}", String::from_utf8_lossy(data))
            }
            ClientEvent::StdinCredit { available } => format!("credit {available}"),
            ClientEvent::Exited(end) => format!(
                "exited {:?} {}us dropped={} {:?} tree_kill={:?} out={}/{} err={}/{} held={} \
                 oom={} peak={}",
                end.status,
                end.duration_us,
                end.output_dropped,
                end.ending,
                end.tree_kill,
                end.stdout.bytes,
                end.stdout.dropped,
                end.stderr.bytes,
                end.stderr.dropped,
                end.pipes_held,
                end.oom_killed,
                end.peak_memory
            ),
            ClientEvent::OutputDropped(dropped) => {
                format!("output dropped {:?} {}", dropped.stream, dropped.bytes)
            }
            ClientEvent::Done(report) => format!("done {}", report.count),
            ClientEvent::Detached(job) => format!("detached {} pid {}", job.id, job.pid),
            ClientEvent::Attached(header) => format!(
                "attached {}: stdout from {} lost {}, stderr from {} lost {}, stdin={} running={}",
                header.id,
                header.stdout.from,
                header.stdout.lost,
                header.stderr.from,
                header.stderr.lost,
                header.stdin,
                header.running
            ),
            ClientEvent::Refused(err) => {
                format!(
                    "refused {:?} errno {} {:?}",
                    err.code, err.errno, err.message
                )
            }
            ClientEvent::FileReady(header) => format!(
                "file ready: size {} mode {:o} mtime {}.{:09} owner {}:{}",
                header.size,
                header.mode,
                header.mtime.secs,
                header.mtime.nanos,
                header.uid,
                header.gid
            ),
            ClientEvent::FileData(data) => format!("file data {:?}", String::from_utf8_lossy(data)),
            ClientEvent::Skipped(skipped) => format!(
                "skipped {:?} ({:?})",
                String::from_utf8_lossy(skipped.path.0),
                skipped.reason
            ),
            ClientEvent::FileDone(summary) => {
                format!(
                    "file done: {} bytes, sha256 {:?}",
                    summary.bytes, summary.sha256
                )
            }
            other => format!("{other:?}"),
        };
        events.push(text);
        rest = &rest[input.consumed..];
    }
    assert!(session.is_finished(), "{}: the client expects more", t.name);
    session.handle_eof(0).expect("a clean end");
    assert_eq!(session.poll_transmit(&mut out), Ok(0), "{}", t.name);
    (events, sent)
}

#[test]
fn transcripts_hold_for_both_sessions() {
    for t in TRANSCRIPTS {
        let client = client_bytes(t, &agent_hello_bytes(t));
        golden(&format!("{}.client.bin", t.name), &client);
        let agent = agent_bytes(t, &client);
        golden(&format!("{}.agent.bin", t.name), &agent);
        if !t.events.is_empty() {
            let (events, sent) = client_events(t, &agent);
            assert_eq!(events, t.events, "{}", t.name);
            assert_eq!(sent, client, "{}: the client sends its transcript", t.name);
        }
    }
}

#[test]
fn the_invalid_request_transcript_is_refused_with_its_reason() {
    let agent = std::fs::read(dir().join("exec_invalid_request.agent.bin")).expect("stored");
    let t = TRANSCRIPTS
        .iter()
        .find(|t| t.name == "exec_invalid_request")
        .expect("exists");
    let mut session = client_session(t);
    // Its hello and proof are accepted; the error frame follows and names the rule.
    let mut rest = &agent[..];
    let mut out = vec![0u8; MAX_FRAME];
    let mut events = Vec::new();
    while !rest.is_empty() {
        let input = session.handle_input(rest).unwrap();
        match input.event {
            Some(ClientEvent::HelloAccepted(_)) => {
                let request = exec(b"true\0", StdinMode::Null);
                start(
                    &Transcript {
                        operation: request,
                        ..*t
                    },
                    &mut session,
                    &mut out,
                )
                .unwrap();
                events.push(String::from("hello"));
            }
            Some(ClientEvent::Authenticated) => events.push(String::from("authenticated")),
            Some(ClientEvent::Refused(err)) => {
                events.push(format!("{:?} {}", err.code, err.message));
            }
            other => panic!("{other:?}"),
        }
        rest = &rest[input.consumed..];
    }
    assert_eq!(
        events,
        [
            "hello",
            "authenticated",
            "InvalidRequest environment entry is not KEY=VALUE"
        ]
    );
}

/// The refused proof's transcript, replayed to the agent by a client with the right secret:
/// still refused (the proof is in the bytes, not in who sends them).
#[test]
fn the_refused_proof_is_refused_whoever_replays_it() {
    let client = std::fs::read(dir().join("auth_refused.client.bin")).expect("stored");
    let t = TRANSCRIPTS
        .iter()
        .find(|t| t.name == "exec_output")
        .expect("exists");
    let mut session = agent_session(t);
    let mut rest = &client[..];
    let mut refused = None;
    while !rest.is_empty() {
        match session.handle_input(rest, 0) {
            Ok(input) => rest = &rest[input.consumed..],
            Err(err) => {
                refused = Some(err);
                break;
            }
        }
    }
    assert_eq!(refused, Some(SessionError::Unauthenticated));
}

/// The stored files decode frame by frame (a reader of `transcripts/README.md` can rely on it).
#[test]
fn transcript_files_are_whole_frames() {
    let mut names: Vec<_> = std::fs::read_dir(dir())
        .expect("transcripts dir")
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".bin"))
        .collect();
    names.sort();
    assert_eq!(names.len(), 2 * TRANSCRIPTS.len(), "{names:?}");
    for name in names {
        let bytes = std::fs::read(dir().join(&name)).unwrap();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let (body, used) = crate::split_frame(rest, crate::limits::MAX_FRAME_BODY)
                .unwrap()
                .unwrap_or_else(|| panic!("{name}: ends mid-frame"));
            if name.ends_with(".client.bin") {
                crate::decode_client_frame(body).unwrap();
            } else {
                crate::decode_agent_frame(body).unwrap();
            }
            rest = &rest[used..];
        }
    }
}
