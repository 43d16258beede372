//! The protocol's rules, once, for both ends: sans-IO state machines in quinn-proto's shape.
//!
//! A driver (the agent's poll pump, the host's blocking or async client, a VMM's epoll loop)
//! owns the socket, the buffers and the clock. It hands the session what arrived
//! (`handle_input`, `handle_eof`, `handle_timeout`), asks it what to send (`poll_transmit`,
//! or a command that encodes straight into the driver's buffer) and when to wake it
//! (`poll_timeout`), and gets back events that borrow from the input: an output chunk is never
//! copied by the session. Time is a `u64` of microseconds on any monotonic clock the driver likes,
//! passed in, never read.
//!
//! What the sessions enforce, so no driver has to: the hello comes first and is answered once;
//! a version both sides speak; one operation per connection, started before its output; stdin
//! only while piped and open, never beyond the credit granted, credit never returned beyond what
//! was sent; the termination record (or an error) is the last frame; a handshake that stalls ends.
//! Every breach is a typed [`SessionError`] (and, on the agent's side, an error frame to the
//! client before the connection closes).

mod agent;
mod auth;
mod client;
mod ready;

use core::fmt;

pub use agent::{
    encode_refusal, AgentAuth, AgentConfig, AgentEvent, AgentSession, EndFacts, OutputPhase,
    Refusal,
};
pub use auth::{Secret, SecretError};
pub use client::{AgentInfo, ClientAuth, ClientEvent, ClientSession, StdinSent};
pub use ready::{encode_ready_announcement, ReadyEvent, ReadyReceiver};

use crate::msg::{AgentFrame, ClientFrame};
use crate::recv::RecvError;

/// A point on the driver's monotonic clock, in microseconds.
pub type Micros = u64;

/// One parsed frame from the front of the input, or a request for more bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Input<E> {
    /// How many bytes of the input the session used: drop them from the receive buffer once
    /// the event is handled (the event borrows them).
    pub consumed: usize,
    /// What the frame meant to the driver; `None` with `consumed == 0` means "need more bytes",
    /// `None` with `consumed > 0` means the frame was handled inside the session.
    pub event: Option<E>,
}

impl<E> Input<E> {
    const NEED_MORE: Input<E> = Input {
        consumed: 0,
        event: None,
    };
}

/// The kinds of frame, for naming one in an error without borrowing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// `Hello` (either side).
    Hello,
    /// [`ClientFrame::Exec`].
    Exec,
    /// [`ClientFrame::Stdin`].
    Stdin,
    /// [`ClientFrame::StdinEof`].
    StdinEof,
    /// [`AgentFrame::Started`].
    Started,
    /// [`AgentFrame::Stdout`].
    Stdout,
    /// [`AgentFrame::Stderr`].
    Stderr,
    /// [`AgentFrame::StdinCredit`].
    StdinCredit,
    /// [`AgentFrame::Exited`].
    Exited,
    /// [`AgentFrame::Error`].
    Error,
    /// [`AgentFrame::Ready`].
    Ready,
    /// [`ClientFrame::Auth`].
    Auth,
    /// [`ClientFrame::KillAll`].
    KillAll,
    /// [`AgentFrame::Authenticated`].
    Authenticated,
    /// [`AgentFrame::Done`].
    Done,
    /// [`ClientFrame::Signal`].
    Signal,
    /// [`ClientFrame::Resize`].
    Resize,
    /// [`ClientFrame::Cancel`].
    Cancel,
    /// [`ClientFrame::ExecPart`].
    ExecPart,
    /// [`AgentFrame::Keepalive`].
    Keepalive,
    /// [`AgentFrame::OutputDropped`].
    OutputDropped,
    /// A put request.
    Put,
    /// The end of a put.
    PutEnd,
    /// A get request.
    Get,
    /// An info request.
    Info,
    /// A shutdown request.
    Shutdown,
    /// A time sync.
    TimeSync,
    /// A reseed.
    Reseed,
    /// A file header.
    FileReady,
    /// File content.
    FileData,
    /// A skipped entry.
    Skipped,
    /// A transfer summary.
    FileDone,
    /// System information.
    SystemInfo,
    /// A mount.
    Mount,
    /// An interface.
    Interface,
    /// A clock report.
    ClockSet,
    /// A job's start.
    StartJob,
    /// A job listing request.
    Jobs,
    /// An attach request.
    Attach,
    /// A wait request.
    Wait,
    /// A job kill request.
    Kill,
    /// A job removal request.
    Remove,
    /// A detached job's id.
    Detached,
    /// A job record.
    Job,
    /// An attachment's header.
    Attached,
}

impl FrameKind {
    /// A short name for people.
    pub const fn as_str(self) -> &'static str {
        match self {
            FrameKind::Hello => "a hello",
            FrameKind::Exec => "an exec request",
            FrameKind::Stdin => "stdin",
            FrameKind::StdinEof => "stdin EOF",
            FrameKind::Started => "a started record",
            FrameKind::Stdout => "stdout",
            FrameKind::Stderr => "stderr",
            FrameKind::StdinCredit => "stdin credit",
            FrameKind::Exited => "a termination record",
            FrameKind::Error => "an error",
            FrameKind::Ready => "a readiness report",
            FrameKind::Auth => "a proof",
            FrameKind::KillAll => "a kill-all request",
            FrameKind::Authenticated => "the agent's proof",
            FrameKind::Done => "a done record",
            FrameKind::Signal => "a signal",
            FrameKind::Resize => "a resize",
            FrameKind::Cancel => "a cancel",
            FrameKind::ExecPart => "a piece of an exec request",
            FrameKind::Keepalive => "a keepalive",
            FrameKind::OutputDropped => "an output-dropped notice",
            FrameKind::Put => "a put request",
            FrameKind::PutEnd => "the end of a put",
            FrameKind::Get => "a get request",
            FrameKind::Info => "an info request",
            FrameKind::Shutdown => "a shutdown request",
            FrameKind::TimeSync => "a time sync",
            FrameKind::Reseed => "a reseed",
            FrameKind::FileReady => "a file header",
            FrameKind::FileData => "file content",
            FrameKind::Skipped => "a skipped entry",
            FrameKind::FileDone => "a transfer summary",
            FrameKind::SystemInfo => "system information",
            FrameKind::Mount => "a mount",
            FrameKind::Interface => "an interface",
            FrameKind::ClockSet => "a clock report",
            FrameKind::StartJob => "a job start",
            FrameKind::Jobs => "a job listing request",
            FrameKind::Attach => "an attach request",
            FrameKind::Wait => "a wait request",
            FrameKind::Kill => "a job kill request",
            FrameKind::Remove => "a job removal request",
            FrameKind::Detached => "a detached job",
            FrameKind::Job => "a job record",
            FrameKind::Attached => "an attachment header",
        }
    }

    /// The kind of a client frame.
    pub const fn of_client(frame: &ClientFrame<'_>) -> FrameKind {
        match frame {
            ClientFrame::Hello(_) => FrameKind::Hello,
            ClientFrame::Exec(_) => FrameKind::Exec,
            ClientFrame::Stdin(_) => FrameKind::Stdin,
            ClientFrame::StdinEof => FrameKind::StdinEof,
            ClientFrame::Auth(_) => FrameKind::Auth,
            ClientFrame::KillAll => FrameKind::KillAll,
            ClientFrame::Signal(_) => FrameKind::Signal,
            ClientFrame::Resize(_) => FrameKind::Resize,
            ClientFrame::Cancel(_) => FrameKind::Cancel,
            ClientFrame::ExecPart(_) => FrameKind::ExecPart,
            ClientFrame::Put(_) => FrameKind::Put,
            ClientFrame::PutEnd(_) => FrameKind::PutEnd,
            ClientFrame::Get(_) => FrameKind::Get,
            ClientFrame::Info => FrameKind::Info,
            ClientFrame::Shutdown(_) => FrameKind::Shutdown,
            ClientFrame::TimeSync(_) => FrameKind::TimeSync,
            ClientFrame::Reseed(_) => FrameKind::Reseed,
            ClientFrame::StartJob(_) => FrameKind::StartJob,
            ClientFrame::Jobs(_) => FrameKind::Jobs,
            ClientFrame::Attach(_) => FrameKind::Attach,
            ClientFrame::Wait(_) => FrameKind::Wait,
            ClientFrame::Kill(_) => FrameKind::Kill,
            ClientFrame::Remove(_) => FrameKind::Remove,
        }
    }

    /// The kind of an agent frame.
    pub const fn of_agent(frame: &AgentFrame<'_>) -> FrameKind {
        match frame {
            AgentFrame::Hello(_) => FrameKind::Hello,
            AgentFrame::Started(_) => FrameKind::Started,
            AgentFrame::Stdout(_) => FrameKind::Stdout,
            AgentFrame::Stderr(_) => FrameKind::Stderr,
            AgentFrame::StdinCredit(_) => FrameKind::StdinCredit,
            AgentFrame::Exited(_) => FrameKind::Exited,
            AgentFrame::Error(_) => FrameKind::Error,
            AgentFrame::Ready(_) => FrameKind::Ready,
            AgentFrame::Authenticated(_) => FrameKind::Authenticated,
            AgentFrame::Done(_) => FrameKind::Done,
            AgentFrame::Keepalive => FrameKind::Keepalive,
            AgentFrame::OutputDropped(_) => FrameKind::OutputDropped,
            AgentFrame::FileReady(_) => FrameKind::FileReady,
            AgentFrame::FileData(_) => FrameKind::FileData,
            AgentFrame::Skipped(_) => FrameKind::Skipped,
            AgentFrame::FileDone(_) => FrameKind::FileDone,
            AgentFrame::SystemInfo(_) => FrameKind::SystemInfo,
            AgentFrame::Mount(_) => FrameKind::Mount,
            AgentFrame::Interface(_) => FrameKind::Interface,
            AgentFrame::ClockSet(_) => FrameKind::ClockSet,
            AgentFrame::Detached(_) => FrameKind::Detached,
            AgentFrame::Job(_) => FrameKind::Job,
            AgentFrame::Attached(_) => FrameKind::Attached,
        }
    }
}

impl fmt::Display for FrameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where in a conversation a session is, for errors and for drivers that report progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Before the hellos are exchanged.
    Hello,
    /// Hellos exchanged; no operation asked for yet.
    Idle,
    /// An operation was asked for and has not started.
    Starting,
    /// The operation runs.
    Running,
    /// The operation ended (its last frame was sent or received).
    Done,
}

impl Phase {
    /// The phase as "during …" text.
    pub const fn as_str(self) -> &'static str {
        match self {
            Phase::Hello => "during the hello",
            Phase::Idle => "before a request",
            Phase::Starting => "before the command started",
            Phase::Running => "while the command was running",
            Phase::Done => "after the operation ended",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything a session refuses: what the peer did wrong, and what the driver asked for that the
/// protocol does not allow. After an error from the peer's side the connection is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionError {
    /// A frame body did not decode.
    Malformed,
    /// A frame's length prefix exceeded the limit.
    FrameTooLarge {
        /// The length it announced.
        declared: u32,
    },
    /// A valid frame at a point where the protocol does not allow it.
    Unexpected {
        /// What arrived.
        frame: FrameKind,
        /// When.
        phase: Phase,
    },
    /// The peer's hello does not carry ferry's magic: it is not a ferry peer.
    NotFerry,
    /// No protocol version both sides speak (the agent chose `chosen`; 0 when the client's
    /// range was refused).
    UnsupportedVersion {
        /// The version the peer chose, or 0.
        chosen: u16,
    },
    /// Stdin beyond the credit granted (the client's fault), or credit returned beyond what
    /// was sent (the agent's).
    CreditExceeded,
    /// The peer went away before the conversation ended.
    Disconnected {
        /// When.
        phase: Phase,
        /// In the middle of a frame.
        mid_frame: bool,
    },
    /// A deadline the session set passed.
    TimedOut {
        /// Which wait ran out.
        phase: Phase,
    },
    /// The driver asked for something the protocol does not allow now (a second operation,
    /// stdin for a command without a stdin pipe, output before the command started, …).
    InvalidState,
    /// The driver's buffer cannot hold the frame.
    BufferTooSmall,
    /// A request breaks a limit or a rule of the protocol; nothing was sent.
    InvalidRequest {
        /// What was wrong.
        message: &'static str,
    },
    /// Authentication failed: the client's proof was missing or wrong (on the agent's side),
    /// or the agent's proof was wrong (on the client's: it is not the agent it claims to be).
    Unauthenticated,
    /// The agent requires authentication and the client has no secret.
    SecretRequired,
    /// The client has a secret and the agent runs insecure: it cannot prove who it is.
    AgentInsecure,
    /// The agent sent nothing, not even a keepalive, for three of its keepalive intervals while
    /// an operation ran: it is frozen (a paused VM, a stopped process) or unreachable.
    AgentSilent,
}

impl fmt::Display for SessionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionError::Malformed => f.write_str("undecodable frame"),
            SessionError::FrameTooLarge { declared } => {
                write!(f, "frame of {declared} bytes exceeds the limit")
            }
            SessionError::Unexpected { frame, phase } => {
                write!(f, "unexpected frame: {frame} {phase}")
            }
            SessionError::NotFerry => f.write_str("the peer is not a ferry peer (bad magic)"),
            SessionError::UnsupportedVersion { chosen: 0 } => {
                f.write_str("no common protocol version")
            }
            SessionError::UnsupportedVersion { chosen } => {
                write!(
                    f,
                    "the peer chose protocol version {chosen}, which is not offered"
                )
            }
            SessionError::CreditExceeded => f.write_str("stdin credit exceeded"),
            SessionError::Disconnected {
                phase,
                mid_frame: true,
            } => write!(f, "the peer closed the connection mid-frame {phase}"),
            SessionError::Disconnected { phase, .. } => {
                write!(f, "the peer closed the connection {phase}")
            }
            SessionError::TimedOut { phase } => write!(f, "timed out {phase}"),
            SessionError::InvalidState => f.write_str("not allowed in the session's state"),
            SessionError::BufferTooSmall => f.write_str("buffer too small for the frame"),
            SessionError::InvalidRequest { message } => write!(f, "invalid request: {message}"),
            SessionError::Unauthenticated => f.write_str("authentication failed"),
            SessionError::SecretRequired => {
                f.write_str("the agent requires authentication and no secret was given")
            }
            SessionError::AgentInsecure => f.write_str(
                "the agent runs without authentication (--insecure) but a secret was given: \
                 it cannot prove who it is",
            ),
            SessionError::AgentSilent => f.write_str("agent stopped answering"),
        }
    }
}

impl From<RecvError> for SessionError {
    fn from(err: RecvError) -> Self {
        match err {
            RecvError::FrameTooLarge(err) => SessionError::FrameTooLarge {
                declared: err.declared,
            },
            RecvError::BufferTooSmall | RecvError::FrameWaiting => SessionError::BufferTooSmall,
        }
    }
}

impl From<crate::frame::FrameTooLarge> for SessionError {
    fn from(err: crate::frame::FrameTooLarge) -> Self {
        SessionError::FrameTooLarge {
            declared: err.declared,
        }
    }
}

impl From<crate::frame::EncodeError> for SessionError {
    fn from(err: crate::frame::EncodeError) -> Self {
        match err {
            crate::frame::EncodeError::BufferTooSmall => SessionError::BufferTooSmall,
            crate::frame::EncodeError::TooLarge => SessionError::InvalidRequest {
                message: "request exceeds the protocol's frame limit",
            },
        }
    }
}

/// The longest prefix of `text` that fits `max` bytes and ends on a character boundary.
pub(crate) fn truncate_str(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or("")
}

#[cfg(test)]
mod auth_tests;
#[cfg(test)]
mod jobs_tests;
#[cfg(test)]
mod keepalive_tests;
#[cfg(test)]
mod ops_tests;
#[cfg(test)]
mod orders;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod transcripts;
