//! Everything that can go wrong, as values a caller can match on.

use std::io;

pub use ferry_wire::ErrorCode;

/// An error from the host library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The target string does not name a transport this library speaks.
    #[error("invalid target {target:?}: {reason}")]
    InvalidTarget {
        /// The text as given.
        target: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The transport could not be opened (no such socket, refused, timed out, …).
    #[error("cannot connect to {target}: {source}")]
    Connect {
        /// The target, as text.
        target: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A hybrid-vsock socket answered the `CONNECT` line with something other than `OK <n>`.
    #[error("{target}: the VMM refused the vsock connection: {reply:?}")]
    HvsockRefused {
        /// The target, as text.
        target: String,
        /// The reply line (truncated).
        reply: String,
    },
    /// Reading from or writing to an established connection failed.
    #[error("connection to the agent failed: {0}")]
    Io(#[source] io::Error),
    /// The agent sent nothing, not even a keepalive, for three of its keepalive intervals while
    /// an operation ran: it is frozen (a paused VM, a stopped process) or unreachable. A silent
    /// command is not a silent agent: the agent speaks for it.
    #[error("agent stopped answering")]
    AgentSilent,
    /// The agent closed the connection before the operation finished.
    #[error("the agent closed the connection {0}")]
    Disconnected(&'static str),
    /// The agent sent something this library cannot accept (a bug or a different program).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The agent speaks no protocol version this library speaks.
    #[error("the agent does not speak protocol version {min}..={max}: {message}")]
    UnsupportedVersion {
        /// The oldest version this library speaks.
        min: u16,
        /// The newest version this library speaks.
        max: u16,
        /// The agent's explanation.
        message: String,
    },
    /// The request was refused before anything was sent: it breaks a limit or a rule.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The agent refused or failed the operation.
    #[error("{0}")]
    Remote(RemoteError),
    /// Authentication failed: the agent refused our proof, or could not prove its own.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The agent requires authentication and no secret was given.
    #[error(
        "the agent requires authentication: give its secret (--secret-file or FERRY_SECRET_FILE)"
    )]
    SecretRequired,
    /// A secret was given and the agent runs without authentication (`--insecure`): it cannot
    /// prove who it is, so nothing is sent to it.
    #[error(
        "the agent runs without authentication (--insecure) but a secret was given: \
         refusing to talk to an agent that cannot prove who it is"
    )]
    AgentInsecure,
    /// A transfer's content arrived, but the agent's count or SHA-256 of it differs from ours:
    /// something between the two changed it. Nothing is reported as transferred.
    #[error(
        "the content does not match the agent's summary: {bytes} bytes with SHA-256 {} here, \
         {agent_bytes} bytes with SHA-256 {} by the agent",
        crate::transfer::hex(sha256),
        crate::transfer::hex(agent_sha256)
    )]
    IntegrityMismatch {
        /// Bytes the agent counted.
        agent_bytes: u64,
        /// The agent's SHA-256.
        agent_sha256: [u8; 32],
        /// Bytes we counted.
        bytes: u64,
        /// Our SHA-256.
        sha256: [u8; 32],
    },
    /// A local read or write of a transfer's content failed (the reader given to a put, the
    /// writer given to a get).
    #[error("{context}: {source}")]
    Local {
        /// What was being done.
        context: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A secret file cannot be used.
    #[error("secret file {}: {reason}", path.display())]
    Secret {
        /// The file.
        path: std::path::PathBuf,
        /// Why not.
        reason: String,
    },
}

/// A failure the agent reported in an error frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteError {
    /// What went wrong, from the protocol's closed set.
    pub code: ErrorCode,
    /// The guest errno behind it, when one applies.
    pub errno: Option<u32>,
    /// The agent's message for people.
    pub message: String,
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.code)?;
        if !self.message.is_empty() && self.message != self.code.as_str() {
            write!(f, ": {}", self.message)?;
        }
        if let Some(errno) = self.errno {
            write!(f, " ({})", errno_name(errno))?;
        }
        Ok(())
    }
}

impl Error {
    /// The agent's error code, when the agent reported the failure.
    pub fn remote_code(&self) -> Option<ErrorCode> {
        match self {
            Error::Remote(remote) => Some(remote.code),
            _ => None,
        }
    }
}

/// The symbolic name of a Linux errno (the guest's: x86_64 and aarch64 agree on these).
pub fn errno_name(errno: u32) -> String {
    let name = match errno {
        1 => "EPERM",
        2 => "ENOENT",
        4 => "EINTR",
        5 => "EIO",
        7 => "E2BIG",
        8 => "ENOEXEC",
        9 => "EBADF",
        11 => "EAGAIN",
        12 => "ENOMEM",
        13 => "EACCES",
        14 => "EFAULT",
        16 => "EBUSY",
        17 => "EEXIST",
        18 => "EXDEV",
        20 => "ENOTDIR",
        21 => "EISDIR",
        22 => "EINVAL",
        23 => "ENFILE",
        24 => "EMFILE",
        26 => "ETXTBSY",
        27 => "EFBIG",
        28 => "ENOSPC",
        30 => "EROFS",
        31 => "EMLINK",
        36 => "ENAMETOOLONG",
        39 => "ENOTEMPTY",
        40 => "ELOOP",
        95 => "EOPNOTSUPP",
        122 => "EDQUOT",
        _ => return format!("errno {errno}"),
    };
    name.to_owned()
}
