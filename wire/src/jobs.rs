//! The messages of detached jobs (protocol 5): an exec that outlives its connection, kept in the
//! agent's registry with its output spooled, and the operations that find it again.
//!
//! NOTE: as in `msg.rs`, field and variant order *is* the wire format: append only.

use serde::{Deserialize, Serialize};

use crate::bytes::Bytes;
use crate::limits::{MAX_JOB_NAME, MAX_SIGNAL};
use crate::msg::{Limits, RequestError, StrList, Termination};
use crate::ops::{check_user, Timestamp};

/// Sent right before an [`crate::ClientFrame::Exec`]: that exec becomes a detached job. The
/// agent answers with [`crate::AgentFrame::Detached`] once the command started (or with the
/// exec's error); the job then runs on whether or not the client stays.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobStart<'a> {
    /// A name to find the job by instead of its id (see [`check_job_name`]), unique while the
    /// job is in the registry.
    #[serde(borrow)]
    pub name: Option<Bytes<'a>>,
}

/// List the jobs the request's user may see: [`crate::AgentFrame::Job`] each, then
/// [`crate::AgentFrame::Done`] counting them.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobQuery<'a> {
    /// Act as this user (`NAME[:GROUP]` or `UID[:GID]`), authorized as for an exec; `None`: the
    /// agent's default user. A job is visible to its own user (root and the policy's
    /// `jobs_any_user` see all).
    #[serde(borrow)]
    pub user: Option<Bytes<'a>>,
}

/// Which job, as whom: for [`crate::ClientFrame::Wait`] and [`crate::ClientFrame::Remove`].
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobRequest<'a> {
    /// The job's id in decimal, or its name.
    #[serde(borrow)]
    pub job: Bytes<'a>,
    /// See [`JobQuery::user`].
    pub user: Option<Bytes<'a>>,
}

/// Signal a job's tree.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct KillJob<'a> {
    /// The job's id in decimal, or its name.
    #[serde(borrow)]
    pub job: Bytes<'a>,
    /// See [`JobQuery::user`].
    pub user: Option<Bytes<'a>>,
    /// 0: end the tree as a cancel does (`SIGTERM`, then `SIGKILL` after the grace); else this
    /// signal (1–64) to every process of the job's tree (its exec cgroup, and its process
    /// group).
    pub signal: u8,
    /// Milliseconds between `SIGTERM` and `SIGKILL` for signal 0; `None`: the job's own
    /// [`crate::ExecRequest::kill_grace_ms`].
    pub grace_ms: Option<u32>,
}

/// Follow a job's output: answered with [`crate::AgentFrame::Attached`], the retained output
/// from the offsets asked for, the live output while the job runs (with `follow`), and
/// [`crate::AgentFrame::Exited`] once it has ended.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttachRequest<'a> {
    /// The job's id in decimal, or its name.
    #[serde(borrow)]
    pub job: Bytes<'a>,
    /// See [`JobQuery::user`].
    pub user: Option<Bytes<'a>>,
    /// The stdout offset to start from (0: the beginning); past the end means "from now".
    pub since_stdout: u64,
    /// The same for stderr.
    pub since_stderr: u64,
    /// Stay attached while the job runs; without it the attachment ends with
    /// [`crate::AgentFrame::Done`] once the retained output is sent.
    pub follow: bool,
    /// Ask for the job's stdin (it must have a piped stdin, and only one attachment holds it).
    pub stdin: bool,
}

/// A job was started: the answer to [`JobStart`], the last frame of that operation.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobStarted {
    /// Its id.
    pub id: u32,
    /// Its command's pid in the guest.
    pub pid: u32,
}

/// Where an attachment resumes one stream.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resume {
    /// The offset of the first byte that will be sent.
    pub from: u64,
    /// Bytes between the offset asked for and `from` that are no longer retained.
    pub lost: u64,
}

/// The answer to [`AttachRequest`].
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttachHeader {
    /// The job's id.
    pub id: u32,
    /// Where stdout resumes.
    pub stdout: Resume,
    /// Where stderr resumes.
    pub stderr: Resume,
    /// Stdin was granted: send it within credit.
    pub stdin: bool,
    /// The job still runs.
    pub running: bool,
}

/// A job's state.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// Its command runs.
    Running,
    /// It exited by itself.
    Exited,
    /// A signal ended it (a kill, a cancel, a timeout or another process's signal).
    Killed,
    /// The agent lost track of it (the process that ran it died): no record.
    Lost,
}

/// One job of the registry.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobRecord<'a> {
    /// Its id.
    pub id: u32,
    /// Its name, if it was given one.
    #[serde(borrow)]
    pub name: Option<Bytes<'a>>,
    /// Its argv, cut on an entry boundary to [`crate::limits::MAX_JOB_ARGV`] bytes.
    pub argv: StrList<'a>,
    /// The user it runs as.
    pub uid: u32,
    /// Its group.
    pub gid: u32,
    /// Its command's pid.
    pub pid: u32,
    /// Running, or how it ended.
    pub state: JobState,
    /// When it started (the guest's realtime clock).
    pub started: Timestamp,
    /// How long it has run, or ran, in microseconds.
    pub duration_us: u64,
    /// Bytes its stdout produced so far.
    pub stdout_bytes: u64,
    /// Bytes its stderr produced so far.
    pub stderr_bytes: u64,
    /// Its termination record, once it ended.
    pub termination: Option<Termination>,
}

/// A job name: 1 to [`MAX_JOB_NAME`] bytes of `[A-Za-z0-9._-]`, not only digits (those are
/// ids) and not starting with `-` (it would read as a flag).
pub fn check_job_name(name: &[u8]) -> Result<(), RequestError> {
    let allowed = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
    if name.is_empty() || name.len() > MAX_JOB_NAME {
        return Err(RequestError::invalid("a job name has 1 to 64 bytes"));
    }
    if !name.iter().all(allowed) || name.first() == Some(&b'-') {
        return Err(RequestError::invalid(
            "a job name is letters, digits, '.', '_' and '-', not first",
        ));
    }
    if name.iter().all(u8::is_ascii_digit) {
        return Err(RequestError::invalid("a job name is not only digits"));
    }
    Ok(())
}

/// A job reference: an id (decimal, no sign, no leading zero, fits `u32`, not 0) or a valid name.
pub fn check_job_ref(job: &[u8]) -> Result<(), RequestError> {
    if job.iter().all(u8::is_ascii_digit) && !job.is_empty() {
        return match parse_job_id(job) {
            Some(_) => Ok(()),
            None => Err(RequestError::invalid("no such job id")),
        };
    }
    check_job_name(job)
}

/// The id a reference names, when it is one (all digits, 1 to `u32::MAX`, no leading zero).
pub fn parse_job_id(job: &[u8]) -> Option<u32> {
    if job.is_empty() || job.len() > 10 || job.first() == Some(&b'0') {
        return None;
    }
    job.iter().try_fold(0u32, |id, b| {
        b.is_ascii_digit()
            .then_some(())
            .and_then(|()| id.checked_mul(10))
            .and_then(|id| id.checked_add(u32::from(b - b'0')))
    })
}

impl JobStart<'_> {
    /// Checks the name.
    pub fn validate(&self) -> Result<(), RequestError> {
        match self.name {
            Some(Bytes(name)) => check_job_name(name),
            None => Ok(()),
        }
    }
}

impl JobQuery<'_> {
    /// Checks the user against `limits`.
    pub fn validate_within(&self, limits: &Limits) -> Result<(), RequestError> {
        check_user(self.user, limits)
    }
}

impl JobRequest<'_> {
    /// Checks the reference and the user.
    pub fn validate_within(&self, limits: &Limits) -> Result<(), RequestError> {
        check_job_ref(self.job.0)?;
        check_user(self.user, limits)
    }
}

impl KillJob<'_> {
    /// Checks the reference, the user and the signal.
    pub fn validate_within(&self, limits: &Limits) -> Result<(), RequestError> {
        check_job_ref(self.job.0)?;
        check_user(self.user, limits)?;
        if self.signal > MAX_SIGNAL {
            return Err(RequestError::invalid("no such signal"));
        }
        Ok(())
    }
}

impl AttachRequest<'_> {
    /// Checks the reference and the user.
    pub fn validate_within(&self, limits: &Limits) -> Result<(), RequestError> {
        check_job_ref(self.job.0)?;
        check_user(self.user, limits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ids_are_told_apart_at_their_edges() {
        assert!(check_job_name(b"build-1.x_y").is_ok());
        assert!(check_job_name(&[b'a'; MAX_JOB_NAME]).is_ok());
        assert!(check_job_name(&[b'a'; MAX_JOB_NAME + 1]).is_err());
        for bad in [&b""[..], b"-x", b"123", b"a b", b"a/b", b"\xff", b"a\0"] {
            assert!(check_job_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_job_id(b"1"), Some(1));
        assert_eq!(parse_job_id(b"4294967295"), Some(u32::MAX));
        assert_eq!(parse_job_id(b"4294967296"), None);
        assert_eq!(parse_job_id(b"01"), None);
        assert_eq!(parse_job_id(b"0"), None);
        assert_eq!(parse_job_id(b"1a"), None);
        assert!(check_job_ref(b"17").is_ok());
        assert!(check_job_ref(b"web").is_ok());
        assert!(check_job_ref(b"0").is_err());
        assert!(check_job_ref(b"99999999999").is_err());
        assert!(check_job_ref(b"").is_err());
    }
}
