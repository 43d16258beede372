//! A running remote command, async: its output as borrowed events, as a `Stream` of owned ones or
//! as an `AsyncRead`; its stdin as an `AsyncWrite` that sends only within the credit granted.
//!
//! No task is spawned. Whoever polls the [`Execution`] (or the [`OutputReader`] made from it)
//! reads the socket: output, credit grants, the end. A [`StdinWriter`] shares the session with
//! it through the connection's lock; a write without credit parks until the reader receives some.

use std::future::{poll_fn, Future};
use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};

use std::time::Duration;

use ::tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use ::tokio::time::{sleep_until, Sleep};
use ferry_wire::limits::{MAX_DATA, MAX_FRAME};
use ferry_wire::session::{ClientEvent, ClientSession, Input, Phase, SessionError};
use ferry_wire::{RecvBuf, Stream, WindowSize, DATA_HEADROOM};

use super::conn::{disconnected, refusal, session_error, Conn, Side, State};
use crate::command::ceil_millis;
use crate::conn::{broken_pipe, within, BufferPool, CONTROL_FRAME};
use crate::{AgentInfo, Error, Event, Output, Termination};

/// Room for the frames a session queues by itself (a stdin EOF).
const CONTROL_ROOM: usize = 64;

/// A command running in the guest, driven by whoever polls it. Read its output with
/// [`Execution::next_event`] (zero-copy), as a [`futures_core::Stream`] of [`OwnedEvent`]s, or
/// through [`Execution::into_reader`]; feed its stdin through [`Execution::take_stdin`] from the
/// same task (`join!`/`select!`) or another one.
///
/// Dropping an execution before its [`Event::Exited`] disconnects, and the agent kills the
/// command's whole tree: cancelling a future that owns it cancels the command.
pub struct Execution {
    receiver: Receiver,
    pid: u32,
    stdin: Option<StdinWriter>,
    /// No more events: the command ended, or the connection failed.
    done: bool,
    /// The termination record arrived (the connection ended cleanly).
    exited: bool,
}

/// An [`Event`] that owns its bytes: the item of an execution's [`futures_core::Stream`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedEvent {
    /// A chunk of its stdout, in order.
    Stdout(Vec<u8>),
    /// A chunk of its stderr, in order.
    Stderr(Vec<u8>),
    /// It ended; the last event.
    Exited(Termination),
}

/// Which output streams an [`OutputReader`] yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStreams {
    /// Only stdout; stderr chunks are read and discarded.
    Stdout,
    /// Only stderr; stdout chunks are read and discarded.
    Stderr,
    /// Both, interleaved in the order the agent read them.
    Both,
}

/// A command's output as an [`AsyncRead`]: end of file when the command ended, after which
/// [`OutputReader::termination`] says how. A failure of the connection is an `io::Error` whose
/// inner error is the [`Error`].
pub struct OutputReader {
    execution: Execution,
    streams: OutputStreams,
    /// The part of the current chunk not yet read, within the receive buffer.
    chunk: Range<usize>,
    termination: Option<Termination>,
}

/// The remote command's stdin. A write sends one frame of at most the credit the agent granted;
/// without credit it is `Pending` until the execution's reader receives some (so poll the
/// execution too). [`AsyncWrite::poll_shutdown`] (or [`StdinWriter::close`], or dropping the
/// writer) sends EOF. After the command ended, writes fail with `BrokenPipe`.
pub struct StdinWriter {
    conn: Arc<Conn>,
    /// EOF is queued (or the writer failed): nothing more may be written.
    closed: bool,
}

/// What one step of reading found. Data stays in the receive buffer until the next step.
pub(super) enum Step {
    Hello(AgentInfo),
    /// The agent proved the secret, with no operation waiting behind the proof (a health check).
    Authenticated,
    /// A kill-all finished: how many processes were signalled.
    Done(u32),
    Started(u32),
    Data {
        stderr: bool,
        range: Range<usize>,
    },
    Exited(Termination),
}

/// The reading half of a connection: the receive buffer, the handshake deadline, and bytes the
/// library feeds to stdin itself ([`crate::Stdin::Bytes`]). While polled it drives the socket in
/// both directions.
pub(super) struct Receiver {
    conn: Arc<Conn>,
    recv: RecvBuf<Box<[u8]>>,
    /// Where the receive buffer goes back to when the receiver is dropped.
    pool: Arc<BufferPool>,
    /// Bytes of the frame behind the data step returned last, dropped on the next step.
    returned: usize,
    /// The session's deadline (the handshake's, then the agent's liveness), while one is set.
    timer: Option<Pin<Box<Sleep>>>,
    feed: Option<Feed>,
    /// Bytes the agent reported dropped so far under the output cap: stdout, stderr.
    dropped: [u64; 2],
}

struct Feed {
    bytes: Vec<u8>,
    sent: usize,
}

impl Receiver {
    pub(super) fn new(conn: Arc<Conn>, pool: &Arc<BufferPool>) -> Receiver {
        Receiver {
            conn,
            recv: RecvBuf::new(pool.take()),
            pool: Arc::clone(pool),
            returned: 0,
            timer: None,
            feed: None,
            dropped: [0; 2],
        }
    }

    /// Sends what waits to be sent, then reads until the session reports something for the
    /// caller. Credit grants are handled here (they wake a waiting stdin writer).
    pub(super) fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<Result<Step, Error>> {
        self.recv.consume(std::mem::take(&mut self.returned));
        let conn = &*self.conn;
        let mut state = conn.lock();
        state.set_reader(cx.waker());
        // A send error is not reported here: the connection is broken, and reading tells how.
        let _ = state.poll_send(conn, Side::Reader, cx);
        feed_stdin(&mut state, conn, &mut self.feed, cx);
        loop {
            let data = self.recv.data();
            // `_at`: hearing the agent moves its liveness deadline on.
            let Input { consumed, event } = state
                .session
                .handle_input_at(data, conn.now())
                .map_err(session_error)?;
            let step = match event {
                None => None,
                Some(ClientEvent::HelloAccepted(info)) => {
                    Some(Step::Hello(AgentInfo::from_wire(&info)))
                }
                // The handshake is done: its deadline with it.
                Some(ClientEvent::Authenticated) => {
                    self.timer = None;
                    // An operation behind the proof reports its own first event.
                    (state.session.phase() != Phase::Starting).then_some(Step::Authenticated)
                }
                Some(ClientEvent::Done(report)) => Some(Step::Done(report.count)),
                Some(ClientEvent::Started { pid }) => Some(Step::Started(pid)),
                Some(ClientEvent::Stdout(chunk)) => Some(data_step(data, chunk, false)),
                Some(ClientEvent::Stderr(chunk)) => Some(data_step(data, chunk, true)),
                Some(ClientEvent::StdinCredit { .. }) => {
                    state.credit_granted();
                    None
                }
                Some(ClientEvent::OutputDropped(dropped)) => {
                    let total = &mut self.dropped[stream_index(dropped.stream)];
                    *total = total.saturating_add(dropped.bytes);
                    None
                }
                Some(ClientEvent::Exited(end)) => Some(Step::Exited(Termination::from_wire(end))),
                Some(ClientEvent::Refused(err)) => return Poll::Ready(Err(refusal(&err))),
                // The async API runs commands only (transfers, info and the clock are the
                // blocking API's for now); the session refuses these frames for an exec.
                Some(other) => {
                    return Poll::Ready(Err(crate::Error::Protocol(format!(
                        "unexpected event for an exec: {other:?}"
                    ))))
                }
            };
            if consumed > 0 {
                match step {
                    // The event borrows the frame: it stays until the caller is done with it.
                    Some(step @ Step::Data { .. }) => {
                        self.returned = consumed;
                        return Poll::Ready(Ok(step));
                    }
                    Some(step) => {
                        self.recv.consume(consumed);
                        return Poll::Ready(Ok(step));
                    }
                    None => {
                        self.recv.consume(consumed);
                        // Credit may have come back for the bytes the library feeds.
                        feed_stdin(&mut state, conn, &mut self.feed, cx);
                        continue;
                    }
                }
            }
            // More bytes are needed. Read what is there first: bytes waiting for a caller that
            // did not poll for a while are not silence.
            match conn.stream.poll_read_ready(cx) {
                Poll::Ready(Err(err)) => return Poll::Ready(Err(Error::Io(err))),
                Poll::Ready(Ok(())) => {
                    // Room for the largest frame behind what is buffered: no read cut short.
                    let spare = (self.recv.spare_at_least(MAX_FRAME))
                        .map_err(|err| session_error(err.into()))?;
                    match conn.stream.try_read(spare) {
                        Ok(0) => {
                            let phase = state.session.phase();
                            let left = self.recv.data().len();
                            state.session.handle_eof(left).map_err(session_error)?;
                            return Poll::Ready(Err(disconnected(phase)));
                        }
                        Ok(n) => self.recv.commit(n),
                        Err(err)
                            if matches!(
                                err.kind(),
                                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                            ) => {}
                        Err(err) => return Poll::Ready(Err(Error::Io(err))),
                    }
                    continue;
                }
                Poll::Pending => {}
            }
            // Nothing to read: the session says how long that may last (the handshake, then the
            // agent's liveness, which moves on each time the agent is heard).
            let Some(deadline) = state.session.poll_timeout() else {
                self.timer = None;
                return Poll::Pending;
            };
            let at = conn.instant(deadline);
            let timer = self.timer.get_or_insert_with(|| Box::pin(sleep_until(at)));
            if timer.deadline() != at {
                timer.as_mut().reset(at);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.timer = None;
            state
                .session
                .handle_timeout(conn.now())
                .map_err(session_error)?;
        }
    }

    /// Waits for the agent's hello: the first thing on every connection.
    pub(super) async fn hello(&mut self) -> Result<AgentInfo, Error> {
        match poll_fn(|cx| self.poll_step(cx)).await? {
            Step::Hello(info) => Ok(info),
            _ => Err(Error::Protocol("no hello from the agent".into())),
        }
    }

    /// Waits for the agent's proof, on a connection with no operation behind it (a health
    /// check of an agent that requires the secret).
    pub(super) async fn authenticated(&mut self) -> Result<(), Error> {
        match poll_fn(|cx| self.poll_step(cx)).await? {
            Step::Authenticated => Ok(()),
            _ => Err(Error::Protocol(
                "internal: a step other than the agent's proof after our hello".into(),
            )),
        }
    }

    /// Waits for the end of a kill-all: how many processes the agent signalled.
    pub(super) async fn done(&mut self) -> Result<u32, Error> {
        match poll_fn(|cx| self.poll_step(cx)).await? {
            Step::Done(count) => Ok(count),
            _ => Err(Error::Protocol(
                "internal: a step other than a done record after a kill-all".into(),
            )),
        }
    }

    /// Sends what is queued (our hello, on a connection that waits for nothing more).
    pub(super) async fn flush(&mut self) -> Result<(), Error> {
        let conn = &*self.conn;
        poll_fn(|cx| conn.lock().poll_send(conn, Side::Reader, cx))
            .await
            .map_err(Error::Io)
    }

    /// The connection this receiver reads.
    pub(super) fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let recv = std::mem::replace(&mut self.recv, RecvBuf::new(Box::default()));
        self.pool.give(recv.into_inner());
    }
}

fn stream_index(stream: Stream) -> usize {
    match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

fn data_step(input: &[u8], chunk: &[u8], stderr: bool) -> Step {
    Step::Data {
        stderr,
        range: within(input, chunk),
    }
}

/// Sends as much of the library-fed stdin as credit allows, then EOF.
fn feed_stdin(state: &mut State, conn: &Conn, feed: &mut Option<Feed>, cx: &mut Context<'_>) {
    while let Some(current) = feed.as_mut() {
        if state.has_unsent() {
            return;
        }
        // The command ended: the rest is moot.
        if !state.session.stdin_open() {
            *feed = None;
            return;
        }
        if current.sent == current.bytes.len() {
            *feed = None;
            let _ = state.session.close_stdin();
            let _ = state.queue(CONTROL_ROOM, |session, out| {
                session.poll_transmit(out).map(|n| ((), n))
            });
            let _ = state.poll_send(conn, Side::Reader, cx);
            return;
        }
        if state.session.stdin_credit() == 0 {
            return;
        }
        let rest = &current.bytes[current.sent..];
        match state.queue(stdin_room(rest.len()), |session, out| {
            session
                .send_stdin(rest, out)
                .map(|sent| (sent.taken, sent.written))
        }) {
            Ok(taken) => current.sent += taken,
            Err(_) => {
                *feed = None;
                return;
            }
        }
        if state.poll_send(conn, Side::Reader, cx).is_pending() {
            return;
        }
    }
}

impl Execution {
    /// Waits for the agent's `Started` (or its refusal) on a connection whose exec is queued
    /// behind our hello and proof (the agent's proof is checked on the way).
    pub(super) async fn start(
        receiver: Receiver,
        stdin: &crate::Stdin,
    ) -> Result<Execution, Error> {
        let conn = Arc::clone(receiver.conn());
        let mut execution = Execution {
            receiver,
            pid: 0,
            stdin: None,
            done: false,
            exited: false,
        };
        // An error drops `execution`, which ends the connection.
        // The agent's proof, checked on the way, is not a step of its own here.
        execution.pid = match poll_fn(|cx| execution.receiver.poll_step(cx)).await? {
            Step::Started(pid) => pid,
            Step::Data { .. } | Step::Exited(_) => {
                return Err(Error::Protocol("output before the command started".into()))
            }
            Step::Hello(_) | Step::Authenticated | Step::Done(_) => {
                return Err(Error::Protocol(
                    "internal: a handshake step while the command starts".into(),
                ))
            }
        };
        match stdin {
            crate::Stdin::Null => {}
            crate::Stdin::Pipe => {
                execution.stdin = Some(StdinWriter {
                    conn,
                    closed: false,
                })
            }
            crate::Stdin::Bytes(bytes) => {
                execution.receiver.feed = Some(Feed {
                    bytes: bytes.clone(),
                    sent: 0,
                })
            }
        }
        Ok(execution)
    }

    /// The command's pid in the guest (also its session and process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The command's stdin, once, when it was started with [`crate::Stdin::Pipe`]. Its writes
    /// wait for credit, and credit arrives through this execution: poll both (`join!`,
    /// `select!`, or two tasks). Dropping or shutting it down sends EOF.
    pub fn take_stdin(&mut self) -> Option<StdinWriter> {
        self.stdin.take()
    }

    /// A handle that signals, resizes or cancels this command from any task, while this one is
    /// polled for its events (which needs `&mut self`).
    pub fn controller(&self) -> Controller {
        Controller {
            conn: Arc::clone(self.receiver.conn()),
        }
    }

    /// Sends `signal` (1–64) to the command's process group. See [`Controller::signal`].
    pub async fn signal(&self, signal: i32) -> Result<(), Error> {
        self.controller().signal(signal).await
    }

    /// Tells the command's terminal its new size. See [`Controller::resize`].
    pub async fn resize(&self, size: WindowSize) -> Result<(), Error> {
        self.controller().resize(size).await
    }

    /// Ends the command's whole tree. See [`Controller::cancel`].
    pub async fn cancel(&self, grace: Option<Duration>) -> Result<(), Error> {
        self.controller().cancel(grace).await
    }

    /// When the agent read the output chunk returned last. See
    /// [`crate::Execution::last_output_at`].
    pub fn last_output_at(&self) -> Duration {
        Duration::from_micros(self.receiver.conn.lock().session.last_output_at())
    }

    /// Bytes of `stream` the agent dropped so far under the output cap. See
    /// [`crate::Execution::dropped`].
    pub fn dropped(&self, stream: Stream) -> u64 {
        self.receiver.dropped[stream_index(stream)]
    }

    /// The next thing the command did, borrowed from the receive buffer until the next call;
    /// `None` after [`Event::Exited`] was returned (or after an error). Cancel-safe: a dropped
    /// call loses nothing.
    pub async fn next_event(&mut self) -> Result<Option<Event<'_>>, Error> {
        let step = poll_fn(|cx| self.poll_next_step(cx)).await?;
        Ok(self.event(step))
    }

    /// [`Execution::next_event`] for hand-written futures.
    pub fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Event<'_>>, Error>> {
        let step = ready!(self.poll_next_step(cx));
        Poll::Ready(step.map(|step| self.event(step)))
    }

    /// Reads to the end and returns everything the command printed and how it ended. A stdin
    /// writer not taken is closed first (nobody can write to it any more).
    pub async fn collect(mut self) -> Result<Output, Error> {
        drop(self.stdin.take());
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        loop {
            match self.next_event().await? {
                Some(Event::Stdout(data)) => stdout.extend_from_slice(data),
                Some(Event::Stderr(data)) => stderr.extend_from_slice(data),
                Some(Event::Exited(end)) => return Ok(Output::new(end, stdout, stderr, self.pid)),
                None => return Err(Error::Disconnected("while the command was running")),
            }
        }
    }

    /// The command's output as an [`AsyncRead`] of `streams`. A stdin writer not taken is
    /// closed (nobody can write to it any more).
    pub fn into_reader(mut self, streams: OutputStreams) -> OutputReader {
        drop(self.stdin.take());
        OutputReader {
            execution: self,
            streams,
            chunk: 0..0,
            termination: None,
        }
    }

    fn poll_next_step(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Step>, Error>> {
        if self.done {
            return Poll::Ready(Ok(None));
        }
        let result = match ready!(self.receiver.poll_step(cx)) {
            Ok(step @ Step::Data { .. }) => return Poll::Ready(Ok(Some(step))),
            Ok(Step::Exited(end)) => Ok(Some(Step::Exited(end))),
            Ok(Step::Hello(_) | Step::Authenticated | Step::Done(_) | Step::Started(_)) => Err(
                Error::Protocol("a second hello, proof or start from the agent".into()),
            ),
            Err(err) => Err(err),
        };
        self.finish(result.is_ok());
        Poll::Ready(result)
    }

    fn event(&self, step: Option<Step>) -> Option<Event<'_>> {
        Some(match step? {
            Step::Data { stderr, range } => {
                let data = self.receiver.recv.data().get(range)?;
                if stderr {
                    Event::Stderr(data)
                } else {
                    Event::Stdout(data)
                }
            }
            Step::Exited(end) => Event::Exited(end),
            Step::Hello(_) | Step::Authenticated | Step::Done(_) | Step::Started(_) => return None,
        })
    }

    /// No more events. Unless the command's end arrived, the connection is cut: the agent kills
    /// the command's group.
    fn finish(&mut self, exited: bool) {
        self.done = true;
        self.exited |= exited;
        self.receiver.conn.lock().end();
        if !self.exited {
            self.receiver.conn.shutdown();
        }
    }
}

impl Drop for Execution {
    fn drop(&mut self) {
        if !self.done {
            self.finish(false);
        }
    }
}

impl std::fmt::Debug for Execution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Execution")
            .field("pid", &self.pid)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl futures_core::Stream for Execution {
    type Item = Result<OwnedEvent, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Poll::Ready(match ready!(self.get_mut().poll_event(cx)) {
            Ok(Some(event)) => Some(Ok(OwnedEvent::from(event))),
            Ok(None) => None,
            Err(err) => Some(Err(err)),
        })
    }
}

impl futures_core::FusedStream for Execution {
    fn is_terminated(&self) -> bool {
        self.done
    }
}

impl From<Event<'_>> for OwnedEvent {
    fn from(event: Event<'_>) -> Self {
        match event {
            Event::Stdout(data) => OwnedEvent::Stdout(data.to_vec()),
            Event::Stderr(data) => OwnedEvent::Stderr(data.to_vec()),
            Event::Exited(end) => OwnedEvent::Exited(end),
        }
    }
}

impl OwnedEvent {
    /// The borrowed form.
    pub fn as_event(&self) -> Event<'_> {
        match self {
            OwnedEvent::Stdout(data) => Event::Stdout(data),
            OwnedEvent::Stderr(data) => Event::Stderr(data),
            OwnedEvent::Exited(end) => Event::Exited(*end),
        }
    }
}

impl OutputReader {
    /// How the command ended, once the reader reached its end of file.
    pub fn termination(&self) -> Option<Termination> {
        self.termination
    }

    /// The command's pid in the guest.
    pub fn pid(&self) -> u32 {
        self.execution.pid
    }
}

impl AsyncRead for OutputReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.chunk.is_empty() {
                let data = this.execution.receiver.recv.data();
                let chunk = data.get(this.chunk.clone()).unwrap_or(&[]);
                let n = chunk.len().min(buf.remaining());
                buf.put_slice(&chunk[..n]);
                this.chunk.start += n;
                if n == chunk.len() {
                    this.chunk = 0..0;
                }
                return Poll::Ready(Ok(()));
            }
            match ready!(this.execution.poll_next_step(cx)) {
                Ok(Some(Step::Data { stderr, range })) => {
                    let wanted = match this.streams {
                        OutputStreams::Stdout => !stderr,
                        OutputStreams::Stderr => stderr,
                        OutputStreams::Both => true,
                    };
                    if wanted {
                        this.chunk = range;
                    }
                }
                Ok(Some(Step::Exited(end))) => {
                    this.termination = Some(end);
                    return Poll::Ready(Ok(()));
                }
                Ok(_) => return Poll::Ready(Ok(())),
                Err(err) => return Poll::Ready(Err(into_io(err))),
            }
        }
    }
}

impl std::fmt::Debug for OutputReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputReader")
            .field("execution", &self.execution)
            .field("streams", &self.streams)
            .field("termination", &self.termination)
            .finish_non_exhaustive()
    }
}

/// The library's error inside an `io::Error`, with the closest kind.
fn into_io(err: Error) -> io::Error {
    let kind = match &err {
        Error::Io(inner) => inner.kind(),
        Error::Disconnected(_) => io::ErrorKind::UnexpectedEof,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, err)
}

/// Signals, resizes and cancels a running command from any task ([`Execution::controller`]).
/// Each call queues one small frame and sends what the socket takes; the execution's reader
/// sends the rest. Once the command has ended every call does nothing and returns `Ok`, as the
/// agent would ignore it. The semantics are the blocking [`crate::Controller`]'s.
#[derive(Clone)]
pub struct Controller {
    conn: Arc<Conn>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller").finish_non_exhaustive()
    }
}

impl Controller {
    /// Sends `signal` (1–64) to the command's process group. See [`crate::Controller::signal`].
    pub async fn signal(&self, signal: i32) -> Result<(), Error> {
        let signal = u8::try_from(signal)
            .map_err(|_| Error::InvalidRequest(format!("no such signal: {signal}")))?;
        self.send(|session, out| session.send_signal(signal, out))
            .await
    }

    /// Tells the command's terminal its new size. See [`crate::Controller::resize`].
    pub async fn resize(&self, size: WindowSize) -> Result<(), Error> {
        self.send(|session, out| session.send_resize(size, out))
            .await
    }

    /// Ends the command's whole tree: `SIGTERM`, then `SIGKILL` after `grace`. See
    /// [`crate::Controller::cancel`].
    pub async fn cancel(&self, grace: Option<Duration>) -> Result<(), Error> {
        let grace_ms = grace
            .map(|grace| {
                u32::try_from(ceil_millis(grace)).map_err(|_| {
                    Error::InvalidRequest(
                        "the kill grace is longer than u32::MAX milliseconds".into(),
                    )
                })
            })
            .transpose()?;
        self.send(|session, out| session.send_cancel(grace_ms, out))
            .await
    }

    async fn send(
        &self,
        encode: impl Fn(&mut ClientSession, &mut [u8]) -> Result<usize, SessionError>,
    ) -> Result<(), Error> {
        poll_fn(|cx| {
            let conn = &*self.conn;
            let mut state = conn.lock();
            if state.ended {
                return Poll::Ready(Ok(()));
            }
            // One frame on its way at a time: what waits goes first.
            ready!(state.poll_send(conn, Side::Control, cx)).map_err(Error::Io)?;
            match state.queue(CONTROL_FRAME, |session, out| {
                encode(session, out).map(|n| ((), n))
            }) {
                Ok(()) => {}
                // The operation is over: nothing to control.
                Err(SessionError::InvalidState) => return Poll::Ready(Ok(())),
                Err(err) => return Poll::Ready(Err(session_error(err))),
            }
            if let Poll::Ready(Err(err)) = state.poll_send(conn, Side::Control, cx) {
                return Poll::Ready(Err(Error::Io(err)));
            }
            state.hand_to_reader();
            Poll::Ready(Ok(()))
        })
        .await
    }
}

impl StdinWriter {
    /// Sends EOF: the command reads the end of its input once it has read what was sent.
    pub async fn close(&mut self) -> io::Result<()> {
        poll_fn(|cx| Pin::new(&mut *self).poll_shutdown(cx)).await
    }
}

impl AsyncWrite for StdinWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "stdin was already closed",
            )));
        }
        let conn = &*this.conn;
        let mut state = conn.lock();
        if state.ended {
            return Poll::Ready(Err(broken_pipe()));
        }
        // One frame on its way at a time: the last one's rest goes first.
        ready!(state.poll_send(conn, Side::Writer, cx))?;
        if !state.session.stdin_open() {
            return Poll::Ready(Err(broken_pipe()));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if state.session.stdin_credit() == 0 {
            state.wait_for_credit(cx.waker());
            return Poll::Pending;
        }
        let taken = state
            .queue(stdin_room(data.len()), |session, out| {
                session
                    .send_stdin(data, out)
                    .map(|sent| (sent.taken, sent.written))
            })
            .map_err(|err| io::Error::other(err.to_string()))?;
        // The frame is committed: what the socket does not take now goes with the next call,
        // or with the reader's next poll if this writer does not come back.
        if let Poll::Ready(Err(err)) = state.poll_send(conn, Side::Writer, cx) {
            return Poll::Ready(Err(err));
        }
        state.hand_to_reader();
        Poll::Ready(Ok(taken))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let conn = &*self.conn;
        let mut state = conn.lock();
        state.poll_send(conn, Side::Writer, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let conn = &*this.conn;
        let mut state = conn.lock();
        if !this.closed {
            ready!(state.poll_send(conn, Side::Writer, cx))?;
            this.closed = true;
            if state.ended || !state.session.stdin_open() {
                return Poll::Ready(Err(broken_pipe()));
            }
            queue_eof(&mut state);
        }
        state.poll_send(conn, Side::Writer, cx)
    }
}

/// Room for one stdin frame of up to `len` bytes: the queue zero-fills what it offers, so a
/// small write is not charged for a full frame.
fn stdin_room(len: usize) -> usize {
    DATA_HEADROOM + len.min(MAX_DATA)
}

/// Queues the session's stdin EOF.
fn queue_eof(state: &mut State) {
    let _ = state.session.close_stdin();
    let _ = state.queue(CONTROL_ROOM, |session, out| {
        session.poll_transmit(out).map(|n| ((), n))
    });
}

impl Drop for StdinWriter {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        let conn = &*self.conn;
        let mut state = conn.lock();
        if state.ended || !state.session.stdin_open() {
            return;
        }
        queue_eof(&mut state);
        // Nobody will poll this writer again: try once, and leave the rest to the reader.
        let _ = state.poll_send(conn, Side::Writer, &mut Context::from_waker(Waker::noop()));
        state.hand_to_reader();
    }
}

impl std::fmt::Debug for StdinWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StdinWriter")
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}
