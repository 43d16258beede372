//! Detached jobs: commands that outlive their connection, kept in the agent's registry with their
//! output spooled, and the operations that find them again (list, attach, wait, kill, remove).
//! Each operation is one connection, like an exec; the agent owns every rule about jobs.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::Duration;

use ferry_wire::{
    AttachHeader, AttachRequest, Bytes, JobQuery, JobRequest, JobStarted, JobState, KillJob, Stream,
};

use crate::client::Client;
use crate::command::{ceil_millis, Command};
use crate::conn::{out_of_order, Connection, Operation, Received};
use crate::error::Error;
use crate::exec::{Controller, StdinWriter, Termination};
use crate::job_record::JobInfo;
use crate::system::{rfc3339, Json};

/// A job's state as `ferry jobs` and its JSON name it: `running`, `exited`, `killed`, `lost`.
pub fn job_state_name(state: JobState) -> &'static str {
    match state {
        JobState::Running => "running",
        JobState::Exited => "exited",
        JobState::Killed => "killed",
        JobState::Lost => "lost",
    }
}

impl JobInfo {
    /// When it started, in milliseconds since the Unix epoch (the guest's realtime clock).
    pub fn started_ms(&self) -> i64 {
        self.started
            .secs
            .saturating_mul(1000)
            .saturating_add(i64::from(self.started.nanos / 1_000_000))
    }

    /// The job's argv as one line of text: arguments separated by spaces, those with spaces or
    /// quotes (or nothing) quoted, invalid UTF-8 replaced.
    pub fn command_line(&self) -> String {
        let mut line = String::new();
        for (i, arg) in self.argv.iter().enumerate() {
            if i > 0 {
                line.push(' ');
            }
            let plain = !arg.is_empty()
                && arg
                    .chars()
                    .all(|c| !c.is_whitespace() && !c.is_control() && !"'\"\\$`".contains(c));
            if plain {
                line.push_str(arg);
            } else {
                line.push('\'');
                for c in arg.chars() {
                    match c {
                        '\'' => line.push_str(r"'\''"),
                        c if c.is_control() => line.extend(c.escape_default()),
                        c => line.push(c),
                    }
                }
                line.push('\'');
            }
        }
        line
    }
}

/// `ferry jobs --json`: `{"jobs":[…]}`, each job as docs/cli.md documents; fields are only ever
/// added. Written by hand like [`crate::SystemReport::to_json`].
pub fn jobs_to_json(jobs: &[JobInfo]) -> String {
    let mut out = Json::default();
    out.open('{');
    out.field("jobs").open('[');
    for job in jobs {
        out.item();
        job_json(&mut out, job);
    }
    out.close(']');
    out.close('}');
    out.text
}

fn job_json(out: &mut Json, job: &JobInfo) {
    out.open('{');
    out.field("id").number(job.id);
    match &job.name {
        Some(name) => out.field("name").string(name),
        None => out.field("name").null(),
    }
    out.field("argv").open('[');
    for arg in &job.argv {
        out.item().string(arg);
    }
    out.close(']');
    out.field("uid").number(job.uid);
    out.field("gid").number(job.gid);
    out.field("pid").number(job.pid);
    out.field("state").string(job_state_name(job.state));
    out.field("started").string(&rfc3339(job.started_ms()));
    out.field("started_s").millis(job.started_ms());
    out.field("duration_s").millis(duration_ms(job.duration));
    out.field("stdout_bytes").number(job.stdout_bytes);
    out.field("stderr_bytes").number(job.stderr_bytes);
    match &job.termination {
        Some(end) => {
            out.field("termination");
            termination_json(out, end);
        }
        None => out.field("termination").null(),
    }
    out.close('}');
}

fn termination_json(out: &mut Json, end: &Termination) {
    out.open('{');
    match end.status {
        ferry_wire::ExitStatus::Code(code) => {
            out.field("exit_code").number(code);
            out.field("signal").null();
            out.field("core_dumped").boolean(false);
        }
        ferry_wire::ExitStatus::Signal {
            number,
            core_dumped,
        } => {
            out.field("exit_code").null();
            out.field("signal").number(number);
            out.field("core_dumped").boolean(core_dumped);
        }
    }
    out.field("status").number(end.status.shell_code());
    out.field("ending").string(ending_name(end.ending));
    out.field("tree_kill").string(match end.tree_kill {
        ferry_wire::TreeKill::None => "none",
        ferry_wire::TreeKill::Cgroup => "cgroup",
        ferry_wire::TreeKill::ProcessGroup => "process_group",
    });
    out.field("duration_s").millis(duration_ms(end.duration));
    for (name, record) in [("stdout", end.stdout), ("stderr", end.stderr)] {
        out.field(name).open('{');
        out.field("bytes").number(record.bytes);
        out.field("dropped").number(record.dropped);
        out.close('}');
    }
    out.field("output_dropped").boolean(end.output_dropped);
    out.field("pipes_held").boolean(end.pipes_held);
    out.field("oom_killed").boolean(end.oom_killed);
    match end.peak_memory {
        Some(peak) => out.field("peak_memory").number(peak),
        None => out.field("peak_memory").null(),
    }
    out.close('}');
}

/// The name of an ending in JSON and tables: `exited`, `timed_out`, `cancelled`,
/// `runtime_limit`, `output_limit`.
pub fn ending_name(ending: ferry_wire::Ending) -> &'static str {
    match ending {
        ferry_wire::Ending::Exited => "exited",
        ferry_wire::Ending::TimedOut => "timed_out",
        ferry_wire::Ending::Cancelled => "cancelled",
        ferry_wire::Ending::RuntimeLimit => "runtime_limit",
        ferry_wire::Ending::OutputLimit => "output_limit",
    }
}

fn duration_ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// What [`JobHandle::attach`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttachOptions {
    /// The stdout offset to start from: 0 replays what the agent kept from the start; past the
    /// end means "from now".
    pub since_stdout: u64,
    /// The same for stderr.
    pub since_stderr: u64,
    /// Stay attached while the job runs (the default); without it the attachment ends with
    /// [`AttachEvent::StillRunning`] once the retained output was sent.
    pub follow: bool,
    /// Ask for the job's stdin (it must have been started with [`crate::Stdin::Pipe`], and only
    /// one attachment at a time holds it: see [`Attachment::take_stdin`]).
    pub stdin: bool,
}

impl Default for AttachOptions {
    fn default() -> AttachOptions {
        AttachOptions {
            since_stdout: 0,
            since_stderr: 0,
            follow: true,
            stdin: false,
        }
    }
}

impl AttachOptions {
    /// From `offset` of both streams on.
    pub fn since(offset: u64) -> AttachOptions {
        AttachOptions {
            since_stdout: offset,
            since_stderr: offset,
            ..AttachOptions::default()
        }
    }
}

/// A job named by its id or its name, as a user: [`Client::job`].
#[derive(Debug, Clone)]
pub struct JobHandle {
    client: Client,
    job: String,
    user: Option<Vec<u8>>,
}

impl Client {
    /// Starts `command` as a detached job, optionally named, and returns once it runs: it lives
    /// on whether or not this client stays. The exec's own start errors come back as from
    /// [`Client::spawn`]; a name in use is [`crate::ErrorCode::AlreadyExists`], a registry full
    /// of running jobs [`crate::ErrorCode::Busy`]. A job's request must fit one exec frame. Its
    /// stdin is never fed at start: with [`crate::Stdin::Pipe`] it stays open for an attachment
    /// that asks for it; [`crate::Stdin::Bytes`] is [`Error::InvalidRequest`].
    pub fn start_job(&self, command: &Command, name: Option<&str>) -> Result<JobStarted, Error> {
        if matches!(command.stdin_mode(), crate::Stdin::Bytes(_)) {
            return Err(Error::InvalidRequest(
                "a job's stdin cannot be given at start: use Stdin::Pipe and attach with stdin"
                    .into(),
            ));
        }
        let request = command.request()?;
        let name = name.map(str::as_bytes);
        let (mut conn, _info) = self
            .open_operation(Operation::StartJob(name, &request))
            .map_err(|err| command.explain(err))?;
        match conn.receive().map_err(|err| command.explain(err))? {
            Received::Detached(started) => Ok(started),
            other => Err(out_of_order(&other, "instead of the job's id")),
        }
    }

    /// The jobs `user` may see (`None`: the agent's default user; root, and any user where the
    /// policy says `jobs_any_user`, sees every job), oldest first.
    pub fn jobs(&self, user: Option<&OsStr>) -> Result<Vec<JobInfo>, Error> {
        let query = JobQuery {
            user: user.map(|user| Bytes(user.as_bytes())),
        };
        let (mut conn, _info) = self.open_operation(Operation::Jobs(query))?;
        let mut jobs = Vec::new();
        loop {
            match conn.receive()? {
                Received::Job(job) => jobs.push(*job),
                Received::Done(_) => return Ok(jobs),
                other => return Err(out_of_order(&other, "while listing jobs")),
            }
        }
    }

    /// A job by its id (decimal) or its name. Nothing is sent until an operation is called.
    pub fn job(&self, job: impl Into<String>) -> JobHandle {
        JobHandle {
            client: self.clone(),
            job: job.into(),
            user: None,
        }
    }
}

impl JobHandle {
    /// Acts as this guest user (`NAME[:GROUP]` or `UID[:GID]`), authorized as for an exec: a
    /// job belongs to the user it runs as, and another user's job is
    /// [`crate::ErrorCode::PermissionDenied`] unless that user is root or the policy allows.
    pub fn user(mut self, user: impl AsRef<OsStr>) -> JobHandle {
        self.user = Some(user.as_ref().as_bytes().to_vec());
        self
    }

    /// The reference as given: an id in decimal or a name.
    pub fn reference(&self) -> &str {
        &self.job
    }

    fn request(&self) -> JobRequest<'_> {
        JobRequest {
            job: Bytes(self.job.as_bytes()),
            user: self.user.as_deref().map(Bytes),
        }
    }

    /// Waits until the job ends and returns its termination record (at once for an ended job).
    /// A job the agent lost track of has none: [`crate::ErrorCode`]`::NoSuchJob`'s sibling, the
    /// agent's error.
    pub fn wait(&self) -> Result<Termination, Error> {
        let (mut conn, _info) = self
            .client
            .open_operation(Operation::Wait(self.request()))?;
        match conn.receive()? {
            Received::Exited(end) => Ok(end),
            other => Err(out_of_order(&other, "while waiting for a job")),
        }
    }

    /// Signals the job's tree. `None`: ends it as a cancel does (`SIGTERM` to every process of
    /// its tree, `SIGKILL` after `grace`, by default the job's own kill grace); `Some(n)`:
    /// signal `n` (1–64) to its process group, and `grace` must be `None`. An ended job is
    /// [`crate::ErrorCode::JobEnded`].
    pub fn kill(&self, signal: Option<i32>, grace: Option<Duration>) -> Result<(), Error> {
        let signal = match signal {
            None => 0,
            Some(signal) => match u8::try_from(signal) {
                Ok(signal @ 1..=64) => signal,
                _ => return Err(Error::InvalidRequest(format!("no such signal: {signal}"))),
            },
        };
        if signal != 0 && grace.is_some() {
            return Err(Error::InvalidRequest(
                "a kill grace goes with the tree's end (no signal), not with a signal".into(),
            ));
        }
        let grace_ms = grace
            .map(|grace| {
                u32::try_from(ceil_millis(grace)).map_err(|_| {
                    Error::InvalidRequest(
                        "the kill grace is longer than u32::MAX milliseconds".into(),
                    )
                })
            })
            .transpose()?;
        let request = KillJob {
            job: Bytes(self.job.as_bytes()),
            user: self.user.as_deref().map(Bytes),
            signal,
            grace_ms,
        };
        let (mut conn, _info) = self.client.open_operation(Operation::Kill(request))?;
        match conn.receive()? {
            Received::Done(_) => Ok(()),
            other => Err(out_of_order(&other, "instead of a done record")),
        }
    }

    /// Forgets an ended job (its record and its spooled output). A running job is
    /// [`crate::ErrorCode::JobRunning`]: kill it first.
    pub fn remove(&self) -> Result<(), Error> {
        let (mut conn, _info) = self
            .client
            .open_operation(Operation::Remove(self.request()))?;
        match conn.receive()? {
            Received::Done(_) => Ok(()),
            other => Err(out_of_order(&other, "instead of a done record")),
        }
    }

    /// Attaches to the job: its retained output from the offsets asked for, then (with
    /// `follow`) its live output, and its termination record once it ends. Dropping the
    /// attachment detaches; the job runs on.
    pub fn attach(&self, options: AttachOptions) -> Result<Attachment, Error> {
        let request = AttachRequest {
            job: Bytes(self.job.as_bytes()),
            user: self.user.as_deref().map(Bytes),
            since_stdout: options.since_stdout,
            since_stderr: options.since_stderr,
            follow: options.follow,
            stdin: options.stdin,
        };
        let (mut conn, agent) = self.client.open_operation(Operation::Attach(request))?;
        let header = match conn.receive()? {
            Received::Attached(header) => header,
            other => return Err(out_of_order(&other, "instead of an attach header")),
        };
        let stdin = header
            .stdin
            .then(|| StdinWriter::new(Arc::clone(conn.shared())));
        // The gaps between the offsets asked for and where the output resumes come first, as
        // events like the ones that come later: the events tile each stream's offsets.
        let mut pending = Vec::new();
        for (stream, resume) in [
            (Stream::Stdout, header.stdout),
            (Stream::Stderr, header.stderr),
        ] {
            if resume.lost > 0 {
                pending.push(Gap {
                    stream,
                    offset: resume.from.saturating_sub(resume.lost),
                    bytes: resume.lost,
                });
            }
        }
        pending.reverse();
        Ok(Attachment {
            conn,
            agent,
            header,
            offsets: [header.stdout.from, header.stderr.from],
            lost: [header.stdout.lost, header.stderr.lost],
            pending,
            stdin,
            done: false,
        })
    }
}

/// Bytes of a stream the agent no longer had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Gap {
    stream: Stream,
    offset: u64,
    bytes: u64,
}

/// One thing an attached job did. For each stream the events tile its offsets: every output
/// chunk and every gap starts where the one before it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachEvent<'a> {
    /// A chunk of its stdout, starting at `offset` (bytes since the job started).
    Stdout {
        /// The stream offset of `data`'s first byte.
        offset: u64,
        /// The bytes.
        data: &'a [u8],
    },
    /// A chunk of its stderr.
    Stderr {
        /// The stream offset of `data`'s first byte.
        offset: u64,
        /// The bytes.
        data: &'a [u8],
    },
    /// `bytes` of `stream` from `offset` on will never arrive: the job's spool dropped them
    /// (its ring overran while this attachment, or nobody, read).
    Lost {
        /// Which stream.
        stream: Stream,
        /// The offset of the first byte lost.
        offset: u64,
        /// How many.
        bytes: u64,
    },
    /// The job ended; the last event.
    Exited(Termination),
    /// The retained output was sent and the job still runs (an attachment without `follow`);
    /// the last event.
    StillRunning,
}

/// An attached job: its output as events with exact offsets, its stdin when granted. Reads like
/// an [`crate::Execution`], but dropping it only detaches: the job runs on.
pub struct Attachment {
    conn: Connection,
    agent: crate::AgentInfo,
    header: AttachHeader,
    /// The offset of the next byte of stdout, stderr.
    offsets: [u64; 2],
    /// Bytes reported lost so far: stdout, stderr.
    lost: [u64; 2],
    /// Gaps to report before anything is read (the header's), last first.
    pending: Vec<Gap>,
    stdin: Option<StdinWriter>,
    done: bool,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("header", &self.header)
            .field("offsets", &self.offsets)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl Attachment {
    /// The job's id.
    pub fn id(&self) -> u32 {
        self.header.id
    }

    /// The agent's answer: where each stream resumes, whether stdin was granted, whether the
    /// job still ran.
    pub fn header(&self) -> &AttachHeader {
        &self.header
    }

    /// What the agent said about itself in its hello.
    pub fn agent(&self) -> &crate::AgentInfo {
        &self.agent
    }

    /// The offset of the next byte of `stream` that will arrive (after everything received so
    /// far, gaps included): what a later attachment passes as its `since` to go on from here.
    pub fn offset(&self, stream: Stream) -> u64 {
        self.offsets[stream_index(stream)]
    }

    /// Bytes of `stream` reported lost so far ([`AttachEvent::Lost`]).
    pub fn lost(&self, stream: Stream) -> u64 {
        self.lost[stream_index(stream)]
    }

    /// The job's stdin, once, when the agent granted it ([`AttachHeader::stdin`]; another
    /// attachment may hold it). Write from another thread than the one reading events, as for
    /// [`crate::Execution::take_stdin`]. Closing it sends the job EOF.
    pub fn take_stdin(&mut self) -> Option<StdinWriter> {
        self.stdin.take()
    }

    /// Signals, resizes or cancels the job from any thread (relayed by the agent to the job).
    pub fn controller(&self) -> Controller {
        Controller::new(Arc::clone(self.conn.shared()))
    }

    /// When the job printed the chunk [`Attachment::next_event`] returned last, as the agent
    /// sent it: the time since the job started.
    pub fn last_output_at(&self) -> Duration {
        Duration::from_micros(self.conn.shared().last_output_at())
    }

    /// The next thing the job did, blocking until it happens; `None` after the last event
    /// ([`AttachEvent::Exited`] or [`AttachEvent::StillRunning`]) or an error.
    pub fn next_event(&mut self) -> Result<Option<AttachEvent<'_>>, Error> {
        if self.done {
            return Ok(None);
        }
        if let Some(gap) = self.pending.pop() {
            return Ok(Some(AttachEvent::Lost {
                stream: gap.stream,
                offset: gap.offset,
                bytes: gap.bytes,
            }));
        }
        self.conn.note_reader();
        let received = loop {
            match self.conn.receive() {
                Ok(Received::Credit) => {}
                Ok(received) => break received,
                Err(err) => {
                    self.finish();
                    return Err(err);
                }
            }
        };
        let event = match received {
            Received::Stdout(range) => {
                let offset = self.advance(Stream::Stdout, range.len() as u64);
                AttachEvent::Stdout {
                    offset,
                    data: self.conn.chunk(range),
                }
            }
            Received::Stderr(range) => {
                let offset = self.advance(Stream::Stderr, range.len() as u64);
                AttachEvent::Stderr {
                    offset,
                    data: self.conn.chunk(range),
                }
            }
            Received::Dropped(dropped) => {
                let index = stream_index(dropped.stream);
                self.lost[index] = self.lost[index].saturating_add(dropped.bytes);
                let offset = self.advance(dropped.stream, dropped.bytes);
                AttachEvent::Lost {
                    stream: dropped.stream,
                    offset,
                    bytes: dropped.bytes,
                }
            }
            Received::Exited(end) => {
                self.finish();
                AttachEvent::Exited(end)
            }
            Received::Done(_) => {
                self.finish();
                AttachEvent::StillRunning
            }
            other => {
                self.finish();
                return Err(out_of_order(&other, "while attached to a job"));
            }
        };
        Ok(Some(event))
    }

    /// Moves `stream`'s offset on by `len`; returns where it was.
    fn advance(&mut self, stream: Stream, len: u64) -> u64 {
        let offset = &mut self.offsets[stream_index(stream)];
        let at = *offset;
        *offset = offset.saturating_add(len);
        at
    }

    fn finish(&mut self) {
        self.done = true;
        self.conn.shared().close();
    }

    /// Reads to the end into memory: what arrived of each stream, and how the job ended
    /// (`None`: it still runs, for an attachment without `follow`). Gaps are not filled: see
    /// [`Attachment::lost`].
    pub fn collect(mut self) -> Result<AttachedOutput, Error> {
        // Nothing could write to a stdin nobody took: close it, as a collect of an exec does.
        if let Some(mut untaken) = self.stdin.take() {
            match untaken.close() {
                Err(err) if err.kind() != io::ErrorKind::BrokenPipe => return Err(Error::Io(err)),
                _ => {}
            }
        }
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let end = loop {
            match self.next_event()? {
                Some(AttachEvent::Stdout { data, .. }) => stdout.extend_from_slice(data),
                Some(AttachEvent::Stderr { data, .. }) => stderr.extend_from_slice(data),
                Some(AttachEvent::Lost { .. }) => {}
                Some(AttachEvent::Exited(end)) => break Some(end),
                Some(AttachEvent::StillRunning) => break None,
                None => return Err(Error::Disconnected("while attached to a job")),
            }
        };
        Ok(AttachedOutput {
            header: self.header,
            stdout,
            stderr,
            lost_stdout: self.lost[0],
            lost_stderr: self.lost[1],
            termination: end,
        })
    }
}

/// What [`Attachment::collect`] gathered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedOutput {
    /// The agent's answer to the attach.
    pub header: AttachHeader,
    /// Stdout from [`Resume::from`] of the header's stdout on, gaps left out.
    pub stdout: Vec<u8>,
    /// Stderr likewise.
    pub stderr: Vec<u8>,
    /// Stdout bytes lost (the header's and later ones).
    pub lost_stdout: u64,
    /// Stderr bytes lost.
    pub lost_stderr: u64,
    /// How the job ended; `None` when it still ran (no `follow`).
    pub termination: Option<Termination>,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if !self.done {
            // Detach at once, even while a stdin writer holds the socket; the job runs on.
            self.conn.shared().shutdown();
        }
    }
}

fn stream_index(stream: Stream) -> usize {
    match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_wire::{Ending, ExitStatus, StreamRecord, TreeKill};

    fn job(id: u32) -> JobInfo {
        JobInfo {
            id,
            name: Some("build.1".into()),
            argv: vec!["sh".into(), "-c".into(), "echo \"hi\"; sleep 1".into()],
            uid: 1000,
            gid: 100,
            pid: 42,
            state: JobState::Killed,
            started: ferry_wire::Timestamp {
                secs: 1_700_000_000,
                nanos: 123_456_789,
            },
            duration: Duration::from_micros(2_500_600),
            stdout_bytes: 3,
            stderr_bytes: 0,
            termination: Some(Termination {
                status: ExitStatus::Signal {
                    number: 15,
                    core_dumped: false,
                },
                duration: Duration::from_millis(2500),
                output_dropped: false,
                ending: Ending::Cancelled,
                tree_kill: TreeKill::Cgroup,
                stdout: StreamRecord {
                    bytes: 3,
                    dropped: 0,
                },
                stderr: StreamRecord::default(),
                pipes_held: false,
                oom_killed: false,
                peak_memory: None,
            }),
        }
    }

    #[test]
    fn jobs_json_is_the_documented_document() {
        let mut running = job(2);
        running.name = None;
        running.state = JobState::Running;
        running.termination = None;
        let json = jobs_to_json(&[job(1), running]);
        assert_eq!(
            json,
            concat!(
                r#"{"jobs":[{"id":1,"name":"build.1","argv":["sh","-c","echo \"hi\"; sleep 1"],"#,
                r#""uid":1000,"gid":100,"pid":42,"state":"killed","#,
                r#""started":"2023-11-14T22:13:20.123Z","started_s":1700000000.123,"#,
                r#""duration_s":2.500,"stdout_bytes":3,"stderr_bytes":0,"#,
                r#""termination":{"exit_code":null,"signal":15,"core_dumped":false,"status":143,"#,
                r#""ending":"cancelled","tree_kill":"cgroup","duration_s":2.500,"#,
                r#""stdout":{"bytes":3,"dropped":0},"stderr":{"bytes":0,"dropped":0},"#,
                r#""output_dropped":false,"pipes_held":false,"oom_killed":false,"#,
                r#""peak_memory":null}},"#,
                r#"{"id":2,"name":null,"argv":["sh","-c","echo \"hi\"; sleep 1"],"#,
                r#""uid":1000,"gid":100,"pid":42,"state":"running","#,
                r#""started":"2023-11-14T22:13:20.123Z","started_s":1700000000.123,"#,
                r#""duration_s":2.500,"stdout_bytes":3,"stderr_bytes":0,"termination":null}]}"#
            )
        );
        assert_eq!(jobs_to_json(&[]), r#"{"jobs":[]}"#);
    }

    #[test]
    fn command_lines_quote_what_a_shell_would_split() {
        assert_eq!(job(1).command_line(), r#"sh -c 'echo "hi"; sleep 1'"#);
        let mut empty = job(1);
        empty.argv = vec!["printf".into(), "".into(), "it's".into()];
        assert_eq!(empty.command_line(), r#"printf '' 'it'\''s'"#);
    }
}
