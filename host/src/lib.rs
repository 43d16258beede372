//! ferry's host library: run commands in a microVM through its ferry agent, over AF_VSOCK,
//! hybrid vsock or a Unix socket. Blocking std API; every byte a command prints comes back in
//! order, with exactly how it ended.
//!
//! ```no_run
//! use ferry_host::{Client, Command, Target};
//!
//! let target: Target = "vsock://3:1024".parse()?;
//! let client = Client::connect(&target)?;
//! let output = client.output(Command::new("uname").arg("-a"))?;
//! print!("{}", String::from_utf8_lossy(&output.stdout));
//! # Ok::<(), ferry_host::Error>(())
//! ```

mod client;
mod command;
mod conn;
mod error;
mod exec;
mod job_record;
mod jobs;
mod secret;
mod sys;
mod system;
mod target;
#[cfg(feature = "tokio")]
pub mod tokio;
mod transfer;

pub use client::{Client, Health};
pub use command::{Command, Stdin};
pub use conn::AgentInfo;
pub use error::{errno_name, Error, ErrorCode, RemoteError};
pub use exec::{Controller, Event, Execution, Output, PumpError, StdinWriter, Termination};
pub use ferry_wire::Timestamp;
pub use ferry_wire::{AttachHeader, JobStarted, JobState, Resume, SkipReason, TransferKind};
pub use ferry_wire::{
    Bounds, Ending, ExitStatus, Limits, Security, Stream, StreamRecord, TreeKill, WindowSize,
};
pub use job_record::JobInfo;
pub use jobs::{
    ending_name, job_state_name, jobs_to_json, AttachEvent, AttachOptions, AttachedOutput,
    Attachment, JobHandle,
};
pub use secret::{read_secret_file, secret_from_env, Secret, SECRET_FILE_ENV};
pub use sys::vsock;
pub use system::{rfc3339, AgentReport, ClockStep, Interface, Mount, SystemReport};
pub use target::{ConnectOptions, Target};
pub use transfer::{
    hex, Download, FileInfo, Get, Progress, Put, Sha256Digest, SkippedEntry, Transferred, Upload,
    MAX_SKIPPED_KEPT,
};

#[cfg(test)]
mod tests;
