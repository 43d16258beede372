//! The connection's socket and its two buffers: client frames in, through a `RecvBuf` over the
//! static receive buffer, and one frame at a time out. Bytes only: what they mean is the
//! session's business.

use ferry_wire::limits::MAX_DATA;
use ferry_wire::session::{AgentSession, Micros, Refusal, SessionError};
use ferry_wire::{DataKind, ErrorCode, RecvBuf, DATA_HEADROOM};
use rustix::event::{poll, PollFd, PollFlags};
use rustix::fd::BorrowedFd;
use rustix::io::Errno;
use rustix::net::{RecvFlags, SendFlags};

use crate::clock;

/// The socket, what came from the client, and what goes to it.
pub struct Link<'s, 'b> {
    pub sock: BorrowedFd<'s>,
    /// Client frames, cut in place by the session.
    pub inbox: RecvBuf<&'b mut [u8]>,
    pub outbox: Outbox<'b>,
}

/// What a receive that does not block found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// Bytes arrived.
    Data,
    /// Nothing for now.
    Nothing,
    /// The client closed the connection, or it broke.
    Closed,
}

impl<'s, 'b> Link<'s, 'b> {
    pub fn new(sock: BorrowedFd<'s>, recv: &'b mut [u8], out: &'b mut [u8]) -> Self {
        Link {
            sock,
            inbox: RecvBuf::new(recv),
            outbox: Outbox::new(out),
        }
    }

    /// Receives what the socket has, without blocking.
    pub fn receive(&mut self) -> Received {
        // The session cuts every whole frame off before the next receive and refuses a header
        // larger than the buffer, so there is always room; were there none, the stream could
        // not go on.
        let Ok(spare) = self.inbox.spare() else {
            return Received::Closed;
        };
        match rustix::net::recv(self.sock, spare, RecvFlags::DONTWAIT) {
            Ok((0, _)) => Received::Closed,
            Ok((n, _)) => {
                self.inbox.commit(n);
                Received::Data
            }
            Err(Errno::AGAIN | Errno::INTR) => Received::Nothing,
            Err(_) => Received::Closed,
        }
    }

    /// Whether the client still takes what we send, after the end of its stream: a
    /// zero-length send fails (EPIPE, ENOTCONN) once it closed, and succeeds after a mere
    /// `shutdown(SHUT_WR)`. Poll cannot tell the two apart on vsock, which never reports
    /// POLLHUP for a peer's close (and `vhost-device-vsock` turns any end of the host's stream
    /// into a full shutdown).
    pub fn peer_receives(&self) -> bool {
        let flags = SendFlags::DONTWAIT | SendFlags::NOSIGNAL;
        rustix::net::send(self.sock, &[], flags).is_ok()
    }

    /// Sends what the outbox holds, as far as the socket takes it without blocking.
    pub fn flush(&mut self) -> Result<(), Errno> {
        self.outbox.flush(self.sock)
    }

    /// Blocks until the socket is ready for `flags` (or has hung up), a signal arrives, or
    /// `deadline` passes.
    pub fn wait(&self, flags: PollFlags, deadline: Option<Micros>) -> Result<(), Errno> {
        wait(self.sock, flags, deadline)
    }
}

/// Blocks until `sock` is ready for `flags` (or has hung up), a signal arrives, or `deadline`
/// passes.
fn wait(sock: BorrowedFd<'_>, flags: PollFlags, deadline: Option<Micros>) -> Result<(), Errno> {
    let mut fds = [PollFd::from_borrowed_fd(sock, flags)];
    let timeout = deadline.map(clock::timeout_until);
    match poll(&mut fds, timeout.as_ref()) {
        Ok(_) | Err(Errno::INTR) => Ok(()),
        Err(errno) => Err(errno),
    }
}

/// The one frame in flight; output is read straight into it behind room for its header.
pub struct Outbox<'b> {
    buf: &'b mut [u8],
    start: usize,
    end: usize,
}

/// Reads what `pipe` has into `buf`, without blocking.
pub fn read_pipe(pipe: BorrowedFd<'_>, buf: &mut [u8]) -> Output {
    let len = buf.len();
    loop {
        match rustix::io::read(pipe, &mut *buf) {
            // EIO: a terminal's master once no process holds its slave (a pipe never reports
            // it). An empty buffer reads nothing: never asked for.
            Ok(0) | Err(Errno::IO) => return Output::Eof,
            Ok(n) => return Output::Read(n.min(len)),
            Err(Errno::INTR) => {}
            Err(Errno::AGAIN) => return Output::Empty,
            Err(_) => return Output::Failed,
        }
    }
}

/// What reading a pipe gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// This many output bytes were read (into the outbox: a data frame of them is ready to
    /// send).
    Read(usize),
    /// The pipe is at EOF.
    Eof,
    /// The pipe is empty for now.
    Empty,
    /// The pipe failed (what it held is lost).
    Failed,
}

impl<'b> Outbox<'b> {
    pub fn new(buf: &'b mut [u8]) -> Self {
        Outbox {
            buf,
            start: 0,
            end: 0,
        }
    }

    /// Whether everything was sent.
    pub fn is_empty(&self) -> bool {
        self.start >= self.end
    }

    /// Whether there is something to send: what is still unsent, else the control frames the
    /// session has queued (in its order), taken now.
    pub fn refill(&mut self, session: &mut AgentSession) -> bool {
        if !self.is_empty() {
            return true;
        }
        // An error leaves the frame queued: it cannot fit this buffer, which holds any control
        // frame many times over.
        let n = session.poll_transmit(self.buf).unwrap_or(0);
        self.start = 0;
        self.end = n.min(self.buf.len());
        n > 0
    }

    /// Reads up to one chunk of `kind` output from `pipe` into the empty outbox, at most
    /// `at_most` bytes (at least 1: the head left, the policy's output limit), and has the
    /// session frame it in place.
    pub fn read_output(
        &mut self,
        pipe: BorrowedFd<'_>,
        kind: DataKind,
        session: &mut AgentSession,
        at_most: usize,
    ) -> Output {
        let len = at_most.clamp(1, MAX_DATA);
        let Some(space) = self.buf.get_mut(DATA_HEADROOM..DATA_HEADROOM + len) else {
            return Output::Failed;
        };
        match read_pipe(pipe, space) {
            Output::Read(n) => self.frame(kind, session, n),
            other => other,
        }
    }

    /// Has `fill` copy up to one chunk of `kind` output into the empty outbox (a stream's kept
    /// tail), and the session frame it in place. `Empty` when `fill` had nothing.
    pub fn copy_output(
        &mut self,
        kind: DataKind,
        session: &mut AgentSession,
        fill: impl FnOnce(&mut [u8]) -> usize,
    ) -> Output {
        let Some(space) = self.buf.get_mut(DATA_HEADROOM..DATA_HEADROOM + MAX_DATA) else {
            return Output::Failed;
        };
        match fill(space).min(MAX_DATA) {
            0 => Output::Empty,
            n => self.frame(kind, session, n),
        }
    }

    /// Frames the `n` output bytes at `DATA_HEADROOM`, stamped now.
    fn frame(&mut self, kind: DataKind, session: &mut AgentSession, n: usize) -> Output {
        match session.frame_output(self.buf, kind, n, crate::clock::monotonic_us()) {
            Ok(start) => {
                self.start = start;
                self.end = DATA_HEADROOM + n;
                Output::Read(n)
            }
            Err(_) => Output::Failed,
        }
    }

    /// Has `fill` read up to one chunk of a get's content into the empty outbox, and the
    /// session frame it in place; the bytes read (0: nothing, nothing framed).
    pub fn file_data(
        &mut self,
        session: &mut AgentSession,
        fill: impl FnOnce(&mut [u8]) -> Result<usize, Refusal>,
    ) -> Result<usize, Refusal> {
        let internal = Refusal::new(ErrorCode::Internal, "cannot frame the content");
        let space = self.buf.get_mut(DATA_HEADROOM..DATA_HEADROOM + MAX_DATA);
        let n = fill(space.ok_or(internal)?)?.min(MAX_DATA);
        if n > 0 {
            self.start = session.frame_file_data(self.buf, n).map_err(|_| internal)?;
            self.end = DATA_HEADROOM + n;
        }
        Ok(n)
    }

    /// Puts the frame `encode` writes into the outbox once what it holds was sent, waiting
    /// until `deadline` for `sock` to take it; `false` when it does not (the client is gone or
    /// stopped reading).
    pub fn put_when_sent(
        &mut self,
        sock: BorrowedFd<'_>,
        deadline: Micros,
        encode: impl FnOnce(&mut [u8]) -> Result<usize, SessionError>,
    ) -> bool {
        loop {
            if self.flush(sock).is_err() {
                return false;
            }
            if self.is_empty() {
                self.put(encode);
                return true;
            }
            if clock::monotonic_us() >= deadline
                || wait(sock, PollFlags::OUT, Some(deadline)).is_err()
            {
                return false;
            }
        }
    }

    /// The bytes still to send.
    pub fn pending(&self) -> usize {
        self.end.saturating_sub(self.start)
    }

    /// Puts the frame `encode` writes into the empty outbox; whether it did.
    pub fn put(&mut self, encode: impl FnOnce(&mut [u8]) -> Result<usize, SessionError>) -> bool {
        match encode(self.buf) {
            Ok(n @ 1..) => {
                self.start = 0;
                self.end = n.min(self.buf.len());
                true
            }
            _ => false,
        }
    }

    /// Sends what it can without blocking.
    fn flush(&mut self, sock: BorrowedFd<'_>) -> Result<(), Errno> {
        while let Some(pending @ [_, ..]) = self.buf.get(self.start..self.end) {
            let flags = SendFlags::DONTWAIT | SendFlags::NOSIGNAL;
            match rustix::net::send(sock, pending, flags) {
                Ok(n) => self.start += n.min(pending.len()),
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => return Ok(()),
                Err(errno) => return Err(errno),
            }
        }
        self.start = 0;
        self.end = 0;
        Ok(())
    }
}
