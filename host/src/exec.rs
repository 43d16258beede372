//! A running remote command: its output as events, its stdin as a credit-bounded writer.

use std::io::{self, Write};
use std::sync::Arc;
use std::time::Duration;

use ferry_wire::limits::MAX_FRAME;
use ferry_wire::{Ending, ExitStatus, Stream, StreamRecord, TreeKill, WindowSize};

use crate::command::ceil_millis;
use crate::conn::{out_of_order, Connection, Received, Shared};
use crate::error::Error;

/// How a command ended: the agent's termination record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Termination {
    /// Its exit code, or the signal that killed it.
    pub status: ExitStatus,
    /// From start to end, on the guest's monotonic clock.
    pub duration: Duration,
    /// Whether any output was dropped rather than delivered: past an output cap
    /// ([`crate::Command::max_output`]), past the post-exit drain limit, or from a failed pipe.
    /// Never silent: the record is how output goes missing ([`Termination::stdout`] and
    /// [`Termination::stderr`] say how much).
    pub output_dropped: bool,
    /// What ended it: itself, its timeout, a cancel, or one of the agent's limits.
    pub ending: Ending,
    /// How its tree was killed, if it was (a timeout, a cancel, a disconnect,
    /// [`crate::Command::kill_tree_on_exit`], a limit): by its cgroup (nothing escapes) or by
    /// its process group (a process that left the group escapes).
    pub tree_kill: TreeKill,
    /// What its stdout produced and dropped (with a terminal: all its output).
    pub stdout: StreamRecord,
    /// What its stderr produced and dropped.
    pub stderr: StreamRecord,
    /// Other processes (a background job, a daemon) still held its output pipes when it ended,
    /// and the agent stopped waiting for them: what they write later is lost.
    pub pipes_held: bool,
    /// The kernel's OOM killer killed a process of its tree (known only with cgroup v2).
    pub oom_killed: bool,
    /// The most memory its tree used, in bytes, when the agent knows (cgroup v2).
    pub peak_memory: Option<u64>,
}

impl Termination {
    /// Whether it exited with code 0.
    pub fn success(&self) -> bool {
        self.status == ExitStatus::Code(0)
    }

    /// The agent's termination record, as both drivers report it.
    pub(crate) fn from_wire(end: ferry_wire::Termination) -> Termination {
        Termination {
            status: end.status,
            duration: Duration::from_micros(end.duration_us),
            output_dropped: end.output_dropped,
            ending: end.ending,
            tree_kill: end.tree_kill,
            stdout: end.stdout,
            stderr: end.stderr,
            pipes_held: end.pipes_held,
            oom_killed: end.oom_killed,
            peak_memory: (end.peak_memory > 0).then_some(end.peak_memory),
        }
    }
}

/// Everything a command printed, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Its exit code, or the signal that killed it.
    pub status: ExitStatus,
    /// Every byte it wrote to stdout.
    pub stdout: Vec<u8>,
    /// Every byte it wrote to stderr.
    pub stderr: Vec<u8>,
    /// From start to end, on the guest's monotonic clock.
    pub duration: Duration,
    /// See [`Termination::output_dropped`].
    pub output_dropped: bool,
    /// Its pid in the guest.
    pub pid: u32,
    /// The whole termination record (the fields above repeat parts of it).
    pub termination: Termination,
}

impl Output {
    /// Whether it exited with code 0.
    pub fn success(&self) -> bool {
        self.status == ExitStatus::Code(0)
    }

    /// What a collect gathered, once the command ended.
    pub(crate) fn new(end: Termination, stdout: Vec<u8>, stderr: Vec<u8>, pid: u32) -> Output {
        Output {
            status: end.status,
            stdout,
            stderr,
            duration: end.duration,
            output_dropped: end.output_dropped,
            pid,
            termination: end,
        }
    }
}

/// One thing a running command did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// A chunk of its stdout, in order.
    Stdout(&'a [u8]),
    /// A chunk of its stderr, in order.
    Stderr(&'a [u8]),
    /// It ended; the last event.
    Exited(Termination),
}

/// A command running in the guest. Read its output with [`Execution::next_event`] (or collect
/// it); feed its stdin from any thread through [`Execution::take_stdin`].
///
/// Dropping an execution before its [`Event::Exited`] disconnects, and the agent kills the
/// command's whole tree (its cgroup, or its process group where the guest has no cgroup v2).
pub struct Execution {
    conn: Connection,
    agent: crate::AgentInfo,
    pid: u32,
    /// Bytes the agent reported dropped so far: stdout, stderr.
    dropped: [u64; 2],
    stdin: Option<StdinWriter>,
    /// Bytes from [`crate::Stdin::Bytes`] still to be fed, and how far feeding got.
    feed: Option<(Vec<u8>, usize)>,
    done: bool,
}

impl std::fmt::Debug for Execution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Execution")
            .field("pid", &self.pid)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl Execution {
    /// Waits for the agent's `Started` (or its refusal) on a connection that sent an exec.
    pub(crate) fn start(
        mut conn: Connection,
        agent: crate::AgentInfo,
        stdin: &crate::Stdin,
    ) -> Result<Execution, Error> {
        let pid = match conn.receive()? {
            Received::Started(pid) => pid,
            other => return Err(out_of_order(&other, "before the command started")),
        };
        let writer = match stdin {
            crate::Stdin::Null => None,
            crate::Stdin::Pipe | crate::Stdin::Bytes(_) => {
                Some(StdinWriter::new(Arc::clone(conn.shared())))
            }
        };
        let mut execution = Execution {
            conn,
            agent,
            pid,
            dropped: [0; 2],
            stdin: writer,
            feed: None,
            done: false,
        };
        if let crate::Stdin::Bytes(bytes) = stdin {
            execution.feed = Some((bytes.clone(), 0));
            execution.feed_stdin()?;
        }
        Ok(execution)
    }

    /// The command's pid in the guest (also its session and process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// What the agent said about itself in its hello (its security mode, its limits).
    pub fn agent(&self) -> &crate::AgentInfo {
        &self.agent
    }

    /// The command's stdin, once, when it was started with [`crate::Stdin::Pipe`]. Write from
    /// another thread than the one reading events: a write waits for credit, and credit comes
    /// back through [`Execution::next_event`]. Dropping or closing it sends EOF.
    ///
    /// A write that would have to wait for credit on the thread that last called
    /// [`Execution::next_event`] (for example from inside a [`Execution::pump`] callback) fails
    /// with [`io::ErrorKind::WouldBlock`] instead: nothing else would bring the credit.
    pub fn take_stdin(&mut self) -> Option<StdinWriter> {
        if self.feed.is_some() {
            return None;
        }
        self.stdin.take()
    }

    /// A handle that signals, resizes or cancels this command from any thread, while another
    /// reads its events (which needs `&mut self`).
    pub fn controller(&self) -> Controller {
        Controller::new(Arc::clone(self.conn.shared()))
    }

    /// Sends `signal` (1–64, e.g. `libc::SIGTERM`) to the command's process group. See
    /// [`Controller::signal`].
    pub fn signal(&self, signal: i32) -> Result<(), Error> {
        self.controller().signal(signal)
    }

    /// Tells the command's terminal its new size. See [`Controller::resize`].
    pub fn resize(&self, size: WindowSize) -> Result<(), Error> {
        self.controller().resize(size)
    }

    /// Ends the command's whole tree. See [`Controller::cancel`].
    pub fn cancel(&self, grace: Option<Duration>) -> Result<(), Error> {
        self.controller().cancel(grace)
    }

    /// When the agent read the output chunk [`Execution::next_event`] returned last: the time
    /// since the command started, on the guest's monotonic clock (so stdout and stderr can be
    /// put back in the order they happened). Zero before any output.
    pub fn last_output_at(&self) -> Duration {
        Duration::from_micros(self.conn.shared().last_output_at())
    }

    /// Bytes of `stream` the agent dropped so far under the output cap
    /// ([`crate::Command::max_output`]): once nonzero, that stream's head has ended, and its
    /// chunks from the next one on are its tail (the last bytes before its end).
    pub fn dropped(&self, stream: Stream) -> u64 {
        self.dropped[stream_index(stream)]
    }

    /// The next thing the command did, blocking until it happens; `None` after
    /// [`Event::Exited`] was returned (or after an error).
    pub fn next_event(&mut self) -> Result<Option<Event<'_>>, Error> {
        if self.done {
            return Ok(None);
        }
        self.conn.note_reader();
        let received = match self.advance() {
            Ok(received) => received,
            Err(err) => {
                self.finish();
                return Err(err);
            }
        };
        let event = match received {
            Received::Stdout(range) => Event::Stdout(self.conn.chunk(range)),
            Received::Stderr(range) => Event::Stderr(self.conn.chunk(range)),
            Received::Exited(end) => {
                self.finish();
                Event::Exited(end)
            }
            other => {
                self.finish();
                return Err(out_of_order(&other, "while the command was running"));
            }
        };
        Ok(Some(event))
    }

    /// The operation is over (ended or failed): a stdin writer fails from now on.
    fn finish(&mut self) {
        self.done = true;
        self.conn.shared().close();
        // A writer nobody took holds the connection: without it, the connection can carry
        // the client's next operation.
        self.stdin = None;
    }

    /// Receives until something is for the caller, feeding stdin as credit comes back.
    fn advance(&mut self) -> Result<Received, Error> {
        loop {
            self.feed_stdin()?;
            match self.conn.receive()? {
                Received::Credit => {}
                Received::Dropped(dropped) => {
                    let total = &mut self.dropped[stream_index(dropped.stream)];
                    *total = total.saturating_add(dropped.bytes);
                }
                other => return Ok(other),
            }
        }
    }

    /// Sends as much of the [`crate::Stdin::Bytes`] as credit allows, without waiting.
    fn feed_stdin(&mut self) -> Result<(), Error> {
        let (Some((bytes, sent)), Some(writer)) = (self.feed.as_mut(), self.stdin.as_mut()) else {
            return Ok(());
        };
        while *sent < bytes.len() {
            match writer.write_within_credit(&bytes[*sent..], false) {
                Ok(0) => return Ok(()),
                Ok(n) => *sent += n,
                // The command is gone or stopped reading: the rest is moot.
                Err(err) if err.kind() == io::ErrorKind::BrokenPipe => break,
                Err(err) => return Err(Error::Io(err)),
            }
        }
        self.feed = None;
        if let Some(mut writer) = self.stdin.take() {
            match writer.close() {
                Err(err) if err.kind() != io::ErrorKind::BrokenPipe => return Err(Error::Io(err)),
                _ => {}
            }
        }
        Ok(())
    }

    /// Reads to the end, handing each chunk to `on_output` (`true` for stderr). An error from
    /// the callback ends the command (like a closed pipe would) and is returned. A stdin pipe
    /// that was not taken is closed first: nothing could write to it afterwards.
    pub fn pump(
        mut self,
        mut on_output: impl FnMut(bool, &[u8]) -> io::Result<()>,
    ) -> Result<Termination, PumpError> {
        // Nothing can write to a stdin pipe nobody took once the execution is consumed here:
        // close it, or a command that reads to EOF (`cat`, `sort`) would wait forever.
        if self.feed.is_none() {
            if let Some(mut untaken) = self.stdin.take() {
                match untaken.close() {
                    Err(err) if err.kind() != io::ErrorKind::BrokenPipe => {
                        return Err(PumpError::Ferry(Error::Io(err)))
                    }
                    _ => {}
                }
            }
        }
        while let Some(event) = self.next_event()? {
            match event {
                Event::Stdout(data) => on_output(false, data).map_err(PumpError::Sink)?,
                Event::Stderr(data) => on_output(true, data).map_err(PumpError::Sink)?,
                Event::Exited(end) => return Ok(end),
            }
        }
        Err(PumpError::Ferry(Error::Disconnected(
            "while the command was running",
        )))
    }

    /// Collects all output until the command ends.
    pub fn collect(self) -> Result<Output, Error> {
        let pid = self.pid;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let end = self
            .pump(|is_stderr, data| {
                if is_stderr { &mut stderr } else { &mut stdout }.extend_from_slice(data);
                Ok(())
            })
            .map_err(|err| match err {
                PumpError::Ferry(err) => err,
                PumpError::Sink(err) => Error::Io(err),
            })?;
        Ok(Output::new(end, stdout, stderr, pid))
    }
}

fn stream_index(stream: Stream) -> usize {
    match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

/// Signals, resizes and cancels a running command, from any thread ([`Execution::controller`]).
/// Each call sends one small frame; it never waits for the command. Once the command has ended
/// every call does nothing and returns `Ok`, as the agent would ignore it.
#[derive(Clone)]
pub struct Controller {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller").finish_non_exhaustive()
    }
}

impl Controller {
    /// A controller of the operation on `shared`'s connection (an exec, an attachment).
    pub(crate) fn new(shared: Arc<Shared>) -> Controller {
        Controller { shared }
    }

    /// Sends `signal` (1–64, e.g. `libc::SIGTERM`) to the command's process group; anything
    /// else is [`Error::InvalidRequest`]. With a terminal, `^C` is better sent as the byte it
    /// is (3) on stdin: the guest's terminal then signals its foreground job, as a local one
    /// would.
    pub fn signal(&self, signal: i32) -> Result<(), Error> {
        let signal = u8::try_from(signal)
            .map_err(|_| Error::InvalidRequest(format!("no such signal: {signal}")))?;
        self.shared
            .send_control(|session, out| session.send_signal(signal, out))
    }

    /// Tells the command's terminal its new size (the command gets `SIGWINCH`). A command
    /// started without [`crate::Command::pty`] has none: [`Error::InvalidRequest`].
    pub fn resize(&self, size: WindowSize) -> Result<(), Error> {
        self.shared
            .send_control(|session, out| session.send_resize(size, out))
    }

    /// Ends the command's whole tree: `SIGTERM` now, `SIGKILL` after `grace` (`None`: the
    /// request's [`crate::Command::kill_after`], else the agent's 2 s). The termination record
    /// follows as usual and says [`Ending::Cancelled`]. A second cancel can only bring the
    /// `SIGKILL` closer. A grace beyond `u32::MAX` milliseconds is [`Error::InvalidRequest`].
    pub fn cancel(&self, grace: Option<Duration>) -> Result<(), Error> {
        let grace_ms = grace
            .map(|grace| {
                u32::try_from(ceil_millis(grace)).map_err(|_| {
                    Error::InvalidRequest(
                        "the kill grace is longer than u32::MAX milliseconds".into(),
                    )
                })
            })
            .transpose()?;
        self.shared
            .send_control(|session, out| session.send_cancel(grace_ms, out))
    }
}

/// Why [`Execution::pump`] stopped early.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    /// The connection or the agent failed.
    #[error(transparent)]
    Ferry(#[from] Error),
    /// The caller's output callback failed (e.g. a closed local stdout).
    #[error("writing the command's output: {0}")]
    Sink(#[source] io::Error),
}

impl Drop for Execution {
    fn drop(&mut self) {
        if !self.done {
            // The agent kills the command's tree when the connection drops.
            self.conn.shared().shutdown();
        }
    }
}

/// The remote command's stdin. Writes block only for credit (the agent's bounded buffer);
/// [`StdinWriter::close`] or dropping it sends EOF.
pub struct StdinWriter {
    shared: Arc<Shared>,
    /// Where a frame is built; it goes out whole, in one write.
    frame: Vec<u8>,
    closed: bool,
}

impl std::fmt::Debug for StdinWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StdinWriter")
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl StdinWriter {
    /// A writer of the stdin of the operation on `shared`'s connection (an exec, an
    /// attachment that was granted stdin).
    pub(crate) fn new(shared: Arc<Shared>) -> StdinWriter {
        StdinWriter {
            shared,
            frame: vec![0u8; MAX_FRAME],
            closed: false,
        }
    }

    /// Sends EOF: the command reads the end of its input once it has read what was sent.
    pub fn close(&mut self) -> io::Result<()> {
        if std::mem::replace(&mut self.closed, true) {
            return Ok(());
        }
        self.shared.close_stdin(&mut self.frame)
    }

    /// Sends up to one chunk within the available credit; with `wait`, blocks until there is
    /// some. `Ok(0)` without `wait` means no credit now.
    fn write_within_credit(&mut self, data: &[u8], wait: bool) -> io::Result<usize> {
        if self.closed {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "stdin was already closed",
            ));
        }
        if data.is_empty() {
            return Ok(0);
        }
        self.shared.send_stdin(data, &mut self.frame, wait)
    }
}

impl Write for StdinWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.write_within_credit(data, true)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for StdinWriter {
    fn drop(&mut self) {
        let _ = self.close();
    }
}
