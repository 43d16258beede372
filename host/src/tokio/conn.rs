//! The connection an execution and its stdin writer share: the socket, the protocol session, and
//! the frame on its way out. The execution alone reads; either side may write.
//!
//! Every protocol decision is [`ClientSession`]'s. What lives here is plumbing: a lock around
//! the session (the writer spends credit, the reader receives it), the unsent bytes of the last
//! frame, and who to wake when the socket takes bytes again or when credit comes back.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};

use ::tokio::net::UnixStream;
use ::tokio::time::Instant;
use ferry_wire::session::{ClientSession, Micros, Phase, SessionError};

use crate::conn::{large_opening_len, micros};
pub(super) use crate::conn::{session_error, Operation};
use crate::Error;

/// The room first offered to an opening: most are a few hundred bytes.
const SMALL_OPENING: usize = 2048;

/// One connection to the agent, shared by an [`super::Execution`] and its
/// [`super::StdinWriter`].
pub(super) struct Conn {
    pub(super) stream: UnixStream,
    state: Mutex<State>,
    /// The waker handed to the socket's write readiness: it wakes whichever sides are waiting
    /// for the socket to take bytes (tokio keeps one waker per direction and socket).
    write_wakers: Arc<WriteWakers>,
    /// The origin of the session's clock.
    epoch: Instant,
}

/// What the lock protects.
pub(super) struct State {
    pub(super) session: ClientSession,
    /// Encoded frames; `out[sent..]` is not yet taken by the socket. At most one frame beyond
    /// the opening: nothing is encoded while bytes wait.
    out: Vec<u8>,
    sent: usize,
    /// A stdin writer waiting for credit.
    credit_waker: Option<Waker>,
    /// The reader's task, to be woken when a writer leaves bytes it cannot send itself.
    reader_waker: Option<Waker>,
    /// The operation is over (it ended, failed, or its execution was dropped).
    pub(super) ended: bool,
}

/// The sides that may wait for the socket to become writable.
#[derive(Debug, Clone, Copy)]
pub(super) enum Side {
    Reader = 0,
    Writer = 1,
    /// A [`super::Controller`] (signal, resize, cancel).
    Control = 2,
}

#[derive(Default)]
struct WriteWakers(Mutex<[Option<Waker>; 3]>);

impl WriteWakers {
    fn register(&self, side: Side, waker: &Waker) {
        let mut slots = self.0.lock().unwrap_or_else(|poison| poison.into_inner());
        match &mut slots[side as usize] {
            Some(old) if old.will_wake(waker) => {}
            slot => *slot = Some(waker.clone()),
        }
    }
}

impl Wake for WriteWakers {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let taken = {
            let mut slots = self.0.lock().unwrap_or_else(|poison| poison.into_inner());
            std::mem::take(&mut *slots)
        };
        for waker in taken.into_iter().flatten() {
            waker.wake();
        }
    }
}

impl Conn {
    /// A connection over `stream`: `session` awaits the agent's hello, on a clock that started
    /// at `epoch` (before the connect, so the handshake's deadline covers it too).
    pub(super) fn new(stream: UnixStream, session: ClientSession, epoch: Instant) -> Conn {
        Conn {
            stream,
            state: Mutex::new(State {
                session,
                out: Vec::new(),
                sent: 0,
                credit_waker: None,
                reader_waker: None,
                ended: false,
            }),
            write_wakers: Arc::default(),
            epoch,
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // Every update under this lock is a few plain stores: a panic cannot leave it torn.
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// The session's clock.
    pub(super) fn now(&self) -> Micros {
        micros(self.epoch.elapsed())
    }

    /// The point on tokio's clock that a session deadline names.
    pub(super) fn instant(&self, at: Micros) -> Instant {
        self.epoch + std::time::Duration::from_micros(at)
    }

    /// Ends the connection in both directions: the agent sees a disconnect at once (and kills
    /// the command's tree), even while a stdin writer still holds the socket.
    pub(super) fn shutdown(&self) {
        let _ = socket2::SockRef::from(&self.stream).shutdown(std::net::Shutdown::Both);
    }
}

impl State {
    /// Lets `encode` write into up to `room` bytes at the end of the queue; keeps what it wrote.
    pub(super) fn queue<T>(
        &mut self,
        room: usize,
        encode: impl FnOnce(&mut ClientSession, &mut [u8]) -> Result<(T, usize), SessionError>,
    ) -> Result<T, SessionError> {
        let start = self.out.len();
        self.out.resize(start + room, 0);
        let result = encode(&mut self.session, &mut self.out[start..]);
        let written = result.as_ref().map_or(0, |(_, written)| *written);
        self.out.truncate(start + written);
        result.map(|(value, _)| value)
    }

    /// Queues the opening, once the agent's hello is in: our hello and proof, and `operation`
    /// behind them (one write, no extra round trip). Encoded as the blocking driver does: a
    /// small buffer first, one sized for the largest frames only when that does not fit.
    pub(super) fn queue_opening(&mut self, operation: Operation<'_, '_>) -> Result<(), Error> {
        let encode = |session: &mut ClientSession, out: &mut [u8]| {
            operation.start(session, out).map(|n| ((), n))
        };
        match self.queue(SMALL_OPENING, encode) {
            Err(SessionError::BufferTooSmall) => self.queue(large_opening_len(operation), encode),
            other => other,
        }
        .map_err(session_error)
    }

    /// Whether bytes wait to be sent.
    pub(super) fn has_unsent(&self) -> bool {
        self.sent < self.out.len()
    }

    /// Marks the operation over and wakes a writer waiting for credit (it then fails with
    /// `BrokenPipe`).
    pub(super) fn end(&mut self) {
        self.ended = true;
        if let Some(waker) = self.credit_waker.take() {
            waker.wake();
        }
    }

    /// Parks a writer until the reader receives credit.
    pub(super) fn wait_for_credit(&mut self, waker: &Waker) {
        match &self.credit_waker {
            Some(old) if old.will_wake(waker) => {}
            _ => self.credit_waker = Some(waker.clone()),
        }
    }

    /// Credit arrived: wake the writer.
    pub(super) fn credit_granted(&mut self) {
        if let Some(waker) = self.credit_waker.take() {
            waker.wake();
        }
    }

    /// Remembers the reader's task (see [`State::hand_to_reader`]).
    pub(super) fn set_reader(&mut self, waker: &Waker) {
        match &self.reader_waker {
            Some(old) if old.will_wake(waker) => {}
            _ => self.reader_waker = Some(waker.clone()),
        }
    }

    /// A writer left bytes the socket would not take yet and may not come back for them (it
    /// returned, or was dropped): the reader, which polls anyway, sends them.
    pub(super) fn hand_to_reader(&mut self) {
        if self.has_unsent() {
            if let Some(waker) = &self.reader_waker {
                waker.wake_by_ref();
            }
        }
    }

    /// Sends what is queued. `Pending` registers `cx` (as `side`) for the socket's write
    /// readiness. On an error the queue is dropped: the connection is broken, and the reader
    /// learns how it ended.
    pub(super) fn poll_send(
        &mut self,
        conn: &Conn,
        side: Side,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.has_unsent() {
            return Poll::Ready(Ok(()));
        }
        conn.write_wakers.register(side, cx.waker());
        let waker = Waker::from(Arc::clone(&conn.write_wakers));
        let mut shared_cx = Context::from_waker(&waker);
        while self.sent < self.out.len() {
            match conn.stream.poll_write_ready(&mut shared_cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(err)) => return Poll::Ready(Err(self.drop_unsent(err))),
                Poll::Ready(Ok(())) => {}
            }
            match conn.stream.try_write(&self.out[self.sent..]) {
                Ok(n) => self.sent += n,
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(err) => return Poll::Ready(Err(self.drop_unsent(err))),
            }
        }
        self.out.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    fn drop_unsent(&mut self, err: io::Error) -> io::Error {
        self.out.clear();
        self.sent = 0;
        err
    }
}

/// The agent's refusal (an error frame) as the library's error: the blocking driver's mapping.
pub(super) use crate::conn::refused as refusal;

/// A disconnect the session took as a clean end where this driver expected more.
pub(super) fn disconnected(phase: Phase) -> Error {
    Error::Disconnected(phase.as_str())
}
