//! A job record as the host keeps it: the wire's `JobRecord`, owned.

use std::time::Duration;

use ferry_wire::{JobRecord, JobState, Timestamp};

use crate::exec::Termination;

/// One job of the agent's registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInfo {
    /// Its id.
    pub id: u32,
    /// Its name, if it was given one.
    pub name: Option<String>,
    /// Its argv (cut on an entry boundary at 1 KiB).
    pub argv: Vec<String>,
    /// The user it runs as.
    pub uid: u32,
    /// Its group.
    pub gid: u32,
    /// Its command's pid in the guest.
    pub pid: u32,
    /// Running, or how it ended.
    pub state: JobState,
    /// When it started (the guest's realtime clock).
    pub started: Timestamp,
    /// How long it has run, or ran.
    pub duration: Duration,
    /// Bytes its stdout produced.
    pub stdout_bytes: u64,
    /// Bytes its stderr produced.
    pub stderr_bytes: u64,
    /// How it ended, once it has.
    pub termination: Option<Termination>,
}

impl JobInfo {
    pub(crate) fn from_wire(job: &JobRecord<'_>) -> JobInfo {
        JobInfo {
            id: job.id,
            name: job
                .name
                .map(|name| String::from_utf8_lossy(name.0).into_owned()),
            argv: job
                .argv
                .entries()
                .map(|arg| String::from_utf8_lossy(arg).into_owned())
                .collect(),
            uid: job.uid,
            gid: job.gid,
            pid: job.pid,
            state: job.state,
            started: job.started,
            duration: Duration::from_micros(job.duration_us),
            stdout_bytes: job.stdout_bytes,
            stderr_bytes: job.stderr_bytes,
            termination: job.termination.map(Termination::from_wire),
        }
    }
}
