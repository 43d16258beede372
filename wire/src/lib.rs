//! ferry's wire protocol: the frames a host and the guest agent exchange over one stream, and
//! the rules of their conversation as state machines both ends drive.
//!
//! Sans-IO by construction: this crate never touches a socket, never allocates and never reads a
//! clock, so a VMM can drive it from its own event loop. A frame is a little-endian `u32` body
//! length followed by a postcard body ([`ClientFrame`] or [`AgentFrame`]). Every connection opens
//! with [`AgentFrame::Hello`] (the agent speaks first: its hello carries a challenge) →
//! [`ClientFrame::Hello`] and [`ClientFrame::Auth`] → [`AgentFrame::Authenticated`]; then one
//! operation runs. Every bound is a
//! named constant in [`limits`].
//!
//! - [`session::ClientSession`] and [`session::AgentSession`] hold every rule of the
//!   conversation (hello and version, which frame may come when, stdin credit, the final frame,
//!   deadlines), in quinn-proto's shape: `handle_input` for bytes that arrived, `poll_transmit`
//!   and commands that encode into the caller's buffer, `poll_timeout`/`handle_timeout` with
//!   time passed in. Events borrow from the input: output is never copied by the session.
//! - [`RecvBuf`] is the one receive buffer: read into it, cut frames off it.
//! - `wire/transcripts/` holds whole conversations as byte files that both sessions are tested
//!   against, for checking another implementation.
//!
//! One exec, both ends in memory (a real driver moves these bytes over a socket):
//!
//! ```
//! use ferry_wire::session::{
//!     AgentAuth, AgentConfig, AgentEvent, AgentSession, ClientAuth, ClientEvent, ClientSession,
//!     Secret,
//! };
//! use ferry_wire::{limits::MAX_FRAME, ExecRequest, ExitStatus, StdinMode, StrList};
//!
//! let secret = Secret::new(b"a per-VM secret of 16+ bytes").unwrap();
//! // Both nonces come from the OS's random source, fresh for every connection.
//! let auth = ClientAuth { nonce: [1; 32], secret: Some(secret.clone()) };
//! let mut client = ClientSession::new(0, Some(5_000_000), auth);
//! let auth = AgentAuth { nonce: [2; 32], secret: Some(secret) };
//! let mut agent = AgentSession::new(AgentConfig::DEFAULT, 0, auth);
//! let (mut to_agent, mut to_client) = (vec![0u8; MAX_FRAME], vec![0u8; MAX_FRAME]);
//!
//! // The agent speaks first: its hello carries the challenge.
//! let n = agent.poll_transmit(&mut to_client)?;
//! let step = client.handle_input(&to_client[..n])?;
//! assert!(matches!(step.event, Some(ClientEvent::HelloAccepted(_))));
//!
//! let request = ExecRequest {
//!     argv: StrList::new(b"true\0"),
//!     env: StrList::new(b""),
//!     clean_env: false,
//!     cwd: None,
//!     stdin: StdinMode::Null,
//!     user: None,
//!     pty: None,
//!     timeout_ms: 0,
//!     kill_grace_ms: None,
//!     kill_tree_on_exit: false,
//!     max_output: 0,
//! };
//! let n = client.start_exec(&request, &mut to_agent)?; // hello + proof + exec, one write
//!
//! let mut input = &to_agent[..n];
//! while !input.is_empty() {
//!     let step = agent.handle_input(input, 0)?;
//!     if let Some(AgentEvent::Exec(valid)) = step.event {
//!         assert_eq!(valid.request().argv.as_bytes(), b"true\0");
//!         agent.started(42, 0)?; // the driver spawned the command as pid 42
//!     }
//!     input = &input[step.consumed..];
//! }
//! agent.child_exited(ExitStatus::Code(0), 900)?;
//! agent.finish(900)?;
//! let n = agent.poll_transmit(&mut to_client)?; // the agent's proof, started, exited
//!
//! let mut input = &to_client[..n];
//! let mut status = None;
//! while !input.is_empty() {
//!     let step = client.handle_input(input)?;
//!     if let Some(ClientEvent::Exited(end)) = step.event {
//!         status = Some(end.status);
//!     }
//!     input = &input[step.consumed..];
//! }
//! assert_eq!(status, Some(ExitStatus::Code(0)));
//! assert!(client.is_authenticated() && client.is_finished() && agent.is_closed());
//! # Ok::<(), ferry_wire::session::SessionError>(())
//! ```
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

mod bytes;
mod decode;
mod encode;
mod frame;
mod jobs;
pub mod limits;
mod msg;
mod ops;
mod recv;
pub mod session;

pub use bytes::{ByteArray, Bytes};
pub use frame::{
    decode_agent_frame, decode_client_frame, encode_agent_frame, encode_client_frame,
    frame_data_in_place, split_frame, DataKind, DecodeError, EncodeError, FrameTooLarge,
    DATA_HEADROOM,
};
pub use jobs::{
    check_job_name, check_job_ref, parse_job_id, AttachHeader, AttachRequest, JobQuery, JobRecord,
    JobRequest, JobStart, JobStarted, JobState, KillJob, Resume,
};
pub use msg::{
    AgentFrame, AgentHello, AgentProof, Bounds, Cancel, ClientFrame, ClientHello, ClientProof,
    DoneReport, Dropped, Ending, ErrorCode, ErrorFrame, ExecPart, ExecRequest, ExitStatus, Limits,
    ListCheck, ListKind, Output, ReadyReport, RequestError, Security, Started, StdinMode, StrList,
    Stream, StreamRecord, Termination, TreeKill, ValidExec, WindowSize, DEFAULT_KILL_GRACE_MS,
    MAGIC, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
pub use ops::{
    FileHeader, FileSummary, GetRequest, InterfaceInfo, MountInfo, PutRequest, ShutdownRequest,
    SkipReason, Skipped, SystemInfo, Timestamp, TransferKind, DIGEST_LEN,
};
pub use recv::{RecvBuf, RecvError};

#[cfg(test)]
mod tests;
