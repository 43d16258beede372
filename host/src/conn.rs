//! One connection to the agent, driving `ferry_wire`'s [`ClientSession`]: this file moves bytes
//! between the socket, the receive buffer and the session, and turns the session's events and
//! errors into the library's types. Every protocol rule (frame order, versions, stdin credit,
//! the hello's deadline) is the session's.

use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use ferry_wire::limits::MAX_FRAME;
use ferry_wire::session::{ClientAuth, ClientEvent, ClientSession, Micros, Phase, SessionError};
use ferry_wire::{
    Bounds, Dropped, ErrorCode, ErrorFrame, ExecRequest, FileHeader, FileSummary, GetRequest,
    Limits, PutRequest, RecvBuf, Security, DATA_HEADROOM, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

use crate::error::{Error, RemoteError};
use crate::exec::Termination;
use crate::target::{is_timeout, ConnectOptions, Target};
use crate::transfer::SkippedEntry;

/// Room for one control frame: a tag and a few varints.
pub(crate) const CONTROL_FRAME: usize = 64;

/// Receive buffer: several full frames per `read` when output streams fast.
const RECV_BUFFER: usize = 4 * MAX_FRAME;

/// What the agent said about itself in its hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    /// The protocol version both sides speak on this connection.
    pub protocol_version: u16,
    /// The agent's own version.
    pub agent_version: String,
    /// The limits the agent enforces.
    pub limits: Limits,
    /// Whether the agent requires the secret ([`Security::Insecure`]: anyone who reaches it
    /// may run commands).
    pub security: Security,
    /// How the agent bounds commands.
    pub bounds: Bounds,
}

impl AgentInfo {
    /// The agent's hello, as both drivers report it.
    pub(crate) fn from_wire(info: &ferry_wire::session::AgentInfo<'_>) -> AgentInfo {
        AgentInfo {
            protocol_version: info.protocol_version,
            agent_version: info.agent_version.to_owned(),
            limits: info.limits,
            security: info.security,
            bounds: info.bounds,
        }
    }
}

/// A fresh session for one connection: a fresh nonce, and the secret if the caller has one.
pub(crate) fn new_session(
    options: &ConnectOptions,
    hello_timeout: Duration,
) -> Result<ClientSession, Error> {
    let mut nonce = [0u8; ferry_wire::limits::NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|err| {
        Error::Io(io::Error::other(format!(
            "no random bytes for a nonce: {err}"
        )))
    })?;
    let auth = ClientAuth {
        nonce,
        secret: options.secret.clone(),
    };
    Ok(ClientSession::new(0, Some(micros(hello_timeout)), auth))
}

/// Receive buffers kept between one client's connections (clones included): a fresh buffer
/// costs an mmap, page faults and an munmap per operation. Both the blocking and the async
/// client keep one.
#[derive(Default)]
pub(crate) struct BufferPool(Mutex<Vec<Box<[u8]>>>);

/// Buffers a pool keeps: enough for a few operations running side by side.
const POOLED_BUFFERS: usize = 4;

impl BufferPool {
    pub fn take(&self) -> Box<[u8]> {
        let pooled = self.0.lock().ok().and_then(|mut buffers| buffers.pop());
        pooled.unwrap_or_else(|| vec![0u8; RECV_BUFFER].into_boxed_slice())
    }

    pub fn give(&self, buffer: Box<[u8]>) {
        if let Ok(mut buffers) = self.0.lock() {
            if buffers.len() < POOLED_BUFFERS && buffer.len() == RECV_BUFFER {
                buffers.push(buffer);
            }
        }
    }
}

impl std::fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pooled = self.0.lock().map_or(0, |buffers| buffers.len());
        write!(f, "BufferPool({pooled} buffers)")
    }
}

/// What the reading side and a stdin writer on another thread share: the socket and the one
/// session. The reader locks the session only while it hands it input (events borrow the
/// receive buffer, not the session); a writer locks it to frame stdin within credit.
pub(crate) struct Shared {
    stream: UnixStream,
    state: Mutex<State>,
    /// Signalled when the session's stdin state may have changed (credit, the end), for a
    /// writer waiting in [`Shared::send_stdin`].
    credit_changed: Condvar,
    /// Held from framing to the end of the write, so frames from two threads never interleave
    /// and go out in the order the session framed them.
    writing: Mutex<()>,
}

struct State {
    session: ClientSession,
    /// The connection is being dropped: writers fail instead of waiting.
    closed: bool,
    /// The thread that last asked for the command's events. A writer on that thread must not
    /// wait for credit: only that thread's next read would bring it.
    reader: Option<ThreadId>,
    /// Writers blocked on `credit_changed` (a notification costs a syscall; skip it when none).
    waiting: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a plain value updated in place; a panic elsewhere does not tear it.
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn lock_writing(&self) -> MutexGuard<'_, ()> {
        self.writing
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Wakes writers waiting for credit, if there are any.
    fn wake_writers(&self, state: &State) {
        if state.waiting > 0 {
            self.credit_changed.notify_all();
        }
    }

    /// Sends one stdin frame with as much of `data` as the session allows; with `wait`, waits
    /// for credit first. `Ok(0)` without `wait`: no credit now.
    pub fn send_stdin(&self, data: &[u8], frame: &mut [u8], wait: bool) -> io::Result<usize> {
        loop {
            let writing = self.lock_writing();
            let mut state = self.lock();
            if state.closed {
                return Err(broken_pipe());
            }
            let sent = state.session.send_stdin(data, frame).map_err(stdin_error)?;
            if sent.taken > 0 {
                drop(state);
                (&self.stream).write_all(&frame[..sent.written])?;
                return Ok(sent.taken);
            }
            if !wait {
                return Ok(0);
            }
            if state.reader == Some(thread::current().id()) {
                // NOTE: waiting here would wait forever: credit arrives through this thread's
                // next read. Refused instead of deadlocked.
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "no stdin credit, and this thread is the one that receives it: \
                     write the command's stdin from another thread than its events",
                ));
            }
            // Wait without blocking other writers; the state lock is held until the wait
            // begins, so no grant is missed.
            drop(writing);
            state.waiting += 1;
            let mut state = self
                .credit_changed
                .wait(state)
                .unwrap_or_else(|poison| poison.into_inner());
            state.waiting -= 1;
        }
    }

    /// Sends `len` stdin bytes the caller placed at `buf[DATA_HEADROOM..]`, framed in place
    /// (no copy); `len` must be within [`Shared::stdin_credit`].
    pub fn send_stdin_in_place(&self, buf: &mut [u8], len: usize) -> io::Result<()> {
        let _writing = self.lock_writing();
        let mut state = self.lock();
        if state.closed {
            return Err(broken_pipe());
        }
        let start = state
            .session
            .frame_stdin_in_place(buf, len)
            .map_err(stdin_error)?;
        drop(state);
        let frame = buf.get(start..DATA_HEADROOM + len).unwrap_or_default();
        (&self.stream).write_all(frame)
    }

    /// The stdin bytes that may be sent now.
    pub fn stdin_credit(&self) -> usize {
        self.lock().session.stdin_credit()
    }

    /// Sends the one frame `encode` asks the session for; unlike [`Shared::send_control`], a
    /// refusal is an error (a put's end must not be lost quietly).
    pub fn send_frame(
        &self,
        encode: impl FnOnce(&mut ClientSession, &mut [u8]) -> Result<usize, SessionError>,
    ) -> Result<(), Error> {
        let mut frame = [0u8; CONTROL_FRAME];
        let _writing = self.lock_writing();
        let mut state = self.lock();
        let len = encode(&mut state.session, &mut frame).map_err(session_error)?;
        drop(state);
        (&self.stream)
            .write_all(frame.get(..len).unwrap_or_default())
            .map_err(io_error)
    }

    /// Ends stdin: the session queues EOF and the frame is sent.
    pub fn close_stdin(&self, frame: &mut [u8]) -> io::Result<()> {
        let _writing = self.lock_writing();
        let mut state = self.lock();
        if state.closed || !state.session.stdin_open() {
            return Err(broken_pipe());
        }
        state.session.close_stdin().map_err(stdin_error)?;
        let len = state.session.poll_transmit(frame).map_err(stdin_error)?;
        drop(state);
        (&self.stream).write_all(&frame[..len])
    }

    /// Sends one control frame (a signal, a resize, a cancel) that `encode` asks the session
    /// for. After the operation is over it does nothing: the command has ended (or the
    /// connection failed, which the reader reports).
    pub fn send_control(
        &self,
        encode: impl FnOnce(&mut ClientSession, &mut [u8]) -> Result<usize, SessionError>,
    ) -> Result<(), Error> {
        let mut frame = [0u8; CONTROL_FRAME];
        let _writing = self.lock_writing();
        let mut state = self.lock();
        if state.closed {
            return Ok(());
        }
        let len = match encode(&mut state.session, &mut frame) {
            Ok(len) => len,
            Err(SessionError::InvalidState) => return Ok(()),
            Err(err) => return Err(session_error(err)),
        };
        drop(state);
        (&self.stream)
            .write_all(frame.get(..len).unwrap_or_default())
            .map_err(io_error)
    }

    /// When the agent read the last output chunk, in microseconds since the command started.
    pub fn last_output_at(&self) -> u64 {
        self.lock().session.last_output_at()
    }

    /// The connection is going away: writers stop waiting and fail from now on.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        self.wake_writers(&state);
    }

    /// Ends the connection in both directions: the agent sees a disconnect at once, even while
    /// a stdin writer still holds the socket.
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// What a connection received, owned: output is a range of the receive buffer, borrowed by
/// [`Connection::chunk`] (so a caller can loop over receives without holding a borrow).
#[derive(Debug)]
pub(crate) enum Received {
    Hello(AgentInfo),
    /// The agent proved the secret (reported only when no operation waits behind it).
    Authenticated,
    Done(u32),
    Started(u32),
    Stdout(Range<usize>),
    Stderr(Range<usize>),
    /// Stdin credit came back (writers were woken).
    Credit,
    /// A stream passed its output cap: its head came before, its tail follows.
    Dropped(Dropped),
    Exited(Termination),
    /// A put or a get was checked and begins.
    FileReady(FileHeader),
    /// A chunk of a get's content.
    FileData(Range<usize>),
    /// A tree transfer left an entry out.
    Skipped(SkippedEntry),
    /// A transfer's end: what moved, and its SHA-256 by the agent's count.
    FileDone(FileSummary),
    /// Info's frames, converted at the edge.
    System(crate::system::System),
    Mount(crate::system::Mount),
    Interface(crate::system::Interface),
    /// The guest's clock before a time sync set it.
    ClockSet(ferry_wire::Timestamp),
    /// A detached job started.
    Detached(ferry_wire::JobStarted),
    /// A job of a listing.
    Job(Box<crate::job_record::JobInfo>),
    /// An attachment began.
    Attached(ferry_wire::AttachHeader),
}

/// A [`crate::Client`]'s idle connections (protocol 5 keep-alive): each one's operation ended
/// cleanly (its final frame read, nothing owed, nothing else holding it), newest last.
pub(crate) struct IdlePool {
    idle: Mutex<Vec<Idle>>,
    max: usize,
}

/// A connection waiting for its next operation.
struct Idle {
    shared: Arc<Shared>,
    recv: RecvBuf<Box<[u8]>>,
    info: AgentInfo,
    epoch: Instant,
    /// When its last operation ended.
    since: Instant,
}

impl Idle {
    /// Whether the agent still keeps it: younger than the agent's idle deadline less a margin
    /// (so the agent's close does not cross our request, mostly). A connection the agent
    /// closed anyway is found by the request's answer (see [`IdlePool::reuse`]): a `poll` here
    /// would cost every operation a syscall to spare a rare one a write.
    fn usable(&self) -> bool {
        let idle = Duration::from_millis(u64::from(self.info.limits.idle_ms));
        let margin = (idle / 2).min(IDLE_MARGIN);
        self.since.elapsed() < idle.saturating_sub(margin)
    }
}

/// How much sooner than the agent's idle deadline a pooled connection is given up.
const IDLE_MARGIN: Duration = Duration::from_secs(1);

impl IdlePool {
    pub fn new(max: usize) -> IdlePool {
        IdlePool {
            idle: Mutex::new(Vec::new()),
            max,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Idle>> {
        self.idle
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Starts `operation` on an idle connection, when one is still good: `None` means connect
    /// afresh. A connection whose agent closed it before answering (an EOF or a reset before
    /// the first byte of the answer) is given up for the next one, or a fresh connection.
    ///
    /// NOTE: why retrying is safe enough: the agent closes an idle connection only while it
    /// waits for a request (its idle deadline, or after an operation that ends the
    /// connection), and once it has read a request it always answers before it closes. So no
    /// answer at all means the request was never read, unless the connection process died
    /// right between reading and answering (killed), where the request may have begun.
    pub fn reuse(
        self: &Arc<Self>,
        operation: Operation<'_, '_>,
        buffers: Option<&Arc<BufferPool>>,
    ) -> Result<Option<(Connection, AgentInfo)>, Error> {
        loop {
            let Some(idle) = self.lock().pop() else {
                return Ok(None);
            };
            if !idle.usable() {
                continue;
            }
            let info = idle.info.clone();
            let mut conn = Connection {
                shared: idle.shared,
                recv: idle.recv,
                pool: buffers.cloned(),
                handed_out: 0,
                epoch: idle.epoch,
                reader: None,
                idle: None,
                info: Some(idle.info),
            };
            {
                let mut state = conn.shared.lock();
                state.closed = false;
                state.reader = None;
            }
            let opening = Opening::encode(&mut conn.shared.lock().session, operation)?;
            if (&conn.shared.stream).write_all(opening.bytes()).is_err() {
                continue;
            }
            if !conn.answer_arrives()? {
                continue;
            }
            conn.idle = Some(Arc::clone(self));
            return Ok(Some((conn, info)));
        }
    }

    fn keep(&self, idle: Idle) {
        let mut pool = self.lock();
        if pool.len() < self.max {
            pool.push(idle);
        }
    }
}

impl std::fmt::Debug for IdlePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IdlePool({} idle)", self.lock().len())
    }
}

/// A connection and its receive buffer; the reading side.
pub(crate) struct Connection {
    shared: Arc<Shared>,
    recv: RecvBuf<Box<[u8]>>,
    /// Where the receive buffer goes back to when the connection ends.
    pool: Option<Arc<BufferPool>>,
    /// Bytes at the front of `recv` that the last [`Received`] borrowed, dropped on the next
    /// receive.
    handed_out: usize,
    /// Zero on the session's clock.
    epoch: Instant,
    /// This side's copy of [`State::reader`], so noting the same reader again costs no lock.
    reader: Option<ThreadId>,
    /// Where the connection waits for its next operation once this one ended cleanly.
    idle: Option<Arc<IdlePool>>,
    /// The agent's hello, kept for the connection's next operations.
    info: Option<AgentInfo>,
}

impl Connection {
    /// Connects and completes the handshake (the agent's hello, ours, both proofs), all within
    /// `options.connect_timeout`.
    pub fn open(
        target: &Target,
        options: &ConnectOptions,
        pool: Option<&Arc<BufferPool>>,
    ) -> Result<(Connection, AgentInfo), Error> {
        Connection::open_with(target, options, pool, Operation::None)
    }

    /// Like [`Connection::open`], with an operation behind our hello and proof: the session
    /// encodes all of them, and they go out in one write, so the operation costs no extra
    /// round trip. The agent's proof is then checked as the operation's first answer.
    pub fn open_with(
        target: &Target,
        options: &ConnectOptions,
        pool: Option<&Arc<BufferPool>>,
        operation: Operation<'_, '_>,
    ) -> Result<(Connection, AgentInfo), Error> {
        // Refused before a connection is made: a bad request costs nothing.
        operation.validate()?;
        let opened = target.open_raw(options)?;
        let epoch = Instant::now();
        let hello_timeout = opened.deadline.saturating_duration_since(epoch);
        let session = new_session(options, hello_timeout)?;
        let mut conn = Connection {
            shared: Arc::new(Shared {
                stream: opened.stream,
                state: Mutex::new(State {
                    session,
                    closed: false,
                    reader: None,
                    waiting: 0,
                }),
                credit_changed: Condvar::new(),
                writing: Mutex::new(()),
            }),
            recv: RecvBuf::new(match pool {
                Some(pool) => pool.take(),
                None => vec![0u8; RECV_BUFFER].into_boxed_slice(),
            }),
            pool: pool.cloned(),
            handed_out: 0,
            epoch,
            reader: None,
            idle: None,
            info: None,
        };
        // The agent speaks first: its hello carries the challenge our proof answers.
        let info = match conn.receive()? {
            Received::Hello(info) => info,
            other => return Err(out_of_order(&other, "instead of a hello")),
        };
        conn.info = Some(info.clone());
        let opening = Opening::encode(&mut conn.shared.lock().session, operation)?;
        let mut stream = &conn.shared.stream;
        let timed_write = !opened.timeouts_set && opening.bytes().len() > UNTIMED_OPENING;
        if timed_write {
            let left = opened
                .deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            stream.set_write_timeout(Some(left)).map_err(Error::Io)?;
        }
        stream.write_all(opening.bytes()).map_err(io_error)?;
        if operation == Operation::None && info.security == Security::Authenticated {
            // Nothing else would bring the agent's proof: wait for it here.
            match conn.receive()? {
                Received::Authenticated => {}
                other => return Err(out_of_order(&other, "instead of the agent's proof")),
            }
        }
        // Past the handshake an operation may run for as long as it likes.
        let stream = &conn.shared.stream;
        if opened.timeouts_set {
            stream.set_read_timeout(None).map_err(Error::Io)?;
        }
        if opened.timeouts_set || timed_write {
            stream.set_write_timeout(None).map_err(Error::Io)?;
        }
        Ok((conn, info))
    }

    /// Once this connection's operation ended cleanly, it waits in `pool` for the next one.
    pub fn keep_idle_in(&mut self, pool: &Arc<IdlePool>) {
        if pool.max > 0 {
            self.idle = Some(Arc::clone(pool));
        }
    }

    /// Waits for the first bytes of the agent's answer on a reused connection and takes them
    /// into the receive buffer (no `MSG_PEEK` and second read): `false` when the agent closed
    /// it instead (an EOF, a reset), before answering.
    fn answer_arrives(&mut self) -> Result<bool, Error> {
        let fd = self.shared.stream.as_fd();
        // An agent alive a moment ago answers at once; one that keeps silent this long is
        // frozen (as three missed keepalives say while an operation runs).
        let keepalive_ms = self
            .info
            .as_ref()
            .map_or(0, |info| info.limits.keepalive_ms);
        let keepalive = u64::from(keepalive_ms.max(1000));
        let bound = Duration::from_millis(keepalive.saturating_mul(3));
        if !crate::sys::wait_readable(fd, bound).map_err(Error::Io)? {
            return Err(Error::AgentSilent);
        }
        let spare = self
            .recv
            .spare_at_least(MAX_FRAME)
            .map_err(|err| session_error(err.into()))?;
        loop {
            match (&self.shared.stream).read(spare) {
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Ok(n @ 1..) => {
                    self.recv.commit(n);
                    return Ok(true);
                }
                Ok(0) | Err(_) => return Ok(false),
            }
        }
    }

    /// Whether the connection can carry another operation: its operation ended cleanly
    /// (the final frame read, nothing left unread behind it), the agent keeps it, and no stdin
    /// writer or controller still holds it (one could reach the next operation).
    fn reusable(&mut self) -> bool {
        Arc::strong_count(&self.shared) == 1
            && self.recv.data().len() == self.handed_out
            && self.shared.lock().session.is_reusable()
    }

    /// What the reader and a stdin writer share.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Notes that the calling thread reads this connection's events (see [`State::reader`]).
    pub fn note_reader(&mut self) {
        let id = thread::current().id();
        if self.reader != Some(id) {
            self.reader = Some(id);
            self.shared.lock().reader = Some(id);
        }
    }

    /// Output bytes a [`Received`] named; valid until the next receive.
    pub fn chunk(&self, range: Range<usize>) -> &[u8] {
        self.recv.data().get(range).unwrap_or_default()
    }

    /// Receives until the session reports something, reading from the socket when it needs
    /// more bytes (within the session's deadline while it has one).
    pub fn receive(&mut self) -> Result<Received, Error> {
        self.recv.consume(std::mem::take(&mut self.handed_out));
        loop {
            let mut state = self.shared.lock();
            let input = self.recv.data();
            // `_at`: hearing the agent moves its liveness deadline on.
            let taken = match state.session.handle_input_at(input, self.now()) {
                Ok(taken) => taken,
                Err(err) => {
                    self.shared.wake_writers(&state);
                    return Err(session_error(err));
                }
            };
            let Some(event) = taken.event else {
                // Read under this lock: `fill` needs no second one per read.
                let deadline = state.session.poll_timeout();
                drop(state);
                match taken.consumed {
                    0 => self.fill(deadline)?,
                    consumed => self.recv.consume(consumed),
                }
                continue;
            };
            let received = match event {
                ClientEvent::HelloAccepted(info) => Received::Hello(AgentInfo::from_wire(&info)),
                // An operation behind the proof reports its own first event.
                ClientEvent::Authenticated if state.session.phase() == Phase::Starting => {
                    drop(state);
                    self.recv.consume(taken.consumed);
                    continue;
                }
                ClientEvent::Authenticated => Received::Authenticated,
                ClientEvent::Done(report) => Received::Done(report.count),
                ClientEvent::Started { pid } => Received::Started(pid),
                ClientEvent::Stdout(data) => Received::Stdout(within(input, data)),
                ClientEvent::Stderr(data) => Received::Stderr(within(input, data)),
                ClientEvent::StdinCredit { .. } => Received::Credit,
                ClientEvent::OutputDropped(dropped) => Received::Dropped(dropped),
                // Bytes already here behind the last frame go to the session too (it refuses
                // them); nothing more is read for them.
                ClientEvent::Exited(end) => {
                    let rest = input.get(taken.consumed..).unwrap_or_default();
                    if let Err(err) = state.session.handle_input(rest) {
                        self.shared.wake_writers(&state);
                        return Err(session_error(err));
                    }
                    Received::Exited(Termination::from_wire(end))
                }
                ClientEvent::FileDone(summary) => {
                    let rest = input.get(taken.consumed..).unwrap_or_default();
                    if let Err(err) = state.session.handle_input(rest) {
                        self.shared.wake_writers(&state);
                        return Err(session_error(err));
                    }
                    Received::FileDone(summary)
                }
                ClientEvent::FileReady(header) => Received::FileReady(header),
                ClientEvent::FileData(data) => Received::FileData(within(input, data)),
                ClientEvent::Skipped(skipped) => {
                    Received::Skipped(SkippedEntry::from_wire(&skipped))
                }
                ClientEvent::Refused(err) => {
                    self.shared.wake_writers(&state);
                    // Consumed: a refusal that leaves the connection reusable leaves nothing
                    // unread in it.
                    self.handed_out = taken.consumed;
                    return Err(refused(&err));
                }
                ClientEvent::SystemInfo(info) => {
                    Received::System(crate::system::System::from_wire(&info))
                }
                ClientEvent::Mount(mount) => {
                    Received::Mount(crate::system::Mount::from_wire(&mount))
                }
                ClientEvent::Interface(interface) => {
                    Received::Interface(crate::system::Interface::from_wire(&interface))
                }
                ClientEvent::ClockSet(previous) => Received::ClockSet(previous),
                ClientEvent::Detached(job) => Received::Detached(job),
                ClientEvent::Job(job) => {
                    Received::Job(Box::new(crate::job_record::JobInfo::from_wire(&job)))
                }
                ClientEvent::Attached(header) => Received::Attached(header),
            };
            if matches!(
                received,
                Received::Credit | Received::Exited(_) | Received::FileDone(_)
            ) {
                self.shared.wake_writers(&state);
            }
            self.handed_out = taken.consumed;
            return Ok(received);
        }
    }

    /// Reads more bytes into the receive buffer, by the session's `deadline` if it has one; the
    /// session decides what an end of stream or a passed deadline means.
    fn fill(&mut self, deadline: Option<Micros>) -> Result<(), Error> {
        loop {
            if let Some(deadline) = deadline {
                let left = Duration::from_micros(deadline.saturating_sub(self.now()));
                let fd = self.shared.stream.as_fd();
                // NOTE: polled even when the deadline has passed: a caller that did not read for
                // a while (a slow consumer) finds the agent's bytes waiting, and those are not
                // silence.
                if !crate::sys::wait_readable(fd, left).map_err(Error::Io)? {
                    let mut state = self.shared.lock();
                    if let Err(err) = state.session.handle_timeout(self.now()) {
                        self.shared.wake_writers(&state);
                        return Err(session_error(err));
                    }
                    // Woken a little early: wait out the rest (the deadline stands until input
                    // comes).
                    continue;
                }
            }
            // Room for the largest frame on every read, so none is cut short by the buffer's end.
            let spare = self
                .recv
                .spare_at_least(MAX_FRAME)
                .map_err(|err| session_error(err.into()))?;
            let n = match (&self.shared.stream).read(spare) {
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(io_error(err)),
            };
            if n > 0 {
                self.recv.commit(n);
                return Ok(());
            }
            let mut state = self.shared.lock();
            let phase = state.session.phase();
            let ended = state.session.handle_eof(self.recv.data().len());
            self.shared.wake_writers(&state);
            return Err(match ended {
                Err(err) => session_error(err),
                // A clean end where this library still expected an event.
                Ok(()) => Error::Disconnected(phase.as_str()),
            });
        }
    }

    fn now(&self) -> Micros {
        micros(self.epoch.elapsed())
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let (Some(pool), Some(info)) = (self.idle.take(), self.info.take()) {
            if self.reusable() {
                let mut recv = std::mem::replace(&mut self.recv, RecvBuf::new(Box::default()));
                recv.consume(std::mem::take(&mut self.handed_out));
                pool.keep(Idle {
                    shared: Arc::clone(&self.shared),
                    recv,
                    info,
                    epoch: self.epoch,
                    since: Instant::now(),
                });
                return;
            }
        }
        self.shared.close();
        if let Some(pool) = self.pool.take() {
            let recv = std::mem::replace(&mut self.recv, RecvBuf::new(Box::default()));
            pool.give(recv.into_inner());
        }
    }
}

/// An opening larger than this may not fit an empty socket buffer, so its write gets a deadline;
/// anything smaller cannot block on a fresh connection.
const UNTIMED_OPENING: usize = 16 * 1024;

/// What a connection carries behind the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operation<'r, 'a> {
    /// Nothing: a health check.
    None,
    /// Run a command.
    Exec(&'r ExecRequest<'a>),
    /// End every command the agent runs.
    KillAll,
    /// Write a file or unpack a tree.
    Put(&'r PutRequest<'a>),
    /// Read a file or a tree.
    Get(&'r GetRequest<'a>),
    /// Describe the guest.
    Info,
    /// Power off or reboot.
    Shutdown(ferry_wire::ShutdownRequest),
    /// Set the guest's clock: to the host's, read as late as possible (when the opening is
    /// encoded, right after the agent's hello); the time sent is left in the cell.
    TimeSync(&'r std::sync::OnceLock<ferry_wire::Timestamp>),
    /// Feed the guest's entropy pool.
    Reseed(&'r [u8]),
    /// Run a command as a detached job, optionally named.
    StartJob(Option<&'r [u8]>, &'r ExecRequest<'a>),
    /// List the jobs.
    Jobs(ferry_wire::JobQuery<'a>),
    /// Follow a job's output.
    Attach(ferry_wire::AttachRequest<'a>),
    /// Wait for a job's end.
    Wait(ferry_wire::JobRequest<'a>),
    /// Signal a job's tree.
    Kill(ferry_wire::KillJob<'a>),
    /// Forget an ended job.
    Remove(ferry_wire::JobRequest<'a>),
}

impl Operation<'_, '_> {
    /// Checks the request against the protocol's own limits (the agent's may be tighter: the
    /// session checks those once its hello is in).
    pub fn validate(self) -> Result<(), Error> {
        let checked = match self {
            Operation::Exec(request) => request.validate().map(|_| ()),
            Operation::Put(request) => request.validate_within(&Limits::CURRENT),
            Operation::Get(request) => request.validate_within(&Limits::CURRENT),
            Operation::StartJob(name, request) => ferry_wire::JobStart {
                name: name.map(ferry_wire::Bytes),
            }
            .validate()
            .and_then(|()| request.validate().map(|_| ())),
            Operation::Jobs(query) => query.validate_within(&Limits::CURRENT),
            Operation::Attach(request) => request.validate_within(&Limits::CURRENT),
            Operation::Wait(request) | Operation::Remove(request) => {
                request.validate_within(&Limits::CURRENT)
            }
            Operation::Kill(request) => request.validate_within(&Limits::CURRENT),
            Operation::None
            | Operation::KillAll
            | Operation::Info
            | Operation::Shutdown(_)
            | Operation::TimeSync(_)
            | Operation::Reseed(_) => Ok(()),
        };
        checked.map_err(|err| Error::InvalidRequest(err.message.into()))
    }

    /// Asks `session` to encode the operation (behind our pending hello and proof) into `out`.
    pub fn start(self, session: &mut ClientSession, out: &mut [u8]) -> Result<usize, SessionError> {
        match self {
            Operation::Exec(request) => session.start_exec(request, out),
            Operation::KillAll => session.start_kill_all(out),
            Operation::Put(request) => session.start_put(request, out),
            Operation::Get(request) => session.start_get(request, out),
            Operation::Info => session.start_info(out),
            Operation::Shutdown(request) => session.start_shutdown(request, out),
            Operation::TimeSync(sent) => {
                let now = crate::system::realtime_now();
                let _ = sent.set(now);
                session.start_time_sync(now, out)
            }
            Operation::Reseed(random) => session.start_reseed(random, out),
            Operation::StartJob(name, request) => session.start_job(name, request, out),
            Operation::Jobs(query) => session.start_jobs(&query, out),
            Operation::Attach(request) => session.start_attach(&request, out),
            Operation::Wait(request) => session.start_wait(&request, out),
            Operation::Kill(request) => session.start_kill(&request, out),
            Operation::Remove(request) => session.start_remove(&request, out),
            Operation::None => session.poll_transmit(out),
        }
    }
}

/// The bytes a connection opens with: our hello and proof, and the request behind them.
pub(crate) struct Opening {
    small: [u8; 2048],
    large: Vec<u8>,
    len: usize,
}

impl Opening {
    /// Asks the session for the opening. Most requests are a few hundred bytes: encoded on the
    /// stack, with a heap buffer sized for the largest frames only when one does not fit.
    pub fn encode(
        session: &mut ClientSession,
        operation: Operation<'_, '_>,
    ) -> Result<Opening, Error> {
        let mut opening = Opening {
            small: [0u8; 2048],
            large: Vec::new(),
            len: 0,
        };
        let encode = |session: &mut ClientSession, out: &mut [u8]| operation.start(session, out);
        opening.len = match encode(session, &mut opening.small) {
            Err(SessionError::BufferTooSmall) => {
                opening.large.resize(large_opening_len(operation), 0);
                encode(session, &mut opening.large)
            }
            other => other,
        }
        .map_err(session_error)?;
        Ok(opening)
    }

    pub fn bytes(&self) -> &[u8] {
        let buf = if self.large.is_empty() {
            &self.small[..]
        } else {
            &self.large[..]
        };
        buf.get(..self.len).unwrap_or_default()
    }
}

/// Room for an opening that did not fit the small buffer: an exec's pieces (argv and environment
/// beyond one frame) and its frame, or the largest frame.
pub(crate) fn large_opening_len(operation: Operation<'_, '_>) -> usize {
    match operation {
        Operation::Exec(request) => ClientSession::exec_buffer_len(request),
        _ => 2 * MAX_FRAME,
    }
}

/// Where `part` (a slice the session cut from `whole`) lies in `whole`.
pub(crate) fn within(whole: &[u8], part: &[u8]) -> Range<usize> {
    let start = (part.as_ptr() as usize).wrapping_sub(whole.as_ptr() as usize);
    start..start + part.len()
}

/// A duration on the session's clock.
pub(crate) fn micros(duration: Duration) -> Micros {
    duration.as_micros().try_into().unwrap_or(Micros::MAX)
}

/// The library's error for what the session refused.
pub(crate) fn session_error(err: SessionError) -> Error {
    match err {
        SessionError::Malformed => Error::Protocol("undecodable frame from the agent".into()),
        SessionError::FrameTooLarge { declared } => Error::Protocol(format!(
            "the agent sent a frame of {declared} bytes, above the protocol's limit"
        )),
        SessionError::Unexpected { frame, phase } => {
            Error::Protocol(format!("the agent sent {frame} {phase}"))
        }
        SessionError::NotFerry => Error::Protocol("the peer is not a ferry agent".into()),
        SessionError::UnsupportedVersion { chosen } => Error::UnsupportedVersion {
            min: MIN_PROTOCOL_VERSION,
            max: PROTOCOL_VERSION,
            message: format!("the agent chose version {chosen}"),
        },
        SessionError::CreditExceeded => {
            Error::Protocol("the agent returned more stdin credit than was in flight".into())
        }
        SessionError::Disconnected {
            mid_frame: false,
            phase,
        } => Error::Disconnected(phase.as_str()),
        SessionError::Disconnected {
            mid_frame: true,
            phase,
        } => Error::Protocol(format!("the agent closed the connection mid-frame {phase}")),
        SessionError::TimedOut { .. } => io_error(io::Error::from(io::ErrorKind::TimedOut)),
        SessionError::AgentSilent => Error::AgentSilent,
        SessionError::InvalidRequest { message } => Error::InvalidRequest(message.into()),
        SessionError::Unauthenticated => Error::Unauthenticated(
            "the agent could not prove that it holds the secret: it is not the agent it claims \
             to be, or the secrets differ"
                .into(),
        ),
        SessionError::SecretRequired => Error::SecretRequired,
        SessionError::AgentInsecure => Error::AgentInsecure,
        err @ (SessionError::InvalidState | SessionError::BufferTooSmall) => {
            Error::Protocol(format!("the library misused its session: {err}"))
        }
    }
}

/// The library's error for an error frame: a version refusal or the agent's failure.
pub(crate) fn refused(err: &ErrorFrame<'_>) -> Error {
    if err.code == ErrorCode::Unauthenticated {
        return Error::Unauthenticated(
            "the agent refused our proof: the secret is not this agent's".into(),
        );
    }
    if ClientSession::is_version_refusal(err) {
        return Error::UnsupportedVersion {
            min: MIN_PROTOCOL_VERSION,
            max: PROTOCOL_VERSION,
            message: err.message.to_owned(),
        };
    }
    Error::Remote(RemoteError {
        code: err.code,
        errno: (err.errno != 0).then_some(err.errno),
        message: err.message.to_owned(),
    })
}

/// A [`Received`] the session delivered where this library's calls cannot be: a bug here.
pub(crate) fn out_of_order(received: &Received, context: &str) -> Error {
    Error::Protocol(format!("internal: {received:?} {context}"))
}

/// A stdin write the session refused: the command's stdin is closed or the operation is over.
fn stdin_error(err: SessionError) -> io::Error {
    match err {
        SessionError::InvalidState => broken_pipe(),
        other => io::Error::other(other.to_string()),
    }
}

pub(crate) fn broken_pipe() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "the remote command has ended; its stdin is closed",
    )
}

fn io_error(err: io::Error) -> Error {
    if is_timeout(&err) {
        Error::Io(io::Error::new(
            io::ErrorKind::TimedOut,
            "the agent did not answer in time",
        ))
    } else {
        Error::Io(err)
    }
}

/// Opens a connection, measuring how long the hello round trip took.
pub(crate) fn open_timed(
    target: &Target,
    options: &ConnectOptions,
    pool: Option<&Arc<BufferPool>>,
) -> Result<(Connection, AgentInfo, Duration), Error> {
    let started = Instant::now();
    let (conn, info) = Connection::open(target, options, pool)?;
    Ok((conn, info, started.elapsed()))
}
