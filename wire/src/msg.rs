//! The protocol's messages: what a client sends, what the agent answers, and their validation.
//!
//! NOTE: postcard is not self-describing. The order of enum variants and struct fields *is* the
//! wire format: append new variants at the end, never reorder, and bump [`PROTOCOL_VERSION`] for
//! any change to an existing message. `tests::variant_tags_are_pinned` holds each first byte.

use core::fmt;

use serde::{Deserialize, Serialize};

use crate::bytes::{ByteArray, Bytes};
use crate::jobs::*;
use crate::limits::*;
use crate::ops::*;

/// Opens every hello, so a peer that speaks something else is told apart from a version mismatch.
pub const MAGIC: [u8; 4] = *b"FRRY";
/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 5;
/// The oldest protocol version this crate still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 5;

/// Everything a client sends to the agent.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientFrame<'a> {
    /// The client's first frame, in answer to the agent's hello.
    Hello(ClientHello),
    /// Run a program. A connection carries one operation at a time (protocol 5: several, one
    /// after another).
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
    /// Send this signal (1–64) to the command's process group. After the command ended it is
    /// ignored.
    Signal(u8),
    /// The client's terminal changed size: the agent sets the command's terminal to it (the
    /// command gets `SIGWINCH`). Ignored for a command without a terminal.
    Resize(WindowSize),
    /// End the command's whole tree: `SIGTERM` now, `SIGKILL` after the grace. A second
    /// cancel can only bring the `SIGKILL` closer.
    Cancel(Cancel),
    /// A piece of the request's argv or environment, before [`ClientFrame::Exec`], for requests
    /// larger than one frame: the pieces of a list, then the exec frame's own list, concatenated
    /// in order, are the list (a piece may end mid-entry).
    #[serde(borrow)]
    ExecPart(ExecPart<'a>),
    /// Write a file or unpack a tree (protocol 4); its content follows as
    /// [`ClientFrame::Stdin`], then [`ClientFrame::PutEnd`].
    #[serde(borrow)]
    Put(PutRequest<'a>),
    /// The end of a put's content: its SHA-256, which the agent checks before the file replaces
    /// the destination.
    PutEnd(ByteArray<DIGEST_LEN>),
    /// Read a file or a tree.
    #[serde(borrow)]
    Get(GetRequest<'a>),
    /// Describe the guest ([`AgentFrame::SystemInfo`] and the frames after it).
    Info,
    /// Power off or reboot the guest (privileged: the policy's `allow_shutdown`).
    Shutdown(ShutdownRequest),
    /// Set the guest's realtime clock to this (privileged, like shutdown). Answered with
    /// [`AgentFrame::ClockSet`].
    TimeSync(Timestamp),
    /// Mix these random bytes (1 to [`MAX_RESEED`]) into the guest's entropy pool and credit
    /// them (privileged, like shutdown). Answered with [`AgentFrame::Done`].
    #[serde(borrow)]
    Reseed(Bytes<'a>),
    /// The [`ClientFrame::Exec`] that follows starts a detached job (protocol 5). Answered with
    /// [`AgentFrame::Detached`].
    #[serde(borrow)]
    StartJob(JobStart<'a>),
    /// List the jobs ([`AgentFrame::Job`] each, then [`AgentFrame::Done`]).
    #[serde(borrow)]
    Jobs(JobQuery<'a>),
    /// Follow a job's output (and, if granted, feed its stdin).
    #[serde(borrow)]
    Attach(AttachRequest<'a>),
    /// Wait for a job to end: answered with its [`AgentFrame::Exited`].
    #[serde(borrow)]
    Wait(JobRequest<'a>),
    /// Signal a job's tree. Answered with [`AgentFrame::Done`].
    #[serde(borrow)]
    Kill(KillJob<'a>),
    /// Forget an ended job and its output. Answered with [`AgentFrame::Done`].
    #[serde(borrow)]
    Remove(JobRequest<'a>),
}

/// See [`ClientFrame::Cancel`].
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancel {
    /// Milliseconds between `SIGTERM` and `SIGKILL`; `None`: the request's
    /// [`ExecRequest::kill_grace_ms`].
    pub grace_ms: Option<u32>,
}

/// See [`ClientFrame::ExecPart`].
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecPart<'a> {
    /// Which list the bytes belong to.
    pub list: ListKind,
    /// At most [`MAX_DATA`] bytes of it.
    #[serde(borrow)]
    pub data: Bytes<'a>,
}

/// The two lists of an exec request.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListKind {
    /// [`ExecRequest::argv`].
    Argv,
    /// [`ExecRequest::env`].
    Env,
}

/// A terminal's size in character cells.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WindowSize {
    /// Lines.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// A chunk of a command's output.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Output<'a> {
    /// When the agent read it: microseconds since the command was started, on the guest's
    /// monotonic clock (so stdout and stderr can be interleaved as they happened).
    pub at_us: u64,
    /// The bytes.
    #[serde(borrow)]
    pub data: Bytes<'a>,
}

/// A command's output stream.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output (on a terminal: everything the command wrote).
    Stdout,
    /// Standard error.
    Stderr,
}

/// See [`AgentFrame::OutputDropped`].
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    /// Which stream.
    pub stream: Stream,
    /// How many bytes were dropped between the head already sent and the tail that follows.
    pub bytes: u64,
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
    Stdout(Output<'a>),
    /// A chunk of the command's stderr.
    Stderr(Output<'a>),
    /// The agent wrote this many more stdin bytes into the command's pipe: the client may send
    /// that many more.
    StdinCredit(u32),
    /// The command ended; the last frame of an exec.
    Exited(Termination),
    /// The request failed; the last frame of the operation.
    Error(ErrorFrame<'a>),
    /// Sent once, on the readiness connection, after the agent's hello (see ARCHITECTURE.md).
    #[serde(borrow)]
    Ready(ReadyReport<'a>),
    /// The client's proof was right; this is the agent's own proof of the secret, which the
    /// client checks before it believes anything else.
    Authenticated(AgentProof),
    /// An operation without output finished (e.g. [`ClientFrame::KillAll`]); the last frame.
    Done(DoneReport),
    /// Sent every [`Limits::keepalive_ms`] while an operation runs: the agent is alive even when
    /// the command is silent.
    Keepalive,
    /// A stream passed the request's [`ExecRequest::max_output`]: its head was sent, this many
    /// bytes were dropped, and its tail (the last bytes before its end) follows.
    OutputDropped(Dropped),
    /// A transfer was checked and begins: a get's file, a put's destination.
    FileReady(FileHeader),
    /// A chunk of a get's content.
    #[serde(borrow)]
    FileData(Bytes<'a>),
    /// An entry of a tree transfer was left out.
    Skipped(Skipped<'a>),
    /// A put or a get is complete; the last frame.
    FileDone(FileSummary),
    /// The first frame of an info operation.
    SystemInfo(SystemInfo<'a>),
    /// A mounted file system (info).
    Mount(MountInfo<'a>),
    /// A network interface (info).
    Interface(InterfaceInfo<'a>),
    /// The guest's clock was set; this is what it said before. The last frame of a time sync.
    ClockSet(Timestamp),
    /// A job was started and runs on without this connection; the last frame of its start.
    Detached(JobStarted),
    /// A job of the registry (listing).
    #[serde(borrow)]
    Job(JobRecord<'a>),
    /// An attachment begins: where each stream resumes, and whether stdin was granted.
    Attached(AttachHeader),
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
    /// The longest single argv or environment entry, NUL included.
    pub max_arg_len: u32,
    /// How often the agent sends [`AgentFrame::Keepalive`] while an operation runs (0: never).
    pub keepalive_ms: u32,
    /// Protocol 5: how long (milliseconds) a connection may idle after an operation's final
    /// frame before the agent closes it, silently; another request may come meanwhile. 0: one
    /// operation per connection, closed after its final frame.
    pub idle_ms: u32,
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
        max_arg_len: MAX_ARG_LEN as u32,
        keepalive_ms: KEEPALIVE_MS,
        idle_ms: 0,
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
    /// Run the command on a pseudo-terminal of this size (its stdout and stderr are then one
    /// stream, [`AgentFrame::Stdout`]); `TERM` travels in `env`.
    pub pty: Option<WindowSize>,
    /// Milliseconds the command may run before its tree is ended (`SIGTERM`, then `SIGKILL`
    /// after the grace) and the record says it timed out; 0: no timeout.
    pub timeout_ms: u64,
    /// Milliseconds between the `SIGTERM` and the `SIGKILL` of a timeout or a cancel; `None`:
    /// the agent's default, [`DEFAULT_KILL_GRACE_MS`].
    pub kill_grace_ms: Option<u32>,
    /// When the command exits, kill what is left of its tree (daemons included) instead of
    /// leaving it running.
    pub kill_tree_on_exit: bool,
    /// Bytes of each output stream kept: past it the agent keeps the head and the tail and
    /// drops the middle ([`AgentFrame::OutputDropped`]); 0: the agent's own maximum.
    pub max_output: u64,
}

/// The grace between `SIGTERM` and `SIGKILL` when a request names none.
pub const DEFAULT_KILL_GRACE_MS: u32 = 2_000;

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
}

/// The rules of a packed list, checked as its pieces arrive: the byte and entry limits, the
/// longest entry, `argv[0]` not empty, environment entries `KEY=VALUE`, a NUL at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListCheck {
    kind: ListKind,
    bytes: usize,
    /// Entries begun (the current one counts once it has a byte).
    entries: usize,
    /// Bytes of the current entry so far, NUL excluded.
    entry_len: usize,
    /// The current environment entry has an `=` past its first byte.
    has_key: bool,
    max_bytes: usize,
    max_entries: usize,
    max_entry: usize,
}

impl ListCheck {
    /// A check of an empty list of `kind`, within `limits` (and never beyond this crate's).
    pub fn new(kind: ListKind, limits: &Limits) -> ListCheck {
        let within = |limit: u32, ours: usize| (limit as usize).min(ours);
        let (max_bytes, max_entries) = match kind {
            ListKind::Argv => (
                within(limits.max_argv_bytes, MAX_ARGV_BYTES),
                within(limits.max_args, MAX_ARGS),
            ),
            ListKind::Env => (
                within(limits.max_env_bytes, MAX_ENV_BYTES),
                within(limits.max_env_vars, MAX_ENV_VARS),
            ),
        };
        ListCheck {
            kind,
            bytes: 0,
            entries: 0,
            entry_len: 0,
            has_key: false,
            max_bytes,
            max_entries,
            max_entry: within(limits.max_arg_len, MAX_ARG_LEN),
        }
    }

    /// The list's bytes so far.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Takes the next piece of the list.
    pub fn feed(&mut self, piece: &[u8]) -> Result<(), RequestError> {
        self.bytes = self.bytes.saturating_add(piece.len());
        if self.bytes > self.max_bytes {
            return Err(RequestError::LIMIT);
        }
        for fragment in piece.split_inclusive(|b| *b == 0) {
            let (text, ends) = match fragment.split_last() {
                Some((0, text)) => (text, true),
                _ => (fragment, false),
            };
            if self.entry_len == 0 && (!text.is_empty() || ends) {
                self.entries += 1;
                if self.entries > self.max_entries {
                    return Err(RequestError::LIMIT);
                }
            }
            if self.kind == ListKind::Env && !self.has_key {
                match text.iter().position(|b| *b == b'=') {
                    Some(0) if self.entry_len == 0 => return Err(RequestError::NOT_KEY_VALUE),
                    Some(_) => self.has_key = true,
                    None => {}
                }
            }
            self.entry_len += text.len();
            // The entry's NUL counts toward its length.
            if self.entry_len + usize::from(ends) > self.max_entry {
                return Err(RequestError::LIMIT);
            }
            if ends {
                if self.kind == ListKind::Argv && self.entries == 1 && self.entry_len == 0 {
                    return Err(RequestError::invalid("argv[0] is empty"));
                }
                if self.kind == ListKind::Env && !self.has_key {
                    return Err(RequestError::NOT_KEY_VALUE);
                }
                self.entry_len = 0;
                self.has_key = false;
            }
        }
        Ok(())
    }

    /// The list is complete: its last entry must have its NUL (and an argv an entry).
    pub fn finish(&self) -> Result<(), RequestError> {
        if self.entry_len > 0 {
            return Err(RequestError::invalid("list entry without NUL terminator"));
        }
        if self.kind == ListKind::Argv && self.entries == 0 {
            return Err(RequestError::invalid("argv is empty"));
        }
        Ok(())
    }
}

/// An [`ExecRequest`] that passed [`ExecRequest::validate`]: every list is well formed and
/// every limit holds.
#[derive(Debug, Clone, Copy)]
pub struct ValidExec<'a> {
    request: ExecRequest<'a>,
    parts: bool,
}

impl<'a> ValidExec<'a> {
    /// The validated request.
    pub fn request(&self) -> &ExecRequest<'a> {
        &self.request
    }

    /// Whether pieces of its lists came first ([`ClientFrame::ExecPart`]): its `argv` and `env`
    /// are then only the last piece of each.
    pub fn has_parts(&self) -> bool {
        self.parts
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
    pub(crate) const LIMIT: RequestError = RequestError {
        code: ErrorCode::LimitExceeded,
        message: "request exceeds the agent's limits",
    };
    const NOT_KEY_VALUE: RequestError = RequestError::invalid("environment entry is not KEY=VALUE");
    pub(crate) const fn invalid(message: &'static str) -> Self {
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
        let argv = ListCheck::new(ListKind::Argv, limits);
        let env = ListCheck::new(ListKind::Env, limits);
        self.validate_after(limits, argv, env)
    }

    /// Like [`ExecRequest::validate_within`], for the last piece of lists whose earlier pieces
    /// `argv` and `env` have checked.
    pub fn validate_after(
        self,
        limits: &Limits,
        mut argv: ListCheck,
        mut env: ListCheck,
    ) -> Result<ValidExec<'a>, RequestError> {
        let within = |limit: u32, ours: usize| (limit as usize).min(ours);
        let parts = argv.bytes() > 0 || env.bytes() > 0;
        argv.feed(self.argv.as_bytes())?;
        argv.finish()?;
        env.feed(self.env.as_bytes())?;
        env.finish()?;
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
        Ok(ValidExec {
            request: self,
            parts,
        })
    }
}

/// The execve succeeded.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Started {
    /// The command's pid inside the guest (also its session and process group id).
    pub pid: u32,
}

/// How a command ended: the termination record.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Termination {
    /// Its exit code or the signal that ended it.
    pub status: ExitStatus,
    /// From fork to reap, in microseconds of the guest's monotonic clock.
    pub duration_us: u64,
    /// Whether any output was dropped rather than delivered (the output cap, the post-exit
    /// drain limit, a failed pipe). Never silently: the record is how output goes missing.
    pub output_dropped: bool,
    /// What ended it.
    pub ending: Ending,
    /// How its tree was killed, if it was.
    pub tree_kill: TreeKill,
    /// What its stdout produced and dropped.
    pub stdout: StreamRecord,
    /// What its stderr produced and dropped.
    pub stderr: StreamRecord,
    /// Other processes (a background writer, a daemon) still held its output pipes when the
    /// command ended and the drain stopped waiting for them: what they write later is lost.
    pub pipes_held: bool,
    /// The kernel's OOM killer killed a process of the command's tree (cgroup v2 only).
    pub oom_killed: bool,
    /// The most memory its tree used, in bytes (cgroup v2's `memory.peak`; 0: unknown).
    pub peak_memory: u64,
}

/// What ended a command.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// It ended by itself (an exit, or a signal nobody of ferry's sent).
    Exited,
    /// Its [`ExecRequest::timeout_ms`] ran out.
    TimedOut,
    /// The client cancelled it ([`ClientFrame::Cancel`]).
    Cancelled,
    /// It ran past the agent's maximum runtime.
    RuntimeLimit,
    /// It wrote past the agent's maximum output.
    OutputLimit,
}

/// How a command's tree was killed.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeKill {
    /// It was not.
    None,
    /// Every process of its cgroup (`cgroup.kill`): nothing escapes.
    Cgroup,
    /// Its process group (no cgroup here): a process that left the group escapes.
    ProcessGroup,
}

/// One output stream's account.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamRecord {
    /// Bytes the command wrote to it (that the agent read).
    pub bytes: u64,
    /// Of those, bytes not delivered.
    pub dropped: u64,
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
    /// The kernel refused the arguments and environment as too long (E2BIG).
    ArgumentsTooLong,
    /// The destination exists and the request said not to replace it (or EEXIST).
    AlreadyExists,
    /// The path is not what the operation needs: a directory where a file is expected, a
    /// special file, or a file where a directory is expected.
    WrongFileType,
    /// The content is larger than the agent's maximum file size (or EFBIG).
    FileTooLarge,
    /// Not enough free space for the content (or ENOSPC, EDQUOT).
    NoSpace,
    /// The content's SHA-256 or size is not what the client said: nothing was replaced.
    IntegrityMismatch,
    /// A tree's entry would land outside its destination (an absolute name, `..`, or a path
    /// through a symbolic link).
    PathEscape,
    /// Reading or writing failed (see errno).
    Io,
    /// A tree's tar stream is not valid.
    BadArchive,
    /// No job has this id or name (or the request's user may not see it).
    NoSuchJob,
    /// The job still runs (it cannot be removed).
    JobRunning,
    /// The job has ended (it cannot be signalled).
    JobEnded,
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
            ErrorCode::ArgumentsTooLong => "argument list too long",
            ErrorCode::AlreadyExists => "file exists",
            ErrorCode::WrongFileType => "wrong file type",
            ErrorCode::FileTooLarge => "file too large",
            ErrorCode::NoSpace => "no space left on device",
            ErrorCode::IntegrityMismatch => "content does not match its digest or size",
            ErrorCode::PathEscape => "path escapes the destination",
            ErrorCode::Io => "input/output error",
            ErrorCode::BadArchive => "invalid tar stream",
            ErrorCode::NoSuchJob => "no such job",
            ErrorCode::JobRunning => "the job is still running",
            ErrorCode::JobEnded => "the job has ended",
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
pub struct ReadyReport<'a> {
    /// The guest's vsock CID (0 when the agent listens on a Unix socket only).
    pub cid: u32,
    /// When the agent's `main` began.
    pub init_started_us: u64,
    /// Time spent loading kernel modules (included in `listening_us - init_started_us`).
    pub modules_us: u64,
    /// When the listener was ready to accept.
    pub listening_us: u64,
    /// Each module loaded, with its time: `NAME=MICROSECONDS` entries, NUL-terminated, packed
    /// (at most [`MAX_MODULE_TIMES`] bytes).
    #[serde(borrow)]
    pub module_times: StrList<'a>,
}
