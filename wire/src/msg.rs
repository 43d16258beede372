//! The protocol's messages: what a client sends, what the agent answers, and their validation.
//!
//! NOTE: postcard is not self-describing. The order of enum variants and struct fields *is* the
//! wire format: append new variants at the end, never reorder, and bump [`PROTOCOL_VERSION`] for
//! any change to an existing message. `tests::variant_tags_are_pinned` holds each first byte.

use core::fmt;

use serde::{Deserialize, Serialize};

use crate::bytes::{ByteArray, Bytes};
use crate::limits::*;

/// Opens every hello, so a peer that speaks something else is told apart from a version mismatch.
pub const MAGIC: [u8; 4] = *b"FRRY";
/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 2;
/// The oldest protocol version this crate still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 2;

/// Everything a client sends to the agent.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientFrame<'a> {
    /// The client's first frame, in answer to the agent's hello.
    Hello(ClientHello),
    /// Run a program. One connection carries one operation.
    #[serde(borrow)]
    Exec(ExecRequest<'a>),
    /// Bytes for the command's stdin, within the credit the agent granted.
    Stdin(Bytes<'a>),
    /// The client will send no more stdin; the agent closes the pipe once it has drained.
    StdinEof,
    /// Right after [`ClientFrame::Hello`], unless the agent is insecure: the proof that the
    /// client knows the agent's secret (see `session::auth`).
    #[serde(borrow)]
    Auth(ClientProof<'a>),
    /// End every command the agent runs (all processes in its commands' cgroup), whoever
    /// started them. Answered with [`AgentFrame::Done`].
    KillAll,
}

/// Everything the agent sends to a client.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentFrame<'a> {
    /// The answer to [`ClientHello`].
    #[serde(borrow)]
    Hello(AgentHello<'a>),
    /// The program was executed (the `execve` succeeded).
    Started(Started),
    /// A chunk of the command's stdout.
    Stdout(Bytes<'a>),
    /// A chunk of the command's stderr.
    Stderr(Bytes<'a>),
    /// The agent wrote this many more stdin bytes into the command's pipe: the client may send
    /// that many more.
    StdinCredit(u32),
    /// The command ended; the last frame of an exec.
    Exited(Termination),
    /// The request failed; the last frame of the operation.
    Error(ErrorFrame<'a>),
    /// Sent once, on the readiness connection, after the agent's hello (see ARCHITECTURE.md).
    Ready(ReadyReport),
    /// The client's proof was right; this is the agent's own proof of the secret, which the
    /// client checks before it believes anything else.
    Authenticated(AgentProof),
    /// An operation without output finished (e.g. [`ClientFrame::KillAll`]); the last frame.
    Done(DoneReport),
}

/// The client's proof of the secret: an HMAC-SHA-256 over the conversation so far.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientProof<'a> {
    /// A fresh random value of the client's, so the agent's proof is fresh for it too.
    pub nonce: ByteArray<NONCE_LEN>,
    /// [`crate::session::auth`]'s client proof; any other length is simply wrong.
    #[serde(borrow)]
    pub mac: Bytes<'a>,
}

/// The agent's proof of the secret.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentProof {
    /// [`crate::session::auth`]'s agent proof.
    pub mac: ByteArray<MAC_LEN>,
}

/// What an operation without output did.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct DoneReport {
    /// How many processes it affected, when known (0 otherwise).
    pub count: u32,
}

/// Whether an agent checks who connects.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// Every connection proves the per-VM secret before any request.
    Authenticated,
    /// The agent was started with `--insecure`: anyone who reaches it may run anything it allows.
    Insecure,
}

/// How the agent bounds commands, beyond the protocol's [`Limits`] (0: no limit).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bounds {
    /// Seconds a command may run before it is killed.
    pub max_runtime_s: u64,
    /// Output bytes (stdout and stderr together) a command may produce before it is killed.
    pub max_output: u64,
    /// The largest file a command may write.
    pub max_file_size: u64,
    /// Connections the agent serves at once; beyond it, [`ErrorCode::Busy`].
    pub max_connections: u32,
    /// Milliseconds a client has for its hello, proof and request.
    pub handshake_timeout_ms: u32,
    /// Memory all commands together may use (their cgroup's `memory.max`).
    pub memory_max: u64,
    /// Processes all commands together may have (their cgroup's `pids.max`).
    pub pids_max: u32,
    /// Whether commands run in a cgroup of their own (else rlimits alone bound them).
    pub cgroup: bool,
    /// The uid and gid commands run as unless a request names another user.
    pub default_uid: u32,
    /// See `default_uid`.
    pub default_gid: u32,
}

/// The client's opening frame: the range of protocol versions it speaks.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientHello {
    /// Must be [`MAGIC`].
    pub magic: [u8; 4],
    /// The oldest version the client speaks.
    pub min_version: u16,
    /// The newest version the client speaks.
    pub max_version: u16,
}

impl ClientHello {
    /// The hello this crate's version of the protocol sends.
    pub const CURRENT: ClientHello = ClientHello {
        magic: MAGIC,
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
    };

    /// The version both sides will speak: the highest one both support, or `None`.
    pub fn negotiate(&self) -> Option<u16> {
        if self.magic != MAGIC {
            return None;
        }
        let low = self.min_version.max(MIN_PROTOCOL_VERSION);
        let high = self.max_version.min(PROTOCOL_VERSION);
        (low <= high).then_some(high)
    }
}

/// The agent's opening frame, sent as soon as it accepts: what it speaks, a fresh challenge,
/// and the limits it enforces.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentHello<'a> {
    /// Must be [`MAGIC`].
    pub magic: [u8; 4],
    /// The oldest protocol version the agent speaks.
    pub min_version: u16,
    /// The newest; both sides speak the highest version both support.
    pub version: u16,
    /// The agent's own version (its crate version), at most [`MAX_VERSION_STRING`] bytes.
    pub agent_version: &'a str,
    /// The limits the agent enforces.
    pub limits: Limits,
    /// Fresh random bytes for this connection alone: the client's proof covers them, so a
    /// proof is worthless on any other connection.
    pub nonce: ByteArray<NONCE_LEN>,
    /// Whether a proof is required.
    pub security: Security,
    /// How the agent bounds commands.
    pub bounds: Bounds,
}

/// The limits an agent enforces, announced in its hello so a client can stay within them.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest frame body accepted.
    pub max_frame_body: u32,
    /// The largest data chunk in one frame.
    pub max_data: u32,
    /// The largest argv, in bytes with NULs.
    pub max_argv_bytes: u32,
    /// The most argv entries.
    pub max_args: u32,
    /// The largest environment override list, in bytes with NULs.
    pub max_env_bytes: u32,
    /// The most environment overrides.
    pub max_env_vars: u32,
    /// The longest working directory.
    pub max_path: u32,
    /// The initial stdin credit of every exec.
    pub stdin_window: u32,
    /// The longest user specification (`USER[:GROUP]`) a request may carry.
    pub max_user: u32,
}

impl Limits {
    /// The limits of this crate's version.
    pub const CURRENT: Limits = Limits {
        max_frame_body: MAX_FRAME_BODY as u32,
        max_data: MAX_DATA as u32,
        max_argv_bytes: MAX_ARGV_BYTES as u32,
        max_args: MAX_ARGS as u32,
        max_env_bytes: MAX_ENV_BYTES as u32,
        max_env_vars: MAX_ENV_VARS as u32,
        max_path: MAX_PATH as u32,
        stdin_window: STDIN_WINDOW as u32,
        max_user: MAX_USER as u32,
    };
}

/// Run a program: `execve(argv[0] or its PATH match, argv, env)` in `cwd`, in a new session.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecRequest<'a> {
    /// NUL-terminated entries, `argv[0]` first. A bare name is looked up in `PATH`.
    #[serde(borrow)]
    pub argv: StrList<'a>,
    /// NUL-terminated `KEY=VALUE` overrides, applied over the inherited environment (or over
    /// nothing when `clean_env`).
    pub env: StrList<'a>,
    /// Start from an empty environment instead of the agent's.
    pub clean_env: bool,
    /// The working directory; the agent's default when `None`.
    pub cwd: Option<Bytes<'a>>,
    /// Where the command's stdin comes from.
    pub stdin: StdinMode,
    /// Run as this user instead of the agent's default: `NAME[:GROUP]` or `UID[:GID]`, resolved
    /// in the guest. The agent's policy decides who may be asked for.
    pub user: Option<Bytes<'a>>,
}

/// Where a command's stdin comes from.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum StdinMode {
    /// `/dev/null`: the command sees EOF at once.
    Null,
    /// A pipe fed by [`ClientFrame::Stdin`] until [`ClientFrame::StdinEof`] or disconnect.
    Pipe,
}

/// A packed list of NUL-terminated byte strings: exactly the layout `execve` wants.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StrList<'a>(#[serde(borrow)] pub Bytes<'a>);

impl<'a> StrList<'a> {
    /// Wraps a packed list; see [`ExecRequest::validate`] for what makes one valid.
    pub const fn new(packed: &'a [u8]) -> Self {
        StrList(Bytes(packed))
    }

    /// The packed bytes, NULs included.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.0 .0
    }

    /// The entries, each with its terminating NUL. A trailing fragment without NUL is yielded
    /// as is; validation rejects it.
    pub fn entries_with_nul(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.as_bytes().split_inclusive(|b| *b == 0)
    }

    /// The entries without their NULs.
    pub fn entries(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.entries_with_nul()
            .map(|e| e.strip_suffix(&[0]).unwrap_or(e))
    }

    /// How many entries the list holds.
    pub fn len(&self) -> usize {
        self.entries_with_nul().count()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.as_bytes().is_empty()
    }

    fn check(&self, max_bytes: usize, max_entries: usize) -> Result<(), RequestError> {
        let bytes = self.as_bytes();
        if bytes.len() > max_bytes || self.len() > max_entries {
            return Err(RequestError::LIMIT);
        }
        if bytes.last().is_some_and(|b| *b != 0) {
            return Err(RequestError::invalid("list entry without NUL terminator"));
        }
        Ok(())
    }
}

/// An [`ExecRequest`] that passed [`ExecRequest::validate`]: every list is well formed and
/// every limit holds.
#[derive(Debug, Clone, Copy)]
pub struct ValidExec<'a>(ExecRequest<'a>);

impl<'a> ValidExec<'a> {
    /// The validated request.
    pub fn request(&self) -> &ExecRequest<'a> {
        &self.0
    }
}

/// Why an exec request was refused before anything ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestError {
    /// [`ErrorCode::LimitExceeded`] or [`ErrorCode::InvalidRequest`].
    pub code: ErrorCode,
    /// What was wrong.
    pub message: &'static str,
}

impl RequestError {
    const LIMIT: RequestError = RequestError {
        code: ErrorCode::LimitExceeded,
        message: "request exceeds the agent's limits",
    };
    const fn invalid(message: &'static str) -> Self {
        RequestError {
            code: ErrorCode::InvalidRequest,
            message,
        }
    }
}

impl<'a> ExecRequest<'a> {
    /// Checks every structural rule and this crate's limits once; the result carries the proof.
    pub fn validate(self) -> Result<ValidExec<'a>, RequestError> {
        self.validate_within(&Limits::CURRENT)
    }

    /// Like [`ExecRequest::validate`], within `limits` (an agent's announced or configured ones);
    /// a limit above this crate's own counts as this crate's, so a `ValidExec` always fits the
    /// buffers sized by [`crate::limits`].
    pub fn validate_within(self, limits: &Limits) -> Result<ValidExec<'a>, RequestError> {
        let within = |limit: u32, ours: usize| (limit as usize).min(ours);
        self.argv.check(
            within(limits.max_argv_bytes, MAX_ARGV_BYTES),
            within(limits.max_args, MAX_ARGS),
        )?;
        self.env.check(
            within(limits.max_env_bytes, MAX_ENV_BYTES),
            within(limits.max_env_vars, MAX_ENV_VARS),
        )?;
        match self.argv.entries().next() {
            None => return Err(RequestError::invalid("argv is empty")),
            Some([]) => return Err(RequestError::invalid("argv[0] is empty")),
            Some(_) => {}
        }
        for entry in self.env.entries() {
            match entry.iter().position(|b| *b == b'=') {
                Some(0) | None => {
                    return Err(RequestError::invalid("environment entry is not KEY=VALUE"))
                }
                Some(_) => {}
            }
        }
        if let Some(Bytes(user)) = self.user {
            if user.len() > within(limits.max_user, MAX_USER) {
                return Err(RequestError::LIMIT);
            }
            if user.is_empty() || user.contains(&0) {
                return Err(RequestError::invalid("user is empty or contains NUL"));
            }
        }
        if let Some(Bytes(cwd)) = self.cwd {
            if cwd.len() > within(limits.max_path, MAX_PATH) {
                return Err(RequestError::LIMIT);
            }
            if cwd.is_empty() || cwd.contains(&0) {
                return Err(RequestError::invalid("cwd is empty or contains NUL"));
            }
        }
        Ok(ValidExec(self))
    }
}

/// The execve succeeded.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Started {
    /// The command's pid inside the guest (also its session and process group id).
    pub pid: u32,
}

/// How a command ended.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Termination {
    /// Its exit code or the signal that ended it.
    pub status: ExitStatus,
    /// From fork to reap, in microseconds of the guest's monotonic clock.
    pub duration_us: u64,
    /// Whether any output was dropped rather than delivered (e.g. after the post-exit drain
    /// deadline). Never silently: this flag is the only way output goes missing.
    pub output_dropped: bool,
}

/// The end of a process: `exit(code)` or death by a signal.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(u8),
    /// It was killed by this signal.
    Signal {
        /// The signal number.
        number: u8,
        /// Whether it dumped core.
        core_dumped: bool,
    },
}

impl ExitStatus {
    /// The shells' convention: the code, or 128 + the signal number.
    pub fn shell_code(&self) -> u8 {
        match *self {
            ExitStatus::Code(code) => code,
            ExitStatus::Signal { number, .. } => 128u8.saturating_add(number),
        }
    }
}

/// A failed operation: a code from a closed set, the OS error number if one applies, and a
/// short message for people.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorFrame<'a> {
    /// What went wrong.
    pub code: ErrorCode,
    /// The errno behind it, 0 when none applies.
    pub errno: u32,
    /// At most [`MAX_MESSAGE`] bytes for people; scripts read `code`.
    pub message: &'a str,
}

/// What went wrong, from a closed set.
///
/// NOTE: append only; the discriminant is the wire encoding.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The hello's magic or version range does not match the agent's.
    UnsupportedVersion,
    /// A frame body did not decode.
    Malformed,
    /// A frame's declared length exceeds the limit.
    FrameTooLarge,
    /// A frame that is valid but not allowed here (e.g. exec before hello, stdin beyond credit).
    ProtocolViolation,
    /// The request exceeds a limit the agent announced.
    LimitExceeded,
    /// The request is structurally invalid (empty argv, bad env entry, …).
    InvalidRequest,
    /// The program does not exist (ENOENT).
    NotFound,
    /// The program may not be executed (EACCES, EPERM).
    PermissionDenied,
    /// The file is not an executable format the kernel knows (ENOEXEC).
    ExecFormat,
    /// The working directory cannot be entered.
    BadCwd,
    /// The command could not be started for another reason (see errno).
    SpawnFailed,
    /// Out of processes, memory or descriptors (EAGAIN, ENOMEM, EMFILE).
    ResourceExhausted,
    /// The agent is at its connection limit.
    Busy,
    /// A bug or an unexpected system failure in the agent.
    Internal,
    /// The client did not prove the secret (a missing, wrong, replayed or misplaced proof:
    /// which, the agent does not say).
    Unauthenticated,
    /// The operation is not available here (e.g. no cgroup to kill commands by).
    Unsupported,
}

impl ErrorCode {
    /// A short description for people.
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorCode::UnsupportedVersion => "unsupported protocol version",
            ErrorCode::Malformed => "malformed frame",
            ErrorCode::FrameTooLarge => "frame too large",
            ErrorCode::ProtocolViolation => "protocol violation",
            ErrorCode::LimitExceeded => "limit exceeded",
            ErrorCode::InvalidRequest => "invalid request",
            ErrorCode::NotFound => "no such file or directory",
            ErrorCode::PermissionDenied => "permission denied",
            ErrorCode::ExecFormat => "exec format error",
            ErrorCode::BadCwd => "cannot enter working directory",
            ErrorCode::SpawnFailed => "cannot start program",
            ErrorCode::ResourceExhausted => "resources exhausted",
            ErrorCode::Busy => "agent busy",
            ErrorCode::Internal => "internal agent error",
            ErrorCode::Unauthenticated => "authentication failed",
            ErrorCode::Unsupported => "not supported by this agent",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Boot timings the agent reports on the readiness connection, in microseconds of the guest's
/// `CLOCK_BOOTTIME` (time since the kernel started).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadyReport {
    /// The guest's vsock CID (0 when the agent listens on a Unix socket only).
    pub cid: u32,
    /// When the agent's `main` began.
    pub init_started_us: u64,
    /// Time spent loading kernel modules (included in `listening_us - init_started_us`).
    pub modules_us: u64,
    /// When the listener was ready to accept.
    pub listening_us: u64,
}
