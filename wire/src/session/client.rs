//! The client's side of a conversation: hello, one operation, its output, stdin within credit.

use crate::frame::{decode_agent_frame, encode_client_frame, frame_data_in_place, split_frame};
use crate::limits::{HEADER_LEN, MAX_DATA, MAX_FRAME_BODY};
use crate::msg::{
    AgentFrame, ClientFrame, ClientHello, ErrorCode, ErrorFrame, ExecRequest, Limits, StdinMode,
    Termination, MAGIC, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use crate::{Bytes, DataKind, DATA_HEADROOM};

use super::{FrameKind, Input, Micros, Phase, SessionError};

/// What the agent said about itself in its hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentInfo<'a> {
    /// The protocol version both sides speak on this connection.
    pub protocol_version: u16,
    /// The agent's own version.
    pub agent_version: &'a str,
    /// The limits the agent enforces.
    pub limits: Limits,
}

/// What the agent did, as the client session reports it. Data borrows from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientEvent<'a> {
    /// The agent answered the hello; operations may run.
    HelloAccepted(AgentInfo<'a>),
    /// The command was executed.
    Started {
        /// Its pid in the guest (also its session and process group id).
        pid: u32,
    },
    /// A chunk of the command's stdout, in order.
    Stdout(&'a [u8]),
    /// A chunk of the command's stderr, in order.
    Stderr(&'a [u8]),
    /// The agent returned stdin credit: this many bytes may be sent now.
    StdinCredit {
        /// The credit available after the grant.
        available: usize,
    },
    /// The command ended; the last event of the operation.
    Exited(Termination),
    /// The agent refused the hello or failed the operation; the last event of the connection.
    Refused(ErrorFrame<'a>),
}

/// How much of a stdin write a session took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StdinSent {
    /// Bytes of the data that went into the frame (0: no credit now).
    pub taken: usize,
    /// Bytes written to the output buffer: the frame to send.
    pub written: usize,
}

/// Where the operation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    None,
    /// An exec request was sent; `Started` or an error comes next.
    ExecSent,
    Running,
    Done,
}

/// The client's protocol state: no buffers, no I/O, no clock.
///
/// ```text
///  new ──► hello queued ──► [poll_transmit / start_exec write it] ──► HelloAccepted ──┐
///                                           start_exec (may be pipelined) ───────────┤
///                             Started ─► Stdout/Stderr/StdinCredit … ─► Exited │ Refused
/// ```
#[derive(Debug, Clone)]
pub struct ClientSession {
    hello_sent: bool,
    /// The agent's hello, once it came: negotiated version and limits.
    agent: Option<(u16, Limits)>,
    hello_deadline: Option<Micros>,
    operation: Operation,
    /// The command has a stdin pipe that is still open on our side.
    stdin_open: bool,
    /// `StdinEof` is queued for `poll_transmit`.
    eof_queued: bool,
    /// Stdin bytes that may be sent now.
    credit: usize,
    /// Stdin bytes sent and not credited back.
    in_flight: usize,
    /// A peer error or a refusal ended the connection.
    failed: bool,
}

impl ClientSession {
    /// A session whose hello is queued. With `hello_timeout`, the agent's hello must arrive
    /// within that many microseconds of `now`.
    pub fn new(now: Micros, hello_timeout: Option<Micros>) -> ClientSession {
        ClientSession {
            hello_sent: false,
            agent: None,
            hello_deadline: hello_timeout.map(|t| now.saturating_add(t)),
            operation: Operation::None,
            stdin_open: false,
            eof_queued: false,
            credit: 0,
            in_flight: 0,
            failed: false,
        }
    }

    /// Where the conversation stands.
    pub fn phase(&self) -> Phase {
        match (self.agent, self.operation) {
            _ if self.failed => Phase::Done,
            (_, Operation::Done) => Phase::Done,
            // Until the agent's hello, whatever was pipelined behind ours.
            (None, _) => Phase::Hello,
            (_, Operation::Running) => Phase::Running,
            (_, Operation::ExecSent) => Phase::Starting,
            (Some(_), Operation::None) => Phase::Idle,
        }
    }

    /// Whether the conversation is over: nothing more will be sent or accepted.
    pub fn is_finished(&self) -> bool {
        self.phase() == Phase::Done
    }

    /// The agent's limits, once its hello arrived.
    pub fn agent_limits(&self) -> Option<Limits> {
        self.agent.map(|(_, limits)| limits)
    }

    /// The stdin bytes that may be sent right now.
    pub fn stdin_credit(&self) -> usize {
        if self.stdin_open && !self.eof_queued {
            self.credit
        } else {
            0
        }
    }

    /// Whether stdin can still be written (piped, not closed, the operation not over).
    pub fn stdin_open(&self) -> bool {
        self.stdin_open && !self.eof_queued && !self.is_finished()
    }

    /// When the driver must call [`ClientSession::handle_timeout`] at the latest.
    pub fn poll_timeout(&self) -> Option<Micros> {
        if self.agent.is_none() && !self.failed {
            self.hello_deadline
        } else {
            None
        }
    }

    /// Checks the deadlines against `now`.
    pub fn handle_timeout(&mut self, now: Micros) -> Result<(), SessionError> {
        match self.poll_timeout() {
            Some(deadline) if now >= deadline => {
                self.failed = true;
                Err(SessionError::TimedOut {
                    phase: Phase::Hello,
                })
            }
            _ => Ok(()),
        }
    }

    /// Writes the frames the session has queued (the hello, a stdin EOF) into `out`; returns the
    /// bytes written, 0 when nothing is queued. Call after every command and before waiting.
    pub fn poll_transmit(&mut self, out: &mut [u8]) -> Result<usize, SessionError> {
        let mut written = self.transmit_hello(out)?;
        if self.eof_queued && self.stdin_open {
            let rest = out.get_mut(written..).unwrap_or(&mut []);
            written += encode_client_frame(&ClientFrame::StdinEof, rest)?;
            self.stdin_open = false;
        }
        Ok(written)
    }

    fn transmit_hello(&mut self, out: &mut [u8]) -> Result<usize, SessionError> {
        let n = self.encode_pending_hello(out)?;
        self.hello_sent = true;
        Ok(n)
    }

    /// The hello, if it was not sent yet, encoded into `out` (the session is unchanged).
    fn encode_pending_hello(&self, out: &mut [u8]) -> Result<usize, SessionError> {
        if self.hello_sent {
            return Ok(0);
        }
        Ok(encode_client_frame(
            &ClientFrame::Hello(ClientHello::CURRENT),
            out,
        )?)
    }

    /// Starts `request`: validates it against this crate's limits and the agent's (when known),
    /// and encodes it into `out` — behind the hello if that is still queued, so a driver can
    /// send both in one write and the exec costs no extra round trip. Returns the bytes written.
    ///
    /// NOTE: pipelining before the agent's hello is sound while this crate speaks one protocol
    /// version: the request's encoding cannot depend on the negotiation.
    pub fn start_exec(
        &mut self,
        request: &ExecRequest<'_>,
        out: &mut [u8],
    ) -> Result<usize, SessionError> {
        const _: () = assert!(MIN_PROTOCOL_VERSION == PROTOCOL_VERSION);
        if self.operation != Operation::None || self.failed {
            return Err(SessionError::InvalidState);
        }
        // Within the agent's limits once its hello is in (tighter ones than ours are legal).
        let limits = self.agent_limits().unwrap_or(Limits::CURRENT);
        request
            .validate_within(&limits)
            .map_err(|err| SessionError::InvalidRequest {
                message: err.message,
            })?;
        // The session changes only once both frames are encoded: a refusal leaves it as it was.
        let hello_len = self.encode_pending_hello(out)?;
        let rest = out.get_mut(hello_len..).unwrap_or(&mut []);
        let exec_len = encode_client_frame(&ClientFrame::Exec(*request), rest)?;
        self.hello_sent = true;
        self.operation = Operation::ExecSent;
        self.stdin_open = request.stdin == StdinMode::Pipe;
        Ok(hello_len + exec_len)
    }

    /// Encodes one stdin frame with as much of `data` as credit, [`MAX_DATA`] and `out` allow.
    /// `taken == 0` means no credit now: wait for [`ClientEvent::StdinCredit`].
    pub fn send_stdin(&mut self, data: &[u8], out: &mut [u8]) -> Result<StdinSent, SessionError> {
        let room = out.len().saturating_sub(DATA_HEADROOM);
        let take = self.stdin_take(data.len())?.min(room);
        if take == 0 {
            if !data.is_empty() && self.stdin_credit() > 0 {
                return Err(SessionError::BufferTooSmall);
            }
            return Ok(StdinSent {
                taken: 0,
                written: 0,
            });
        }
        let chunk = data.get(..take).ok_or(SessionError::BufferTooSmall)?;
        // One copy of the data, straight to its place in the frame.
        let written = encode_client_frame(&ClientFrame::Stdin(Bytes(chunk)), out)?;
        self.charge(take);
        Ok(StdinSent {
            taken: take,
            written,
        })
    }

    /// Frames `len` stdin bytes that the driver placed at `buf[DATA_HEADROOM..]` without a
    /// copy; returns where the frame starts (send `buf[start..DATA_HEADROOM + len]`). `len` must
    /// be within [`ClientSession::stdin_credit`] and [`MAX_DATA`].
    pub fn frame_stdin_in_place(
        &mut self,
        buf: &mut [u8],
        len: usize,
    ) -> Result<usize, SessionError> {
        if len == 0 || self.stdin_take(len)? < len {
            return Err(SessionError::CreditExceeded);
        }
        let start = frame_data_in_place(buf, DataKind::Stdin, len)?;
        self.charge(len);
        Ok(start)
    }

    /// How much of `want` stdin bytes may go into the next frame.
    fn stdin_take(&self, want: usize) -> Result<usize, SessionError> {
        if !self.stdin_open() || self.operation == Operation::None {
            return Err(SessionError::InvalidState);
        }
        Ok(want.min(self.credit).min(MAX_DATA))
    }

    fn charge(&mut self, n: usize) {
        self.credit -= n;
        self.in_flight += n;
    }

    /// Queues `StdinEof` (sent by the next [`ClientSession::poll_transmit`]). Closing twice, or
    /// after the operation ended, is a no-op.
    pub fn close_stdin(&mut self) -> Result<(), SessionError> {
        if self.operation == Operation::None {
            return Err(SessionError::InvalidState);
        }
        if self.stdin_open && !self.is_finished() {
            self.eof_queued = true;
        }
        Ok(())
    }

    /// Parses at most one frame from the front of `input` (the driver's unconsumed receive
    /// bytes). The event borrows `input`; drop `consumed` bytes once it is handled.
    pub fn handle_input<'a>(
        &mut self,
        input: &'a [u8],
    ) -> Result<Input<ClientEvent<'a>>, SessionError> {
        if self.failed {
            return Err(SessionError::InvalidState);
        }
        let split = split_frame(input, MAX_FRAME_BODY).map_err(|err| self.fail(err.into()));
        let Some((body, consumed)) = split? else {
            return Ok(Input::NEED_MORE);
        };
        let frame = decode_agent_frame(body).map_err(|_| self.fail(SessionError::Malformed))?;
        let event = self.handle_frame(frame).map_err(|err| self.fail(err))?;
        Ok(Input { consumed, event })
    }

    fn fail(&mut self, err: SessionError) -> SessionError {
        self.failed = true;
        self.stdin_open = false;
        err
    }

    fn handle_frame<'a>(
        &mut self,
        frame: AgentFrame<'a>,
    ) -> Result<Option<ClientEvent<'a>>, SessionError> {
        let phase = self.phase();
        let unexpected = SessionError::Unexpected {
            frame: FrameKind::of_agent(&frame),
            phase,
        };
        let event = match (frame, phase) {
            // The hello answers ours, whether or not a request was pipelined behind it.
            (AgentFrame::Hello(hello), Phase::Hello | Phase::Starting)
                if self.hello_sent && self.agent.is_none() =>
            {
                if hello.magic != MAGIC {
                    return Err(SessionError::NotFerry);
                }
                if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&hello.version) {
                    return Err(SessionError::UnsupportedVersion {
                        chosen: hello.version,
                    });
                }
                // Credit opens with the window the agent announced, never beyond our own.
                self.credit = (hello.limits.stdin_window as usize)
                    .min(crate::limits::STDIN_WINDOW)
                    .saturating_sub(self.in_flight);
                self.agent = Some((hello.version, hello.limits));
                ClientEvent::HelloAccepted(AgentInfo {
                    protocol_version: hello.version,
                    agent_version: hello.agent_version,
                    limits: hello.limits,
                })
            }
            (AgentFrame::Started(started), Phase::Starting) if self.agent.is_some() => {
                self.operation = Operation::Running;
                ClientEvent::Started { pid: started.pid }
            }
            (AgentFrame::Stdout(data), Phase::Running) => ClientEvent::Stdout(data.0),
            (AgentFrame::Stderr(data), Phase::Running) => ClientEvent::Stderr(data.0),
            (AgentFrame::StdinCredit(n), Phase::Running) => {
                let n = n as usize;
                if n > self.in_flight {
                    return Err(SessionError::CreditExceeded);
                }
                self.in_flight -= n;
                self.credit += n;
                ClientEvent::StdinCredit {
                    available: self.stdin_credit(),
                }
            }
            (AgentFrame::Exited(end), Phase::Running) => {
                self.operation = Operation::Done;
                self.stdin_open = false;
                ClientEvent::Exited(end)
            }
            // An error may end any phase but the finished one; it is the connection's last frame.
            (
                AgentFrame::Error(err),
                Phase::Hello | Phase::Idle | Phase::Starting | Phase::Running,
            ) if self.hello_sent => {
                self.failed = true;
                self.stdin_open = false;
                ClientEvent::Refused(err)
            }
            _ => return Err(unexpected),
        };
        Ok(Some(event))
    }

    /// The agent closed the connection (`input_left` unconsumed bytes remained). `Ok` when the
    /// conversation had ended or had nothing running (a hello-only health check); otherwise
    /// the typed disconnect.
    pub fn handle_eof(&mut self, input_left: usize) -> Result<(), SessionError> {
        let phase = self.phase();
        let clean = matches!(phase, Phase::Done | Phase::Idle) && input_left == 0;
        self.stdin_open = false;
        if clean {
            self.failed |= phase == Phase::Idle;
            return Ok(());
        }
        self.failed = true;
        Err(SessionError::Disconnected {
            phase,
            mid_frame: input_left > 0,
        })
    }

    /// Whether the agent refused for a version mismatch: a driver maps [`ClientEvent::Refused`]
    /// with this code to its version error.
    pub fn is_version_refusal(err: &ErrorFrame<'_>) -> bool {
        err.code == ErrorCode::UnsupportedVersion
    }
}

const _: () = assert!(DATA_HEADROOM > HEADER_LEN);
