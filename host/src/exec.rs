//! A running remote command: its output as events, its stdin as a credit-bounded writer.

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use ferry_wire::limits::{MAX_DATA, STDIN_WINDOW};
use ferry_wire::{encode_client_frame, AgentFrame, ClientFrame, ExitStatus};

use crate::conn::{remote, unexpected, Connection};
use crate::error::Error;

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Termination {
    /// Its exit code, or the signal that killed it.
    pub status: ExitStatus,
    /// From start to end, on the guest's monotonic clock.
    pub duration: Duration,
    /// Whether the agent dropped output (only after the command ended and something else kept
    /// its pipes busy past the drain deadline). Never silent: this flag is the only way.
    pub output_dropped: bool,
}

impl Termination {
    /// Whether it exited with code 0.
    pub fn success(&self) -> bool {
        self.status == ExitStatus::Code(0)
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
}

impl Output {
    /// Whether it exited with code 0.
    pub fn success(&self) -> bool {
        self.status == ExitStatus::Code(0)
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

/// What [`Execution::advance`] stopped at.
enum Next {
    /// A stdout or stderr frame, still in the receive buffer.
    Data,
    Exited(Termination),
}

/// Stdin credit shared between the event reader (which receives grants) and the writer.
#[derive(Debug)]
struct Credit {
    state: Mutex<CreditState>,
    granted: Condvar,
}

#[derive(Debug)]
struct CreditState {
    /// Bytes the writer may still send.
    available: usize,
    /// Bytes sent and not yet credited back.
    in_flight: usize,
    /// The operation is over (ended, failed or dropped): writes fail with `BrokenPipe`.
    ended: bool,
}

impl Credit {
    fn lock(&self) -> MutexGuard<'_, CreditState> {
        // A writer thread that panicked mid-update leaves consistent counters (plain stores).
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn grant(&self, n: u32) -> Result<(), Error> {
        let mut state = self.lock();
        let n = n as usize;
        if n > state.in_flight {
            return Err(Error::Protocol(format!(
                "the agent granted {n} bytes of stdin credit with {} in flight",
                state.in_flight
            )));
        }
        state.in_flight -= n;
        state.available += n;
        self.granted.notify_all();
        Ok(())
    }

    fn end(&self) {
        self.lock().ended = true;
        self.granted.notify_all();
    }
}

/// A command running in the guest. Read its output with [`Execution::next_event`] (or collect
/// it); feed its stdin from any thread through [`Execution::take_stdin`].
///
/// Dropping an execution before its [`Event::Exited`] disconnects, and the agent kills the
/// command's whole process group.
pub struct Execution {
    conn: Connection,
    pid: u32,
    credit: Arc<Credit>,
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
    pub(crate) fn start(mut conn: Connection, stdin: &crate::Stdin) -> Result<Execution, Error> {
        let pid = match conn.recv("before the command started")? {
            AgentFrame::Started(started) => started.pid,
            AgentFrame::Error(err) => return Err(remote(&err)),
            other => return Err(unexpected(&other, "instead of a started record")),
        };
        let credit = Arc::new(Credit {
            state: Mutex::new(CreditState {
                available: STDIN_WINDOW,
                in_flight: 0,
                ended: false,
            }),
            granted: Condvar::new(),
        });
        let writer = match stdin {
            crate::Stdin::Null => None,
            crate::Stdin::Pipe | crate::Stdin::Bytes(_) => Some(StdinWriter {
                stream: conn.try_clone_stream()?,
                credit: Arc::clone(&credit),
                frame: vec![0u8; ferry_wire::limits::MAX_FRAME],
                closed: false,
            }),
        };
        let mut execution = Execution {
            conn,
            pid,
            credit,
            stdin: None,
            feed: None,
            done: false,
        };
        match stdin {
            crate::Stdin::Bytes(bytes) => {
                execution.stdin = writer;
                execution.feed = Some((bytes.clone(), 0));
                execution.feed_stdin()?;
            }
            _ => execution.stdin = writer,
        }
        Ok(execution)
    }

    /// The command's pid in the guest (also its session and process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The command's stdin, once, when it was started with [`crate::Stdin::Pipe`]. Write from
    /// another thread than the one reading events: a write waits for credit, and credit comes
    /// back through [`Execution::next_event`]. Dropping or closing it sends EOF.
    pub fn take_stdin(&mut self) -> Option<StdinWriter> {
        if self.feed.is_some() {
            return None;
        }
        self.stdin.take()
    }

    /// The next thing the command did, blocking until it happens; `None` after
    /// [`Event::Exited`] was returned (or after an error).
    pub fn next_event(&mut self) -> Result<Option<Event<'_>>, Error> {
        if self.done {
            return Ok(None);
        }
        match self.advance() {
            Ok(Next::Data) => {}
            Ok(Next::Exited(end)) => {
                self.finish();
                return Ok(Some(Event::Exited(end)));
            }
            Err(err) => {
                self.finish();
                return Err(err);
            }
        }
        // The data frame `advance` stopped at is still buffered; borrow it for the caller.
        match self.conn.last_frame() {
            Ok(AgentFrame::Stdout(data)) => Ok(Some(Event::Stdout(data.0))),
            Ok(AgentFrame::Stderr(data)) => Ok(Some(Event::Stderr(data.0))),
            Ok(_) | Err(_) => {
                self.done = true;
                self.credit.end();
                Err(Error::Protocol("lost track of the current frame".into()))
            }
        }
    }

    fn finish(&mut self) {
        self.done = true;
        self.credit.end();
    }

    /// Receives frames until one is for the caller, handling credit grants on the way.
    fn advance(&mut self) -> Result<Next, Error> {
        loop {
            self.feed_stdin()?;
            match self.conn.recv("while the command was running")? {
                AgentFrame::StdinCredit(n) => self.credit.grant(n)?,
                AgentFrame::Stdout(_) | AgentFrame::Stderr(_) => return Ok(Next::Data),
                AgentFrame::Exited(end) => {
                    return Ok(Next::Exited(Termination {
                        status: end.status,
                        duration: Duration::from_micros(end.duration_us),
                        output_dropped: end.output_dropped,
                    }))
                }
                AgentFrame::Error(err) => return Err(remote(&err)),
                other => return Err(unexpected(&other, "while the command was running")),
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
    /// the callback ends the command (like a closed pipe would) and is returned.
    pub fn pump(
        mut self,
        mut on_output: impl FnMut(bool, &[u8]) -> io::Result<()>,
    ) -> Result<Termination, PumpError> {
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
        Ok(Output {
            status: end.status,
            stdout,
            stderr,
            duration: end.duration,
            output_dropped: end.output_dropped,
            pid,
        })
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
        self.credit.end();
        if !self.done {
            // The agent kills the command's process group when the connection drops.
            self.conn.shutdown();
        }
    }
}

/// The remote command's stdin. Writes block only for credit (the agent's bounded buffer);
/// [`StdinWriter::close`] or dropping it sends EOF.
#[derive(Debug)]
pub struct StdinWriter {
    stream: UnixStream,
    credit: Arc<Credit>,
    frame: Vec<u8>,
    closed: bool,
}

impl StdinWriter {
    /// Sends EOF: the command reads the end of its input once it has read what was sent.
    pub fn close(&mut self) -> io::Result<()> {
        if std::mem::replace(&mut self.closed, true) {
            return Ok(());
        }
        if self.credit.lock().ended {
            return Err(broken_pipe());
        }
        let len = encode_client_frame(&ClientFrame::StdinEof, &mut self.frame)
            .map_err(|err| io::Error::other(err.to_string()))?;
        (&self.stream).write_all(&self.frame[..len])
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
        let n = {
            let mut state = self.credit.lock();
            while state.available == 0 && !state.ended && wait {
                state = self
                    .credit
                    .granted
                    .wait(state)
                    .unwrap_or_else(|poison| poison.into_inner());
            }
            if state.ended {
                return Err(broken_pipe());
            }
            let n = data.len().min(state.available).min(MAX_DATA);
            state.available -= n;
            state.in_flight += n;
            n
        };
        if n == 0 {
            return Ok(0);
        }
        let start =
            ferry_wire::frame_data_in_place(&mut self.frame, ferry_wire::DataKind::Stdin, n)
                .map_err(|err| io::Error::other(err.to_string()))?;
        self.frame[ferry_wire::DATA_HEADROOM..ferry_wire::DATA_HEADROOM + n]
            .copy_from_slice(&data[..n]);
        (&self.stream).write_all(&self.frame[start..ferry_wire::DATA_HEADROOM + n])?;
        Ok(n)
    }
}

fn broken_pipe() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "the remote command has ended; its stdin is closed",
    )
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
