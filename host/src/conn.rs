//! One framed connection to the agent: the hello, then whole frames in and out.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_wire::limits::{MAX_FRAME, MAX_FRAME_BODY};
use ferry_wire::{
    decode_agent_frame, encode_client_frame, split_frame, AgentFrame, ClientFrame, ClientHello,
    EncodeError, ErrorCode, Limits, MAGIC, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

use crate::error::{Error, RemoteError};
use crate::target::{is_timeout, ConnectOptions, Target};

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
}

/// Receive buffers kept between one client's connections (clones included): a fresh buffer
/// costs an mmap, page faults and an munmap per operation.
#[derive(Default)]
pub(crate) struct BufferPool(Mutex<Vec<Box<[u8]>>>);

/// Buffers a pool keeps: enough for a few operations running side by side.
const POOLED_BUFFERS: usize = 4;

impl BufferPool {
    fn take(&self) -> Box<[u8]> {
        let pooled = self.0.lock().ok().and_then(|mut buffers| buffers.pop());
        pooled.unwrap_or_else(|| vec![0u8; RECV_BUFFER].into_boxed_slice())
    }

    fn give(&self, buffer: Box<[u8]>) {
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

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.give(std::mem::take(&mut self.recv));
        }
    }
}

/// An opening larger than this may not fit an empty socket buffer, so its write gets a deadline;
/// anything smaller cannot block on a fresh connection.
const UNTIMED_OPENING: usize = 16 * 1024;

/// The hello, and the request behind it if there is one, encoded back to back into `buf`.
fn encode_opening(request: Option<&ClientFrame<'_>>, buf: &mut [u8]) -> Result<usize, EncodeError> {
    let mut len = encode_client_frame(&ClientFrame::Hello(ClientHello::CURRENT), buf)?;
    if let Some(request) = request {
        len += encode_client_frame(request, &mut buf[len..])?;
    }
    Ok(len)
}

/// A connection past its hello.
pub(crate) struct Connection {
    stream: UnixStream,
    recv: Box<[u8]>,
    /// Where `recv` goes back to when the connection ends.
    pool: Option<Arc<BufferPool>>,
    /// Until the hello has arrived: when to give up waiting for the agent.
    hello_deadline: Option<Instant>,
    /// Unread bytes are `recv[start..end]`.
    start: usize,
    end: usize,
    /// Bytes of the frame last returned by [`Connection::recv`], released on the next call.
    returned: usize,
}

impl Connection {
    /// Connects and exchanges hellos, all within `options.connect_timeout`.
    pub fn open(
        target: &Target,
        options: &ConnectOptions,
        pool: Option<&Arc<BufferPool>>,
    ) -> Result<(Connection, AgentInfo), Error> {
        Connection::open_with(target, options, pool, None)
    }

    /// Like [`Connection::open`], with `request` sent right behind the hello in the same write:
    /// the agent reads frames in order, so the request costs no extra round trip. Sound while
    /// this library speaks a single protocol version (the request's encoding cannot depend on
    /// the outcome of the negotiation).
    pub fn open_with(
        target: &Target,
        options: &ConnectOptions,
        pool: Option<&Arc<BufferPool>>,
        request: Option<&ClientFrame<'_>>,
    ) -> Result<(Connection, AgentInfo), Error> {
        const _: () = assert!(MIN_PROTOCOL_VERSION == PROTOCOL_VERSION);
        let opened = target.open_raw(options)?;
        let mut conn = Connection {
            stream: opened.stream,
            recv: match pool {
                Some(pool) => pool.take(),
                None => vec![0u8; RECV_BUFFER].into_boxed_slice(),
            },
            pool: pool.cloned(),
            hello_deadline: Some(opened.deadline),
            start: 0,
            end: 0,
            returned: 0,
        };
        // Most requests are a few hundred bytes: encode on the stack, and size a heap buffer for
        // the largest frame only when one does not fit.
        let mut small = [0u8; 2048];
        let mut large = Vec::new();
        let len = match encode_opening(request, &mut small) {
            Err(EncodeError::BufferTooSmall) => {
                large.resize(2 * MAX_FRAME, 0);
                encode_opening(request, &mut large)
            }
            other => other,
        }
        .map_err(|err| Error::InvalidRequest(err.to_string()))?;
        let opening = if large.is_empty() {
            &small[..len]
        } else {
            &large[..len]
        };
        let timed_write = !opened.timeouts_set && opening.len() > UNTIMED_OPENING;
        if timed_write {
            let left = opened
                .deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            conn.stream
                .set_write_timeout(Some(left))
                .map_err(Error::Io)?;
        }
        conn.stream.write_all(opening).map_err(io_error)?;
        let info = match conn.recv("during the hello")? {
            AgentFrame::Hello(hello) => {
                if hello.magic != MAGIC {
                    return Err(Error::Protocol("the peer is not a ferry agent".into()));
                }
                if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&hello.version) {
                    return Err(Error::UnsupportedVersion {
                        min: MIN_PROTOCOL_VERSION,
                        max: PROTOCOL_VERSION,
                        message: format!("the agent chose version {}", hello.version),
                    });
                }
                AgentInfo {
                    protocol_version: hello.version,
                    agent_version: hello.agent_version.to_owned(),
                    limits: hello.limits,
                }
            }
            AgentFrame::Error(err) if err.code == ErrorCode::UnsupportedVersion => {
                return Err(Error::UnsupportedVersion {
                    min: MIN_PROTOCOL_VERSION,
                    max: PROTOCOL_VERSION,
                    message: err.message.to_owned(),
                })
            }
            AgentFrame::Error(err) => return Err(remote(&err)),
            other => return Err(unexpected(&other, "instead of a hello")),
        };
        // Past the hello an operation may run for as long as it likes.
        conn.hello_deadline = None;
        if opened.timeouts_set {
            conn.stream.set_read_timeout(None).map_err(Error::Io)?;
        }
        if opened.timeouts_set || timed_write {
            conn.stream.set_write_timeout(None).map_err(Error::Io)?;
        }
        Ok((conn, info))
    }

    /// Receives the next whole frame; it borrows the receive buffer until the next call.
    /// `during` names the phase for the error when the agent hangs up.
    pub fn recv(&mut self, during: &'static str) -> Result<AgentFrame<'_>, Error> {
        self.start += std::mem::take(&mut self.returned);
        let frame_len = loop {
            match split_frame(&self.recv[self.start..self.end], MAX_FRAME_BODY) {
                Ok(Some((_, frame_len))) => break frame_len,
                Ok(None) => {}
                Err(err) => return Err(Error::Protocol(format!("the agent sent a {err}"))),
            }
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            } else if self.recv.len() - self.start < MAX_FRAME {
                // Not enough room behind a partial frame for the largest frame: move it forward.
                self.recv.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if let Some(deadline) = self.hello_deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero()
                    || !crate::sys::wait_readable(self.stream.as_fd(), left).map_err(Error::Io)?
                {
                    return Err(io_error(io::Error::from(io::ErrorKind::TimedOut)));
                }
            }
            let n = loop {
                match self.stream.read(&mut self.recv[self.end..]) {
                    Ok(n) => break n,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(err) => return Err(io_error(err)),
                }
            };
            if n == 0 {
                return Err(if self.start == self.end {
                    Error::Disconnected(during)
                } else {
                    Error::Protocol("the agent closed the connection mid-frame".into())
                });
            }
            self.end += n;
        };
        self.returned = frame_len;
        let body = &self.recv[self.start + ferry_wire::limits::HEADER_LEN..self.start + frame_len];
        decode_agent_frame(body)
            .map_err(|err| Error::Protocol(format!("undecodable frame from the agent: {err}")))
    }

    /// The frame [`Connection::recv`] returned last, decoded again (it is still buffered).
    pub fn last_frame(&self) -> Result<AgentFrame<'_>, Error> {
        let body =
            &self.recv[self.start + ferry_wire::limits::HEADER_LEN..self.start + self.returned];
        decode_agent_frame(body)
            .map_err(|err| Error::Protocol(format!("undecodable frame from the agent: {err}")))
    }

    /// A second handle on the socket, for a writer on another thread.
    pub fn try_clone_stream(&self) -> Result<UnixStream, Error> {
        self.stream.try_clone().map_err(Error::Io)
    }

    /// Ends the connection in both directions: the agent sees a disconnect at once, even while
    /// other handles on the socket exist.
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
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

pub(crate) fn remote(err: &ferry_wire::ErrorFrame<'_>) -> Error {
    Error::Remote(RemoteError {
        code: err.code,
        errno: (err.errno != 0).then_some(err.errno),
        message: err.message.to_owned(),
    })
}

pub(crate) fn unexpected(frame: &AgentFrame<'_>, context: &str) -> Error {
    let name = match frame {
        AgentFrame::Hello(_) => "a hello",
        AgentFrame::Started(_) => "a started record",
        AgentFrame::Stdout(_) => "stdout",
        AgentFrame::Stderr(_) => "stderr",
        AgentFrame::StdinCredit(_) => "stdin credit",
        AgentFrame::Exited(_) => "a termination record",
        AgentFrame::Error(_) => "an error",
        AgentFrame::Ready(_) => "a readiness report",
    };
    Error::Protocol(format!("the agent sent {name} {context}"))
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
