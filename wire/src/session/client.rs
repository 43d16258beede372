//! The client's side of a conversation: the agent's hello, our hello and proof, the agent's
//! proof, an operation, its output, stdin within credit; then (protocol 5, when the agent
//! announces `idle_ms`) another operation on the same connection.

use crate::frame::{decode_agent_frame, encode_client_frame, frame_data_in_place, split_frame};
use crate::jobs::{
    AttachHeader, AttachRequest, JobQuery, JobRecord, JobRequest, JobStart, JobStarted, KillJob,
};
use crate::limits::MAX_RESEED;
use crate::limits::{
    HEADER_LEN, MAC_LEN, MAX_DATA, MAX_FRAME, MAX_FRAME_BODY, MAX_INLINE_LIST, NONCE_LEN,
};
use crate::msg::{
    AgentFrame, Bounds, Cancel, ClientFrame, ClientHello, ClientProof, DoneReport, Dropped,
    ErrorCode, ErrorFrame, ExecPart, ExecRequest, Limits, ListKind, Security, StdinMode, StrList,
    Termination, WindowSize, MAGIC, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use crate::ops::{
    FileHeader, FileSummary, GetRequest, InterfaceInfo, MountInfo, PutRequest, ShutdownRequest,
    Skipped, SystemInfo, Timestamp, DIGEST_LEN,
};
use crate::{ByteArray, Bytes, DataKind, DATA_HEADROOM};

use super::auth::{Secret, Transcript};
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
    /// Whether the agent requires a proof of the secret.
    pub security: Security,
    /// How the agent bounds commands.
    pub bounds: Bounds,
}

/// What authenticates one connection on the client's side.
#[derive(Debug, Clone)]
pub struct ClientAuth {
    /// Fresh random bytes for this connection alone: the agent's proof covers them.
    pub nonce: [u8; NONCE_LEN],
    /// The agent's secret. `None` talks only to an insecure agent; with a secret, only to an
    /// agent that proves it.
    pub secret: Option<Secret>,
}

/// What the agent did, as the client session reports it. Data borrows from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientEvent<'a> {
    /// The agent's hello arrived and suits us; our hello (and proof) are queued, and an
    /// operation may be started. From an insecure agent, nothing more comes before it.
    HelloAccepted(AgentInfo<'a>),
    /// The agent proved the secret: it is the agent the secret belongs to. Comes before
    /// anything the agent says about an operation.
    Authenticated,
    /// An operation without output finished (a kill-all); the last event.
    Done(DoneReport),
    /// The command was executed.
    Started {
        /// Its pid in the guest (also its session and process group id).
        pid: u32,
    },
    /// A chunk of the command's stdout, in order (when the agent read it:
    /// [`ClientSession::last_output_at`]).
    Stdout(&'a [u8]),
    /// A chunk of the command's stderr, in order.
    Stderr(&'a [u8]),
    /// A stream passed the request's output cap: its head came before, this many bytes were
    /// dropped, its tail follows.
    OutputDropped(Dropped),
    /// The agent returned stdin credit: this many bytes may be sent now.
    StdinCredit {
        /// The credit available after the grant.
        available: usize,
    },
    /// The command ended; the last event of the operation.
    Exited(Termination),
    /// The agent refused the hello or failed the operation; the last event of the operation,
    /// and of the connection unless the refusal left it reusable
    /// ([`ClientSession::is_reusable`]: a request refused before it started, nothing else of
    /// it sent).
    Refused(ErrorFrame<'a>),
    /// A put or a get was checked and begins (a get's content follows).
    FileReady(FileHeader),
    /// A chunk of a get's content, borrowed from the input.
    FileData(&'a [u8]),
    /// A tree transfer left an entry out.
    Skipped(Skipped<'a>),
    /// The transfer is complete: its size and SHA-256 (compare with your own). Last.
    FileDone(FileSummary),
    /// The first answer to an info request.
    SystemInfo(SystemInfo<'a>),
    /// A mounted file system (info).
    Mount(MountInfo<'a>),
    /// A network interface (info).
    Interface(InterfaceInfo<'a>),
    /// The guest's clock was set; it said this before. Last.
    ClockSet(Timestamp),
    /// The job was started and runs detached: its id. Last.
    Detached(JobStarted),
    /// A job of a listing ([`ClientEvent::Done`] counts them).
    Job(JobRecord<'a>),
    /// An attachment begins: where each stream resumes, and whether stdin was granted. The
    /// job's output follows as [`ClientEvent::Stdout`] / [`ClientEvent::Stderr`], bytes lost
    /// on the way as [`ClientEvent::OutputDropped`], and [`ClientEvent::Exited`] (the job
    /// ended) or [`ClientEvent::Done`] (not following) last.
    Attached(AttachHeader),
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
    /// Sent, not answered yet.
    Sent(Op),
    /// Started (`Started`, `FileReady`, the first info frame).
    Running(Op),
    Done,
}

/// Which operation a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Exec,
    Put,
    Get,
    /// Kill-all, shutdown, reseed: one `Done`.
    Simple,
    Info,
    Clock,
    /// A detached job's start: one `Detached`.
    Job,
    /// A job listing: `Job` records, then `Done`.
    JobList,
    /// `Attached`, output, then `Exited` or `Done`.
    Attach,
    /// `Exited`.
    Wait,
}

/// The client's protocol state: no buffers, no I/O, no clock.
///
/// ```text
///  new ──► agent's hello ─► HelloAccepted (our hello + proof queued) ─► start_exec (one write:
///  hello, proof, request) ─► Authenticated ─► Started ─► Stdout/Stderr/StdinCredit … ─► Exited
///                                          (any time: Refused, the last event)
///  protocol 5: after the final event, is_reusable() ─► start_* again (no hello, no proof)
/// ```
#[derive(Debug, Clone)]
pub struct ClientSession {
    nonce: [u8; NONCE_LEN],
    secret: Option<Secret>,
    transcript: Transcript,
    /// Our hello (and proof, when secure) are owed to the agent.
    hello_queued: bool,
    hello_sent: bool,
    proof: Option<[u8; MAC_LEN]>,
    /// The agent proved the secret (or is insecure and we have no secret).
    authenticated: bool,
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
    /// The running command has a terminal.
    pty: bool,
    /// The `at_us` of the last output chunk.
    last_output_at: u64,
    /// When the agent was last heard from ([`ClientSession::handle_input_at`]).
    heard_at: Option<Micros>,
    /// A put's end (its digest) was sent.
    put_ended: bool,
    info_items: usize,
    /// Job records received in a listing.
    job_items: usize,
    /// The operation's final frame came and the agent keeps the connection: another
    /// operation may start (protocol 5).
    reusable: bool,
    /// Something beyond the request was sent for this operation (stdin, its end, a control,
    /// the request's pieces): after a refusal it may still be on its way, so the connection is
    /// not reused.
    op_traffic: bool,
}

impl ClientSession {
    /// A session for a connection just made: it awaits the agent's hello. With
    /// `hello_timeout`, the handshake (the agent's hello, and its proof once we sent ours) must
    /// be done within that many microseconds of `now`.
    pub fn new(now: Micros, hello_timeout: Option<Micros>, auth: ClientAuth) -> ClientSession {
        ClientSession {
            nonce: auth.nonce,
            secret: auth.secret,
            hello_deadline: hello_timeout.map(|t| now.saturating_add(t)),
            ..ClientSession::fresh()
        }
    }

    /// A session with every per-operation field as an operation begins (and the connection's
    /// own fields as a new connection has them).
    ///
    /// NOTE: [`ClientSession::reset_operation`] starts each operation on a connection from
    /// here: a new per-operation field is reset by being given its initial value here; a field
    /// that must outlive an operation is carried over there, by name.
    fn fresh() -> ClientSession {
        ClientSession {
            nonce: [0; NONCE_LEN],
            secret: None,
            transcript: Transcript::default(),
            hello_queued: false,
            hello_sent: false,
            proof: None,
            authenticated: false,
            agent: None,
            hello_deadline: None,
            operation: Operation::None,
            stdin_open: false,
            eof_queued: false,
            credit: 0,
            in_flight: 0,
            failed: false,
            pty: false,
            last_output_at: 0,
            heard_at: None,
            put_ended: false,
            info_items: 0,
            job_items: 0,
            reusable: false,
            op_traffic: false,
        }
    }

    /// Resets every per-operation field for the next operation on this connection.
    fn reset_operation(&mut self) {
        let window = self
            .agent
            .map_or(0, |(_, limits)| limits.stdin_window as usize)
            .min(crate::limits::STDIN_WINDOW);
        *self = ClientSession {
            nonce: self.nonce,
            secret: self.secret.take(),
            transcript: core::mem::take(&mut self.transcript),
            hello_queued: self.hello_queued,
            hello_sent: self.hello_sent,
            proof: self.proof,
            authenticated: self.authenticated,
            agent: self.agent,
            hello_deadline: self.hello_deadline,
            failed: self.failed,
            // Credit opens with the agent's whole window again: it forgot what it owed.
            credit: window,
            ..ClientSession::fresh()
        };
    }

    /// Whether the last operation ended and the agent keeps the connection (protocol 5, its
    /// `idle_ms` > 0): another operation may start on it, without a hello or a proof. A
    /// driver keeps such a connection for its next operation (younger than `idle_ms`: the
    /// agent closes it then, silently).
    pub fn is_reusable(&self) -> bool {
        !self.failed && self.operation == Operation::Done && self.reusable
    }

    /// The operation ended: the final frame came.
    fn operation_done(&mut self) {
        self.operation = Operation::Done;
        self.stdin_open = false;
        self.reusable = self.agent.is_some_and(|(_, limits)| limits.idle_ms > 0);
    }

    /// Whether `err`, the answer to a request that has not started, leaves the connection to
    /// another operation: the agent refused the request (not a breach of the protocol, not the
    /// handshake), and nothing of the operation is still on its way to the agent.
    fn refusal_keeps(&self, err: &ErrorFrame<'_>) -> bool {
        let breach = matches!(
            err.code,
            ErrorCode::UnsupportedVersion
                | ErrorCode::Malformed
                | ErrorCode::FrameTooLarge
                | ErrorCode::ProtocolViolation
                | ErrorCode::Unauthenticated
        );
        self.authenticated
            && !self.op_traffic
            && !breach
            && matches!(self.operation, Operation::Sent(_))
            && self.agent.is_some_and(|(_, limits)| limits.idle_ms > 0)
    }

    /// When the agent read the last output chunk: microseconds since its command started, on
    /// the guest's monotonic clock.
    pub fn last_output_at(&self) -> u64 {
        self.last_output_at
    }

    /// Where the conversation stands.
    pub fn phase(&self) -> Phase {
        match (self.agent, self.operation) {
            _ if self.failed => Phase::Done,
            (_, Operation::Done) if self.reusable => Phase::Idle,
            (_, Operation::Done) => Phase::Done,
            (None, _) => Phase::Hello,
            (_, Operation::Running(_)) => Phase::Running,
            (_, Operation::Sent(_)) => Phase::Starting,
            (Some(_), Operation::None) if !self.authenticated => Phase::Hello,
            (Some(_), Operation::None) => Phase::Idle,
        }
    }

    /// Whether the handshake is complete: the agent proved the secret (or, without a secret,
    /// its hello came from an insecure agent).
    pub fn is_authenticated(&self) -> bool {
        self.authenticated
    }

    /// Whether the operation is over (its final frame came, or the connection failed): nothing
    /// more of it will be sent or accepted. The connection may carry another:
    /// [`ClientSession::is_reusable`].
    pub fn is_finished(&self) -> bool {
        self.failed || self.operation == Operation::Done
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

    /// When the driver must call [`ClientSession::handle_timeout`] at the latest: the
    /// handshake's deadline, then (for a driver that reports when it hears the agent, with
    /// [`ClientSession::handle_input_at`]) three keepalive intervals after it last did while an
    /// operation runs.
    pub fn poll_timeout(&self) -> Option<Micros> {
        if self.failed {
            None
        } else if !self.authenticated {
            self.hello_deadline
        } else {
            self.liveness_deadline()
        }
    }

    fn liveness_deadline(&self) -> Option<Micros> {
        // Not for a kill-all: the agent does it in one go, without keepalives. An attachment
        // and a wait have them (a wait may last as long as its job: a silent agent must not
        // hold it forever).
        let running = matches!(
            self.operation,
            Operation::Sent(Op::Exec | Op::Put | Op::Get | Op::Attach | Op::Wait)
                | Operation::Running(Op::Exec | Op::Put | Op::Get | Op::Attach | Op::Wait)
        );
        let (_, limits) = self.agent?;
        let interval = u64::from(limits.keepalive_ms).saturating_mul(1000);
        let heard = self.heard_at.filter(|_| running && interval > 0)?;
        Some(heard.saturating_add(interval.saturating_mul(LIVENESS_INTERVALS)))
    }

    /// Checks the deadlines against `now`.
    pub fn handle_timeout(&mut self, now: Micros) -> Result<(), SessionError> {
        let hello = !self.authenticated;
        match self.poll_timeout() {
            Some(deadline) if now >= deadline => {
                self.failed = true;
                self.stdin_open = false;
                Err(if hello {
                    SessionError::TimedOut {
                        phase: Phase::Hello,
                    }
                } else {
                    SessionError::AgentSilent
                })
            }
            _ => Ok(()),
        }
    }

    /// Writes the frames the session has queued (our hello and proof, a stdin EOF) into `out`;
    /// returns the bytes written, 0 when nothing is queued. Call after every event and command
    /// and before waiting.
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
        self.hello_sent |= self.hello_queued;
        Ok(n)
    }

    /// Our hello and proof, if owed and not sent yet, encoded into `out` (the session is
    /// unchanged).
    fn encode_pending_hello(&self, out: &mut [u8]) -> Result<usize, SessionError> {
        if self.hello_sent || !self.hello_queued {
            return Ok(0);
        }
        let mut n = encode_client_frame(&ClientFrame::Hello(ClientHello::CURRENT), out)?;
        if let Some(mac) = &self.proof {
            let proof = ClientFrame::Auth(ClientProof {
                nonce: ByteArray(self.nonce),
                mac: Bytes(mac),
            });
            n += encode_client_frame(&proof, out.get_mut(n..).unwrap_or(&mut []))?;
        }
        Ok(n)
    }

    /// Starts `request`, once the agent's hello is in: validates it against this crate's limits
    /// and the agent's, and encodes it into `out` behind our hello and proof if those are still
    /// queued, so a driver sends all of it in one write and the exec costs one round trip. A
    /// request larger than one frame goes as pieces ([`ClientFrame::ExecPart`]) then the exec
    /// frame; size `out` with [`ClientSession::exec_buffer_len`]. Returns the bytes written.
    pub fn start_exec(
        &mut self,
        request: &ExecRequest<'_>,
        out: &mut [u8],
    ) -> Result<usize, SessionError> {
        let limits = self.operation_allowed()?;
        // Within the agent's limits (tighter ones than ours are legal).
        request
            .validate_within(&limits)
            .map_err(|err| SessionError::InvalidRequest {
                message: err.message,
            })?;
        let hello_len = self.encode_pending_hello(out)?;
        let mut n = hello_len;
        let mut last = *request;
        let mut pieces_sent = false;
        for (list, packed) in [
            (ListKind::Argv, &mut last.argv),
            (ListKind::Env, &mut last.env),
        ] {
            let bytes = packed.as_bytes();
            let (pieces, inline) = bytes.split_at(bytes.len().saturating_sub(MAX_INLINE_LIST));
            for data in pieces.chunks(MAX_DATA) {
                let part = ClientFrame::ExecPart(ExecPart {
                    list,
                    data: Bytes(data),
                });
                n += encode_client_frame(&part, out.get_mut(n..).unwrap_or(&mut []))?;
            }
            pieces_sent |= !pieces.is_empty();
            *packed = StrList::new(inline);
        }
        n += encode_client_frame(
            &ClientFrame::Exec(last),
            out.get_mut(n..).unwrap_or(&mut []),
        )?;
        // The pieces go before the request: a refusal may come before the agent read them.
        // NOTE: only once all of it is encoded: a start refused for its buffer sent nothing
        // (found while writing the protocol-5 fuzz model: it kept a later refusal from
        // leaving the connection reusable).
        self.op_traffic |= pieces_sent;
        self.hello_sent = true;
        self.operation = Operation::Sent(Op::Exec);
        self.stdin_open = request.stdin == StdinMode::Pipe;
        self.pty = request.pty.is_some();
        Ok(n)
    }

    /// The size of a buffer that holds whatever [`ClientSession::start_exec`] writes for
    /// `request` (at least [`MAX_FRAME`]).
    pub fn exec_buffer_len(request: &ExecRequest<'_>) -> usize {
        let pieces = |list: &StrList<'_>| {
            let bytes = list.as_bytes().len().saturating_sub(MAX_INLINE_LIST);
            bytes + bytes.div_ceil(MAX_DATA) * crate::DATA_HEADROOM
        };
        HELLO_AND_PROOF_MAX + pieces(&request.argv) + pieces(&request.env) + MAX_FRAME
    }

    /// Encodes a signal (1–64) for the command's process group into `out`, while an exec
    /// runs. With a terminal, `^C` is better sent as the byte it is.
    pub fn send_signal(&mut self, signal: u8, out: &mut [u8]) -> Result<usize, SessionError> {
        if signal == 0 || signal > 64 {
            return Err(SessionError::InvalidRequest {
                message: "no such signal",
            });
        }
        self.control(&ClientFrame::Signal(signal), out)
    }

    /// Encodes the new size of the command's terminal into `out`; refused for a command
    /// without one.
    pub fn send_resize(&mut self, size: WindowSize, out: &mut [u8]) -> Result<usize, SessionError> {
        if !self.pty {
            return Err(SessionError::InvalidRequest {
                message: "the command has no terminal",
            });
        }
        self.control(&ClientFrame::Resize(size), out)
    }

    /// Encodes a cancel into `out`: the agent ends the command's tree (`SIGTERM`, then
    /// `SIGKILL` after `grace_ms`, or the request's grace). The record follows as usual.
    pub fn send_cancel(
        &mut self,
        grace_ms: Option<u32>,
        out: &mut [u8],
    ) -> Result<usize, SessionError> {
        self.control(&ClientFrame::Cancel(Cancel { grace_ms }), out)
    }

    /// A control frame for a running exec.
    fn control(&mut self, frame: &ClientFrame<'_>, out: &mut [u8]) -> Result<usize, SessionError> {
        let exec = matches!(
            self.operation,
            Operation::Sent(Op::Exec | Op::Attach) | Operation::Running(Op::Exec | Op::Attach)
        );
        if !exec || self.failed {
            return Err(SessionError::InvalidState);
        }
        let n = encode_client_frame(frame, out)?;
        self.op_traffic = true;
        Ok(n)
    }

    /// Asks the agent to end every command it runs, once the agent's hello is in; like
    /// [`ClientSession::start_exec`] otherwise. [`ClientEvent::Done`] or a refusal follows.
    pub fn start_kill_all(&mut self, out: &mut [u8]) -> Result<usize, SessionError> {
        self.operation_allowed()?;
        self.begin(&ClientFrame::KillAll, Op::Simple, out)
    }

    /// Encodes (after the hello and proof if they are still pending) a put: write a file, or
    /// unpack a tree. Send its content with [`ClientSession::send_stdin`] or
    /// [`ClientSession::frame_stdin_in_place`] within credit (before the agent's
    /// [`ClientEvent::FileReady`] too: the agent checks the request first), then
    /// [`ClientSession::end_put`] with its SHA-256.
    pub fn start_put(
        &mut self,
        request: &PutRequest<'_>,
        out: &mut [u8],
    ) -> Result<usize, SessionError> {
        let limits = self.operation_allowed()?;
        request.validate_within(&limits).map_err(invalid)?;
        let n = self.begin(&ClientFrame::Put(*request), Op::Put, out)?;
        self.stdin_open = true;
        Ok(n)
    }

    /// Encodes the end of a put's content: its SHA-256. No more content may follow.
    pub fn end_put(
        &mut self,
        sha256: &[u8; DIGEST_LEN],
        out: &mut [u8],
    ) -> Result<usize, SessionError> {
        let put = matches!(
            self.operation,
            Operation::Sent(Op::Put) | Operation::Running(Op::Put)
        );
        if !put || self.put_ended || self.failed {
            return Err(SessionError::InvalidState);
        }
        let n = encode_client_frame(&ClientFrame::PutEnd(ByteArray(*sha256)), out)?;
        self.put_ended = true;
        self.op_traffic = true;
        self.stdin_open = false;
        Ok(n)
    }

    /// Encodes a get: read a file, or a tree as a tar stream.
    pub fn start_get(
        &mut self,
        request: &GetRequest<'_>,
        out: &mut [u8],
    ) -> Result<usize, SessionError> {
        let limits = self.operation_allowed()?;
        request.validate_within(&limits).map_err(invalid)?;
        self.begin(&ClientFrame::Get(*request), Op::Get, out)
    }

    /// Encodes an info request.
    pub fn start_info(&mut self, out: &mut [u8]) -> Result<usize, SessionError> {
        self.operation_allowed()?;
        self.begin(&ClientFrame::Info, Op::Info, out)
    }

    /// Encodes a shutdown (or reboot) request; [`ClientEvent::Done`] acknowledges it.
    pub fn start_shutdown(
        &mut self,
        request: ShutdownRequest,
        out: &mut [u8],
    ) -> Result<usize, SessionError> {
        self.operation_allowed()?;
        request.validate().map_err(invalid)?;
        self.begin(&ClientFrame::Shutdown(request), Op::Simple, out)
    }

    /// Encodes a request to set the guest's clock to `now` (read it as late as you can).
    pub fn start_time_sync(
        &mut self,
        now: Timestamp,
        out: &mut [u8],
    ) -> Result<usize, SessionError> {
        self.operation_allowed()?;
        if !now.is_valid() {
            return Err(SessionError::InvalidRequest {
                message: "nanoseconds out of range",
            });
        }
        self.begin(&ClientFrame::TimeSync(now), Op::Clock, out)
    }

    /// Starts `request` as a detached job named `name` (see [`crate::check_job_name`]):
    /// [`ClientEvent::Detached`] answers with its id once the command started. A job's request
    /// must fit in one exec frame, and its starter sends no stdin (an attachment may).
    pub fn start_job(
        &mut self,
        name: Option<&[u8]>,
        request: &ExecRequest<'_>,
        out: &mut [u8],
    ) -> Result<usize, SessionError> {
        let limits = self.operation_allowed()?;
        let start = JobStart {
            name: name.map(Bytes),
        };
        start.validate().map_err(invalid)?;
        request.validate_within(&limits).map_err(invalid)?;
        if request.argv.as_bytes().len() > MAX_INLINE_LIST
            || request.env.as_bytes().len() > MAX_INLINE_LIST
        {
            return Err(SessionError::InvalidRequest {
                message: "a job's request must fit in one exec frame",
            });
        }
        let hello_len = self.encode_pending_hello(out)?;
        let mut n = hello_len;
        for frame in [ClientFrame::StartJob(start), ClientFrame::Exec(*request)] {
            n += encode_client_frame(&frame, out.get_mut(n..).unwrap_or(&mut []))?;
        }
        self.hello_sent = true;
        self.operation = Operation::Sent(Op::Job);
        Ok(n)
    }

    /// Encodes a job listing request: [`ClientEvent::Job`] each, then [`ClientEvent::Done`].
    pub fn start_jobs(
        &mut self,
        query: &JobQuery<'_>,
        out: &mut [u8],
    ) -> Result<usize, SessionError> {
        let limits = self.operation_allowed()?;
        query.validate_within(&limits).map_err(invalid)?;
        self.begin(&ClientFrame::Jobs(*query), Op::JobList, out)
    }

    /// Encodes an attach request: [`ClientEvent::Attached`] first.
    pub fn start_attach(
        &mut self,
        request: &AttachRequest<'_>,
        out: &mut [u8],
    ) -> Result<usize, SessionError> {
        let limits = self.operation_allowed()?;
        request.validate_within(&limits).map_err(invalid)?;
        self.begin(&ClientFrame::Attach(*request), Op::Attach, out)
    }

    /// Encodes a wait for a job: its [`ClientEvent::Exited`] once it ended.
    pub fn start_wait(
        &mut self,
        request: &JobRequest<'_>,
        out: &mut [u8],
    ) -> Result<usize, SessionError> {
        let limits = self.operation_allowed()?;
        request.validate_within(&limits).map_err(invalid)?;
        self.begin(&ClientFrame::Wait(*request), Op::Wait, out)
    }

    /// Encodes a kill of a job's tree: [`ClientEvent::Done`].
    pub fn start_kill(
        &mut self,
        request: &KillJob<'_>,
        out: &mut [u8],
    ) -> Result<usize, SessionError> {
        let limits = self.operation_allowed()?;
        request.validate_within(&limits).map_err(invalid)?;
        self.begin(&ClientFrame::Kill(*request), Op::Simple, out)
    }

    /// Encodes the removal of an ended job: [`ClientEvent::Done`].
    pub fn start_remove(
        &mut self,
        request: &JobRequest<'_>,
        out: &mut [u8],
    ) -> Result<usize, SessionError> {
        let limits = self.operation_allowed()?;
        request.validate_within(&limits).map_err(invalid)?;
        self.begin(&ClientFrame::Remove(*request), Op::Simple, out)
    }

    /// Encodes a reseed with `random` (1 to [`MAX_RESEED`] bytes).
    pub fn start_reseed(&mut self, random: &[u8], out: &mut [u8]) -> Result<usize, SessionError> {
        self.operation_allowed()?;
        if random.is_empty() || random.len() > MAX_RESEED {
            return Err(SessionError::InvalidRequest {
                message: "reseed needs 1 to 512 bytes",
            });
        }
        self.begin(&ClientFrame::Reseed(Bytes(random)), Op::Simple, out)
    }

    fn begin(
        &mut self,
        frame: &ClientFrame<'_>,
        op: Op,
        out: &mut [u8],
    ) -> Result<usize, SessionError> {
        let n = self.start_operation(frame, out)?;
        self.operation = Operation::Sent(op);
        Ok(n)
    }

    /// The agent's limits, when an operation may start now: on a new connection once the
    /// agent's hello is in, or after an operation that left the connection reusable (whose
    /// state is then reset for the next one).
    fn operation_allowed(&mut self) -> Result<Limits, SessionError> {
        if self.is_reusable() {
            self.reset_operation();
        }
        if self.operation != Operation::None || self.failed {
            return Err(SessionError::InvalidState);
        }
        self.agent_limits().ok_or(SessionError::InvalidState)
    }

    /// Encodes our pending hello and proof, then `frame`. The session changes only once all
    /// are encoded: a refusal leaves it as it was.
    fn start_operation(
        &mut self,
        frame: &ClientFrame<'_>,
        out: &mut [u8],
    ) -> Result<usize, SessionError> {
        let hello_len = self.encode_pending_hello(out)?;
        let rest = out.get_mut(hello_len..).unwrap_or(&mut []);
        let len = encode_client_frame(frame, rest)?;
        self.hello_sent = true;
        Ok(hello_len + len)
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
        let start = frame_data_in_place(buf, DataKind::Stdin, len, 0)?;
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
        self.op_traffic = true;
        self.credit -= n;
        self.in_flight += n;
    }

    /// Queues `StdinEof` (sent by the next [`ClientSession::poll_transmit`]). Closing twice, or
    /// after the operation ended, is a no-op.
    pub fn close_stdin(&mut self) -> Result<(), SessionError> {
        // A put's content ends with its digest (`end_put`), never a bare EOF.
        let put = matches!(
            self.operation,
            Operation::Sent(Op::Put) | Operation::Running(Op::Put)
        );
        if self.operation == Operation::None || put {
            return Err(SessionError::InvalidState);
        }
        if self.stdin_open && !self.is_finished() {
            self.eof_queued = true;
            self.op_traffic = true;
        }
        Ok(())
    }

    /// Like [`ClientSession::handle_input`], for bytes that arrived at `now`: the agent was
    /// heard, so its liveness deadline moves on ([`ClientSession::poll_timeout`]). Call it after
    /// a read that returned bytes; a driver that re-parses what it already had uses
    /// [`ClientSession::handle_input`], or a silent agent would seem alive.
    pub fn handle_input_at<'a>(
        &mut self,
        input: &'a [u8],
        now: Micros,
    ) -> Result<Input<ClientEvent<'a>>, SessionError> {
        if !input.is_empty() {
            self.heard_at = Some(self.heard_at.map_or(now, |at| at.max(now)));
        }
        self.handle_input(input)
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
        let event = self
            .handle_frame(frame, body)
            .map_err(|err| self.fail(err))?;
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
        body: &[u8],
    ) -> Result<Option<ClientEvent<'a>>, SessionError> {
        let phase = self.phase();
        let unexpected = SessionError::Unexpected {
            frame: FrameKind::of_agent(&frame),
            phase,
        };
        let event = match (frame, phase) {
            // The agent speaks first.
            (AgentFrame::Hello(hello), Phase::Hello) if self.agent.is_none() => {
                if hello.magic != MAGIC {
                    return Err(SessionError::NotFerry);
                }
                let low = hello.min_version.max(MIN_PROTOCOL_VERSION);
                let version = hello.version.min(PROTOCOL_VERSION);
                if low > version {
                    return Err(SessionError::UnsupportedVersion {
                        chosen: hello.version,
                    });
                }
                match (hello.security, &self.secret) {
                    (Security::Authenticated, None) => return Err(SessionError::SecretRequired),
                    (Security::Insecure, Some(_)) => return Err(SessionError::AgentInsecure),
                    _ => {}
                }
                self.transcript.update(body);
                self.queue_hello_and_proof()?;
                self.authenticated = hello.security == Security::Insecure;
                // Credit opens with the window the agent announced, never beyond our own.
                self.credit = (hello.limits.stdin_window as usize).min(crate::limits::STDIN_WINDOW);
                self.agent = Some((version, hello.limits));
                ClientEvent::HelloAccepted(AgentInfo {
                    protocol_version: version,
                    agent_version: hello.agent_version,
                    limits: hello.limits,
                    security: hello.security,
                    bounds: hello.bounds,
                })
            }
            // The agent's proof answers ours; nothing about an operation is believed before it.
            (AgentFrame::Authenticated(proof), Phase::Hello | Phase::Starting)
                if self.hello_sent && !self.authenticated && self.agent.is_some() =>
            {
                let proven = self.secret.as_ref().is_some_and(|secret| {
                    secret.verify_agent_proof(&self.transcript.digest(), &self.nonce, &proof.mac.0)
                });
                if !proven {
                    return Err(SessionError::Unauthenticated);
                }
                self.authenticated = true;
                ClientEvent::Authenticated
            }
            // Nothing about an operation before the agent's proof (an error may come).
            (ref frame, _)
                if !self.authenticated
                    && self.operation != Operation::None
                    && !matches!(frame, AgentFrame::Error(_)) =>
            {
                return Err(unexpected)
            }
            (AgentFrame::Done(report), _)
                if matches!(
                    self.operation,
                    Operation::Sent(Op::JobList) | Operation::Running(Op::JobList)
                ) =>
            {
                if u64::from(report.count) != self.job_items as u64 {
                    return Err(SessionError::InvalidRequest {
                        message: "the job listing's count does not match its records",
                    });
                }
                self.operation_done();
                ClientEvent::Done(report)
            }
            (AgentFrame::Done(report), _) if self.operation == Operation::Running(Op::Attach) => {
                self.operation_done();
                ClientEvent::Done(report)
            }
            (AgentFrame::Job(job), _)
                if matches!(
                    self.operation,
                    Operation::Sent(Op::JobList) | Operation::Running(Op::JobList)
                ) =>
            {
                if self.job_items >= crate::limits::MAX_JOBS {
                    return Err(SessionError::InvalidRequest {
                        message: "too many job records",
                    });
                }
                self.job_items += 1;
                self.operation = Operation::Running(Op::JobList);
                ClientEvent::Job(job)
            }
            (AgentFrame::Detached(job), _) if self.operation == Operation::Sent(Op::Job) => {
                self.operation_done();
                ClientEvent::Detached(job)
            }
            (AgentFrame::Attached(header), _) if self.operation == Operation::Sent(Op::Attach) => {
                self.operation = Operation::Running(Op::Attach);
                self.stdin_open = header.stdin;
                self.pty = true;
                ClientEvent::Attached(header)
            }
            (AgentFrame::Exited(end), _) if self.operation == Operation::Sent(Op::Wait) => {
                self.operation_done();
                ClientEvent::Exited(end)
            }
            (AgentFrame::Done(report), _)
                if matches!(
                    self.operation,
                    Operation::Sent(Op::Simple) | Operation::Running(Op::Info)
                ) =>
            {
                // An info's `Done` counts the mounts and interfaces sent: one lost or invented
                // on the way is a broken stream, not a smaller guest.
                let counted = self.info_items as u64;
                if self.operation == Operation::Running(Op::Info)
                    && u64::from(report.count) != counted
                {
                    return Err(SessionError::InvalidRequest {
                        message: "info's count does not match its frames",
                    });
                }
                self.operation_done();
                ClientEvent::Done(report)
            }
            (AgentFrame::Started(started), _) if self.operation == Operation::Sent(Op::Exec) => {
                self.operation = Operation::Running(Op::Exec);
                ClientEvent::Started { pid: started.pid }
            }
            (AgentFrame::Stdout(output), _)
                if matches!(self.operation, Operation::Running(Op::Exec | Op::Attach)) =>
            {
                self.last_output_at = output.at_us;
                ClientEvent::Stdout(output.data.0)
            }
            (AgentFrame::Stderr(output), _)
                if matches!(self.operation, Operation::Running(Op::Exec | Op::Attach)) =>
            {
                self.last_output_at = output.at_us;
                ClientEvent::Stderr(output.data.0)
            }
            (AgentFrame::OutputDropped(dropped), _)
                if matches!(self.operation, Operation::Running(Op::Exec | Op::Attach)) =>
            {
                ClientEvent::OutputDropped(dropped)
            }
            (AgentFrame::FileReady(header), _)
                if matches!(self.operation, Operation::Sent(Op::Put | Op::Get)) =>
            {
                if let Operation::Sent(op) = self.operation {
                    self.operation = Operation::Running(op);
                }
                ClientEvent::FileReady(header)
            }
            (AgentFrame::FileData(data), _) if self.operation == Operation::Running(Op::Get) => {
                ClientEvent::FileData(data.0)
            }
            (AgentFrame::Skipped(skipped), _)
                if matches!(self.operation, Operation::Running(Op::Put | Op::Get)) =>
            {
                ClientEvent::Skipped(skipped)
            }
            (AgentFrame::FileDone(summary), _)
                if self.operation == Operation::Running(Op::Get)
                    || (self.operation == Operation::Running(Op::Put) && self.put_ended) =>
            {
                self.operation_done();
                ClientEvent::FileDone(summary)
            }
            (AgentFrame::SystemInfo(info), _) if self.operation == Operation::Sent(Op::Info) => {
                self.operation = Operation::Running(Op::Info);
                ClientEvent::SystemInfo(info)
            }
            (AgentFrame::Mount(_) | AgentFrame::Interface(_), _)
                if self.operation == Operation::Running(Op::Info)
                    && self.info_items >= crate::limits::MAX_INFO_ITEMS =>
            {
                return Err(SessionError::InvalidRequest {
                    message: "too many info frames",
                })
            }
            (AgentFrame::Mount(mount), _) if self.operation == Operation::Running(Op::Info) => {
                self.info_items += 1;
                ClientEvent::Mount(mount)
            }
            (AgentFrame::Interface(interface), _)
                if self.operation == Operation::Running(Op::Info) =>
            {
                self.info_items += 1;
                ClientEvent::Interface(interface)
            }
            (AgentFrame::ClockSet(previous), _) if self.operation == Operation::Sent(Op::Clock) => {
                self.operation_done();
                ClientEvent::ClockSet(previous)
            }
            // Proof of life, nothing more (an operation runs, the agent's proof came first).
            (AgentFrame::Keepalive, Phase::Running | Phase::Starting) if self.authenticated => {
                return Ok(None)
            }
            (AgentFrame::StdinCredit(n), _)
                if matches!(
                    self.operation,
                    Operation::Running(Op::Exec | Op::Put | Op::Attach)
                ) =>
            {
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
            (AgentFrame::Exited(end), _)
                if matches!(self.operation, Operation::Running(Op::Exec | Op::Attach)) =>
            {
                self.operation_done();
                ClientEvent::Exited(end)
            }
            // A request refused before it started (protocol 5): the connection stays.
            (AgentFrame::Error(err), Phase::Starting) if self.refusal_keeps(&err) => {
                self.operation_done();
                ClientEvent::Refused(err)
            }
            // An error may end any phase but the finished one (a busy agent says so instead of
            // its hello); it is the connection's last frame.
            (
                AgentFrame::Error(err),
                Phase::Hello | Phase::Idle | Phase::Starting | Phase::Running,
            ) => {
                self.failed = true;
                self.stdin_open = false;
                ClientEvent::Refused(err)
            }
            _ => return Err(unexpected),
        };
        Ok(Some(event))
    }

    /// Hashes our hello into the transcript and computes our proof over it.
    fn queue_hello_and_proof(&mut self) -> Result<(), SessionError> {
        let mut hello = [0u8; 32];
        let n = encode_client_frame(&ClientFrame::Hello(ClientHello::CURRENT), &mut hello)?;
        self.transcript
            .update(hello.get(HEADER_LEN..n).unwrap_or(&[]));
        let transcript = self.transcript.digest();
        self.proof = self
            .secret
            .as_ref()
            .map(|secret| secret.client_proof(&transcript, &self.nonce));
        self.hello_queued = true;
        Ok(())
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

fn invalid(err: crate::RequestError) -> SessionError {
    SessionError::InvalidRequest {
        message: err.message,
    }
}

const _: () = assert!(DATA_HEADROOM > HEADER_LEN);

/// How many keepalive intervals of silence mean the agent is gone.
const LIVENESS_INTERVALS: u64 = 3;
/// Our hello and proof, encoded.
const HELLO_AND_PROOF_MAX: usize = 128;
