//! One connection, in its own process: the hello, one exec, and the poll-driven pump between
//! the command's pipes and the socket.
//!
//! Bounded by construction: client frames are cut in place from one `MAX_FRAME` buffer; stdin is
//! held only up to the credit window; output is read only when the previous frame has been sent,
//! so a slow reader slows the command instead of growing a buffer.

use core::ops::Range;

use ferry_wire::limits::{HEADER_LEN, MAX_DATA, MAX_FRAME_BODY, MAX_MESSAGE, STDIN_WINDOW};
use ferry_wire::{
    decode_client_frame, encode_agent_frame, frame_data_in_place, split_frame, AgentFrame,
    AgentHello, ClientFrame, DataKind, ErrorCode, ErrorFrame, ExitStatus, Limits, Started,
    StdinMode, Termination, ValidExec, DATA_HEADROOM, MAGIC,
};
use rustix::event::{poll, PollFd, PollFlags};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::io::Errno;
use rustix::net::{RecvFlags, SendFlags};
use rustix::process::{Pid, Signal, WaitId, WaitIdOptions, WaitIdStatus};

use crate::clock::{monotonic_us, timeout_until};
use crate::listen::Successor;
use crate::spawn::{self, ChildFailure, ChildStdio};
use crate::sys::{self, ConnBuffers};

/// How long a client may take to send its hello and its request.
const HANDSHAKE_TIMEOUT_US: u64 = 30_000_000;
/// How long a final frame (error, termination) may wait for a client that does not read.
const FINAL_SEND_TIMEOUT_US: u64 = 30_000_000;
/// After the command exits, how long output from processes that inherited its pipes is still
/// awaited before an idle pipe is closed.
const DRAIN_GRACE_US: u64 = 200_000;
/// After the command exits, how much more output is forwarded (grace period or not) before the
/// pipes are closed and the rest is reported as dropped: what a full pipe held, with room to
/// spare, but never an endless stream.
const DRAIN_LIMIT: usize = 4 << 20;
/// Larger pipes mean fewer wake-ups per byte when a command writes fast.
const PIPE_SIZE: usize = 1 << 20;
/// Credit is returned in batches so a byte-at-a-time writer does not cost a frame per byte.
const CREDIT_BATCH: usize = STDIN_WINDOW / 4;

/// What a connection process sets up before its connection arrives, while it waits as a spare:
/// off the path a client waits on. A pipe that cannot be made now is made (or its failure
/// reported to the client) when the command starts.
pub struct Prepared {
    stdout: Option<(OwnedFd, OwnedFd)>,
    stderr: Option<(OwnedFd, OwnedFd)>,
    null: Option<OwnedFd>,
    stack: Option<sys::ChildStack>,
}

/// Prepares a connection process; exits the process if its signals cannot be set up.
pub fn prepare() -> Prepared {
    // Writing to a stdin pipe whose reader is gone must be EPIPE, not death. Our own children
    // are waited for explicitly (the listener leaves SIGCHLD ignored, which would auto-reap).
    if sys::set_signal_ignored(Signal::PIPE, true).is_err()
        || sys::set_signal_ignored(Signal::CHILD, false).is_err()
    {
        sys::exit(71)
    }
    Prepared {
        stdout: output_pipe().ok(),
        stderr: output_pipe().ok(),
        null: open_null().ok(),
        stack: sys::ChildStack::new().ok(),
    }
}

/// Serves one accepted connection and ends the process.
// Kept out of line: its large stack frame must not be probed into the caller's.
#[inline(never)]
pub fn serve(sock: OwnedFd, prepared: Prepared, mut successor: Successor) -> ! {
    let Some(buffers) = sys::take_conn_buffers() else {
        successor.release();
        sys::exit(70)
    };
    session(sock.as_fd(), buffers, prepared, &mut successor);
    sys::exit(0)
}

fn new_pipe() -> Result<(OwnedFd, OwnedFd), Errno> {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
}

/// A pipe for the command's output: large, with our (read) end non-blocking.
fn output_pipe() -> Result<(OwnedFd, OwnedFd), Errno> {
    let (read, write) = new_pipe()?;
    let _ = rustix::pipe::fcntl_setpipe_size(&write, PIPE_SIZE);
    rustix::io::ioctl_fionbio(&read, true)?;
    Ok((read, write))
}

/// A failure to report to the client before closing.
#[derive(Clone, Copy)]
struct Failure {
    code: ErrorCode,
    errno: Option<Errno>,
    message: &'static str,
}

impl Failure {
    const fn new(code: ErrorCode, message: &'static str) -> Self {
        Failure {
            code,
            errno: None,
            message,
        }
    }
    const fn os(code: ErrorCode, errno: Errno, message: &'static str) -> Self {
        Failure {
            code,
            errno: Some(errno),
            message,
        }
    }
}

/// Why a frame could not be read.
enum ReadError {
    /// The client closed the connection (or it broke).
    Closed,
    /// No whole frame arrived in time.
    TimedOut,
    /// The length prefix exceeds the limit.
    TooLarge,
}

fn session(
    sock: BorrowedFd<'_>,
    buffers: &'static mut ConnBuffers,
    prepared: Prepared,
    successor: &mut Successor,
) {
    let ConnBuffers {
        recv,
        out,
        stdin,
        argv,
        envp,
        cwd,
    } = buffers;
    let mut inbox = Inbox::new(recv);
    let mut outbox = Outbox::new(out);
    let deadline = monotonic_us() + HANDSHAKE_TIMEOUT_US;

    let started = (|| -> Result<Child, Option<Failure>> {
        let body = handshake(sock, &mut inbox, &mut outbox, deadline, successor)?;
        let valid = request(&inbox.buf[body])?;
        // The next spare is forked while our child starts, off the path the client waits on.
        start(&valid, argv, envp, cwd, prepared, || successor.release()).map_err(Some)
    })();
    successor.release();
    let child = match started {
        Ok(child) => child,
        Err(Some(failure)) => return refuse(sock, &mut outbox, failure),
        Err(None) => return,
    };
    let started = AgentFrame::Started(Started {
        pid: child.pid.as_raw_nonzero().get() as u32,
    });
    let mut pump = Pump::new(sock, inbox, outbox, stdin, child);
    if pump.outbox.put(&started).is_err() {
        pump.kill_and_reap();
        return;
    }
    pump.run();
}

/// The hello exchange, then the request frame's body. `Err(None)`: the client left (a hello
/// alone is a health check) and is owed nothing.
fn handshake(
    sock: BorrowedFd<'_>,
    inbox: &mut Inbox<'_>,
    outbox: &mut Outbox<'_>,
    deadline: u64,
    successor: &mut Successor,
) -> Result<Range<usize>, Option<Failure>> {
    let body = inbox.wait_frame(sock, deadline, successor)?;
    match decode_client_frame(&inbox.buf[body]) {
        Ok(ClientFrame::Hello(hello)) => {
            let Some(version) = hello.negotiate() else {
                let failure = Failure::new(ErrorCode::UnsupportedVersion, "no common version");
                return Err(Some(failure));
            };
            let hello = AgentFrame::Hello(AgentHello {
                magic: MAGIC,
                version,
                agent_version: crate::AGENT_VERSION,
                limits: Limits::CURRENT,
            });
            outbox.put(&hello).map_err(|_| None)?;
            // A client that sent its request right behind the hello gets the hello with the
            // answer to it: one wake-up instead of two.
            if !inbox.has_frame() {
                // A fresh socket takes a hello without blocking; should it not, the next
                // spare is not kept waiting on this client.
                outbox.flush(sock).map_err(|_| None)?;
                if !outbox.is_empty() {
                    successor.release();
                    outbox.flush_within(sock, deadline).map_err(|_| None)?;
                }
            }
        }
        Ok(_) => {
            let failure = Failure::new(ErrorCode::ProtocolViolation, "expected hello");
            return Err(Some(failure));
        }
        Err(_) => return Err(Some(Failure::new(ErrorCode::Malformed, "bad hello"))),
    }
    Ok(inbox.wait_frame(sock, deadline, successor)?)
}

/// Decodes and checks the request.
fn request(body: &[u8]) -> Result<ValidExec<'_>, Option<Failure>> {
    let exec = match decode_client_frame(body) {
        Ok(ClientFrame::Exec(exec)) => exec,
        Ok(_) => {
            let failure = Failure::new(ErrorCode::ProtocolViolation, "expected a request");
            return Err(Some(failure));
        }
        Err(_) => {
            return Err(Some(Failure::new(
                ErrorCode::Malformed,
                "bad request frame",
            )))
        }
    };
    exec.validate()
        .map_err(|err| Some(Failure::new(err.code, err.message)))
}

impl From<ReadError> for Option<Failure> {
    fn from(err: ReadError) -> Self {
        match err {
            ReadError::Closed => None,
            ReadError::TimedOut => Some(Failure::new(
                ErrorCode::ProtocolViolation,
                "handshake timed out",
            )),
            ReadError::TooLarge => Some(Failure::new(
                ErrorCode::FrameTooLarge,
                "frame exceeds the limit",
            )),
        }
    }
}

/// Sends an error frame (best effort, bounded in time); the connection closes after it.
fn refuse(sock: BorrowedFd<'_>, outbox: &mut Outbox<'_>, failure: Failure) {
    let message = &failure.message[..failure.message.len().min(MAX_MESSAGE)];
    let frame = AgentFrame::Error(ErrorFrame {
        code: failure.code,
        errno: failure.errno.map_or(0, |e| e.raw_os_error().unsigned_abs()),
        message,
    });
    if outbox.put(&frame).is_ok() {
        let _ = outbox.flush_within(sock, monotonic_us() + FINAL_SEND_TIMEOUT_US);
    }
}

/// A started command and the parent's ends of its pipes.
struct Child {
    pid: Pid,
    pidfd: OwnedFd,
    stdin: Option<OwnedFd>,
    stdout: OwnedFd,
    stderr: OwnedFd,
    started_us: u64,
}

fn resource_failure(errno: Errno) -> Failure {
    Failure::os(
        ErrorCode::ResourceExhausted,
        errno,
        "cannot create pipes or process",
    )
}

fn start<const A: usize, const E: usize>(
    valid: &ValidExec<'_>,
    argv: &mut [*const u8; A],
    envp: &mut [*const u8; E],
    cwd: &mut [u8],
    ready: Prepared,
    meanwhile: impl FnOnce(),
) -> Result<Child, Failure> {
    let inherited = (0..sys::MAX_INHERITED_ENV).map_while(sys::env_entry);
    let prepared = spawn::prepare(valid, inherited, argv, envp, cwd)
        .map_err(|e| Failure::new(e.code, e.message))?;
    // One that could not be made while waiting is made now, and its errno reported.
    let output = |pipe: Option<(OwnedFd, OwnedFd)>| match pipe {
        Some(pipe) => Ok(pipe),
        None => output_pipe().map_err(resource_failure),
    };
    let (stdout_r, stdout_w) = output(ready.stdout)?;
    let (stderr_r, stderr_w) = output(ready.stderr)?;
    let (stdin_w, stdin_r) = match valid.request().stdin {
        StdinMode::Pipe => {
            let (r, w) = new_pipe().map_err(resource_failure)?;
            rustix::io::ioctl_fionbio(&w, true).map_err(resource_failure)?;
            (Some(w), r)
        }
        StdinMode::Null => match ready.null {
            Some(null) => (None, null),
            None => (None, open_null().map_err(resource_failure)?),
        },
    };
    let mut stack = match ready.stack {
        Some(stack) => stack,
        None => sys::ChildStack::new().map_err(resource_failure)?,
    };

    let stdio = ChildStdio {
        stdin: stdin_r.as_fd(),
        stdout: stdout_w.as_fd(),
        stderr: stderr_w.as_fd(),
    };
    let failure = ChildFailure::new();
    let started_us = monotonic_us();
    let child = || spawn::exec_child(&prepared, &stdio, &failure);
    let sys::Spawned { pid, pidfd } =
        sys::spawn(&mut stack, &child, meanwhile).map_err(resource_failure)?;
    crate::set_current_command(Some(pid));
    drop((stdout_w, stderr_w, stdin_r));
    if let Some((stage, errno)) = failure.get() {
        reap(pid);
        let (code, message) = spawn::failure_code(stage, errno);
        return Err(Failure::os(code, errno, message));
    }
    Ok(Child {
        pid,
        pidfd,
        stdin: stdin_w,
        stdout: stdout_r,
        stderr: stderr_r,
        started_us,
    })
}

fn open_null() -> Result<OwnedFd, Errno> {
    use rustix::fs::{open, Mode, OFlags};
    match open(
        c"/dev/null",
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => Ok(fd),
        // No /dev/null (an empty rootfs before devtmpfs): a pipe whose writer is gone reads
        // as EOF just the same.
        Err(_) => rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map(|(r, _)| r),
    }
}

/// Waits for `pid` to end (it has been killed or has failed before exec).
fn reap(pid: Pid) {
    while let Err(Errno::INTR) =
        rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty())
    {}
    crate::set_current_command(None);
}

/// Client frames, cut in place from one buffer that holds at least one whole frame.
struct Inbox<'b> {
    buf: &'b mut [u8],
    start: usize,
    end: usize,
}

impl<'b> Inbox<'b> {
    fn new(buf: &'b mut [u8]) -> Self {
        Inbox {
            buf,
            start: 0,
            end: 0,
        }
    }

    /// Receives what the socket has without blocking; `Ok(false)` on EOF.
    fn fill(&mut self, sock: BorrowedFd<'_>) -> Result<bool, Errno> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        match rustix::net::recv(sock, &mut self.buf[self.end..], RecvFlags::DONTWAIT) {
            Ok((0, _)) => Ok(false),
            Ok((n, _)) => {
                self.end += n;
                Ok(true)
            }
            Err(Errno::AGAIN | Errno::INTR) => Ok(true),
            Err(errno) => Err(errno),
        }
    }

    /// Whether a whole frame is already buffered.
    fn has_frame(&self) -> bool {
        matches!(
            split_frame(&self.buf[self.start..self.end], MAX_FRAME_BODY),
            Ok(Some(_))
        )
    }

    /// The next whole frame's body, as a range of `buf`.
    fn next(&mut self) -> Result<Option<Range<usize>>, ReadError> {
        match split_frame(&self.buf[self.start..self.end], MAX_FRAME_BODY) {
            Ok(Some((_, used))) => {
                let body = self.start + HEADER_LEN..self.start + used;
                self.start += used;
                Ok(Some(body))
            }
            Ok(None) => Ok(None),
            Err(_) => Err(ReadError::TooLarge),
        }
    }

    /// Blocks (until `deadline_us`) for the next whole frame.
    fn wait_frame(
        &mut self,
        sock: BorrowedFd<'_>,
        deadline_us: u64,
        successor: &mut Successor,
    ) -> Result<Range<usize>, ReadError> {
        // Read before polling: a pipelining client's request is usually there already.
        let mut readable = true;
        loop {
            if let Some(body) = self.next()? {
                return Ok(body);
            }
            if !readable {
                if monotonic_us() >= deadline_us {
                    return Err(ReadError::TimedOut);
                }
                // Never keep the next client waiting on this one.
                successor.release();
                let mut fds = [PollFd::new(&sock, PollFlags::IN)];
                match poll(&mut fds, Some(&timeout_until(deadline_us))) {
                    Ok(_) | Err(Errno::INTR) => {}
                    Err(_) => return Err(ReadError::Closed),
                }
            }
            let before = self.end - self.start;
            match self.fill(sock) {
                Ok(true) => {}
                Ok(false) | Err(_) => return Err(ReadError::Closed),
            }
            // Nothing new (EAGAIN): wait for the socket next time round.
            readable = self.end - self.start != before;
        }
    }
}

/// The one frame being sent; data is read straight into it behind room for its header.
struct Outbox<'b> {
    buf: &'b mut [u8],
    start: usize,
    end: usize,
}

impl<'b> Outbox<'b> {
    fn new(buf: &'b mut [u8]) -> Self {
        Outbox {
            buf,
            start: 0,
            end: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Queues a control frame behind whatever is still unsent (a hello held back to travel
    /// with the next answer, or the rest of a partly sent frame before an error).
    fn put(&mut self, frame: &AgentFrame<'_>) -> Result<(), ferry_wire::EncodeError> {
        if self.is_empty() {
            self.clear();
        }
        let len = encode_agent_frame(frame, &mut self.buf[self.end..])?;
        self.end += len;
        Ok(())
    }

    /// Reads up to one chunk from `pipe` into a data frame. `Ok(0)` is EOF; `Err(AGAIN)` means
    /// the pipe is empty for now.
    fn read_data(&mut self, pipe: &OwnedFd, kind: DataKind) -> Result<usize, Errno> {
        let space = &mut self.buf[DATA_HEADROOM..DATA_HEADROOM + MAX_DATA];
        let n = loop {
            match rustix::io::read(pipe, &mut *space) {
                Err(Errno::INTR) => {}
                other => break other?,
            }
        };
        if n > 0 {
            // Cannot fail: n <= MAX_DATA and the buffer has DATA_HEADROOM + MAX_DATA bytes.
            self.start = frame_data_in_place(self.buf, kind, n).map_err(|_| Errno::INVAL)?;
            self.end = DATA_HEADROOM + n;
        }
        Ok(n)
    }

    /// Sends what it can without blocking.
    fn flush(&mut self, sock: BorrowedFd<'_>) -> Result<(), Errno> {
        while !self.is_empty() {
            let flags = SendFlags::DONTWAIT | SendFlags::NOSIGNAL;
            match rustix::net::send(sock, &self.buf[self.start..self.end], flags) {
                Ok(n) => self.start += n,
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => return Ok(()),
                Err(errno) => return Err(errno),
            }
        }
        self.clear();
        Ok(())
    }

    /// Sends everything, waiting for the socket until `deadline_us`.
    fn flush_within(&mut self, sock: BorrowedFd<'_>, deadline_us: u64) -> Result<(), Errno> {
        loop {
            self.flush(sock)?;
            if self.is_empty() {
                return Ok(());
            }
            if monotonic_us() >= deadline_us {
                return Err(Errno::TIMEDOUT);
            }
            let mut fds = [PollFd::new(&sock, PollFlags::OUT)];
            match poll(&mut fds, Some(&timeout_until(deadline_us))) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(errno) => return Err(errno),
            }
        }
    }
}

/// How the pump ended.
enum PumpEnd {
    /// The command ended and all its output was forwarded (or accounted as dropped).
    Finished,
    /// The client went away.
    Disconnected,
    /// The client broke the protocol.
    Violation(Failure),
}

/// Moves bytes between the socket and the command until the command is done and drained.
struct Pump<'s, 'b> {
    sock: BorrowedFd<'s>,
    inbox: Inbox<'b>,
    outbox: Outbox<'b>,
    stdin_buf: &'b mut [u8],
    stdin_head: usize,
    stdin_tail: usize,
    /// Whether the command was given a stdin pipe at all.
    stdin_piped: bool,
    stdin: Option<OwnedFd>,
    stdin_eof: bool,
    /// Stdin bytes received and not yet credited back.
    outstanding: usize,
    /// Stdin bytes consumed (written or discarded) and not yet credited back.
    credit_owed: usize,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    stdout_ready: bool,
    stderr_ready: bool,
    prefer_stderr: bool,
    pid: Pid,
    pidfd: Option<OwnedFd>,
    started_us: u64,
    exit: Option<(ExitStatus, u64)>,
    /// Past the post-exit grace period: idle pipes are closed.
    draining: bool,
    drained_bytes: usize,
    dropped: bool,
    retired: Retired,
}

/// Descriptors that are done with (a pipe at EOF, a reaped pidfd), closed when the connection
/// ends rather than on the way to the termination record: each `close` is a syscall the
/// client would wait for.
#[derive(Default)]
struct Retired([Option<OwnedFd>; 3]);

impl Retired {
    fn keep(&mut self, fd: Option<OwnedFd>) {
        if let Some(slot) = self.0.iter_mut().find(|slot| slot.is_none()) {
            *slot = fd;
        }
    }
}

impl<'s, 'b> Pump<'s, 'b> {
    fn new(
        sock: BorrowedFd<'s>,
        inbox: Inbox<'b>,
        outbox: Outbox<'b>,
        stdin_buf: &'b mut [u8],
        child: Child,
    ) -> Self {
        Pump {
            sock,
            inbox,
            outbox,
            stdin_buf,
            stdin_head: 0,
            stdin_tail: 0,
            stdin_piped: child.stdin.is_some(),
            stdin: child.stdin,
            stdin_eof: false,
            outstanding: 0,
            credit_owed: 0,
            stdout: Some(child.stdout),
            stderr: Some(child.stderr),
            stdout_ready: false,
            stderr_ready: false,
            prefer_stderr: false,
            pid: child.pid,
            pidfd: Some(child.pidfd),
            started_us: child.started_us,
            exit: None,
            draining: false,
            drained_bytes: 0,
            dropped: false,
            retired: Retired::default(),
        }
    }

    fn run(&mut self) {
        match self.pump() {
            PumpEnd::Finished => {
                let Some((status, ended_us)) = self.exit else {
                    return;
                };
                let frame = AgentFrame::Exited(Termination {
                    status,
                    duration_us: ended_us.saturating_sub(self.started_us),
                    output_dropped: self.dropped,
                });
                let deadline = monotonic_us() + FINAL_SEND_TIMEOUT_US;
                // The outbox is empty here (`pump` finishes only then).
                if self.outbox.put(&frame).is_ok() {
                    let _ = self.outbox.flush_within(self.sock, deadline);
                }
                crate::set_current_command(None);
            }
            PumpEnd::Disconnected => self.kill_and_reap(),
            PumpEnd::Violation(failure) => {
                self.kill_and_reap();
                refuse(self.sock, &mut self.outbox, failure);
            }
        }
    }

    /// Kills the command's whole process group and waits for the command itself; the rest of
    /// the group is reaped by the listener (a subreaper, or PID 1).
    fn kill_and_reap(&mut self) {
        let _ = rustix::process::kill_process_group(self.pid, Signal::KILL);
        if self.exit.is_none() {
            reap(self.pid);
        }
        crate::set_current_command(None);
    }

    fn pump(&mut self) -> PumpEnd {
        if let Err(end) = self.handle_frames() {
            return end;
        }
        loop {
            if self.outbox.is_empty() {
                if let Err(end) = self.fill_outbox() {
                    return end;
                }
            }
            if self.outbox.flush(self.sock).is_err() {
                return PumpEnd::Disconnected;
            }
            if self.exit.is_some()
                && self.stdout.is_none()
                && self.stderr.is_none()
                && self.outbox.is_empty()
            {
                return PumpEnd::Finished;
            }
            if let Err(end) = self.wait_and_handle() {
                return end;
            }
        }
    }

    /// Puts the next frame in the empty outbox: owed credit first, then output.
    fn fill_outbox(&mut self) -> Result<(), PumpEnd> {
        let buffered = self.stdin_tail - self.stdin_head;
        if self.credit_owed >= CREDIT_BATCH || (self.credit_owed > 0 && buffered == 0) {
            let credit = self.credit_owed as u32;
            let _ = self.outbox.put(&AgentFrame::StdinCredit(credit));
            self.outstanding -= self.credit_owed;
            self.credit_owed = 0;
            return Ok(());
        }
        let order = if self.prefer_stderr {
            [DataKind::Stderr, DataKind::Stdout]
        } else {
            [DataKind::Stdout, DataKind::Stderr]
        };
        for kind in order {
            let (pipe, ready) = match kind {
                DataKind::Stderr => (&mut self.stderr, &mut self.stderr_ready),
                _ => (&mut self.stdout, &mut self.stdout_ready),
            };
            let Some(fd) = pipe.as_ref() else { continue };
            if !*ready && !self.draining {
                continue;
            }
            match self.outbox.read_data(fd, kind) {
                Ok(0) => self.retired.keep(pipe.take()),
                Ok(n) => {
                    self.prefer_stderr = kind == DataKind::Stdout;
                    if self.exit.is_some() {
                        self.drained_bytes += n;
                        if self.drained_bytes > DRAIN_LIMIT {
                            // Someone keeps the pipes busy long after the command ended.
                            self.dropped = true;
                            self.stdout = None;
                            self.stderr = None;
                        }
                    }
                    return Ok(());
                }
                Err(Errno::AGAIN) => {
                    *ready = false;
                    if self.draining {
                        *pipe = None;
                    }
                }
                Err(_) => *pipe = None,
            }
        }
        Ok(())
    }

    fn wait_and_handle(&mut self) -> Result<(), PumpEnd> {
        const SOCK: usize = 0;
        let mut slots = [usize::MAX; 5];
        let mut fds: [PollFd<'_>; 5] =
            core::array::from_fn(|_| PollFd::new(&self.sock, PollFlags::empty()));
        let mut n = 0;
        let sock_flags = if self.outbox.is_empty() {
            PollFlags::IN
        } else {
            PollFlags::IN | PollFlags::OUT
        };
        fds[n] = PollFd::new(&self.sock, sock_flags);
        slots[n] = SOCK;
        n += 1;
        let output_wanted = self.outbox.is_empty();
        for (slot, fd, flags) in [
            (
                1,
                self.stdout.as_ref().filter(|_| output_wanted),
                PollFlags::IN,
            ),
            (
                2,
                self.stderr.as_ref().filter(|_| output_wanted),
                PollFlags::IN,
            ),
            (
                3,
                self.stdin
                    .as_ref()
                    .filter(|_| self.stdin_tail > self.stdin_head),
                PollFlags::OUT,
            ),
            (4, self.pidfd.as_ref(), PollFlags::IN),
        ] {
            if let Some(fd) = fd {
                fds[n] = PollFd::new(fd, flags);
                slots[n] = slot;
                n += 1;
            }
        }
        let timeout = match self.exit {
            Some((_, ended_us)) if !self.draining => Some(timeout_until(ended_us + DRAIN_GRACE_US)),
            _ => None,
        };
        match poll(&mut fds[..n], timeout.as_ref()) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(_) => return Err(PumpEnd::Disconnected),
        }
        let mut ready = [PollFlags::empty(); 5];
        for i in 0..n {
            ready[slots[i]] = fds[i].revents();
        }

        let any = PollFlags::IN | PollFlags::HUP | PollFlags::ERR;
        if ready[1].intersects(any) {
            self.stdout_ready = true;
        }
        if ready[2].intersects(any) {
            self.stderr_ready = true;
        }
        if ready[4].intersects(any) {
            self.collect_exit();
        }
        if !ready[3].is_empty() {
            self.write_stdin();
        }
        if ready[SOCK].intersects(any) {
            self.receive()?;
        }
        if let Some((_, ended_us)) = self.exit {
            if monotonic_us() >= ended_us + DRAIN_GRACE_US {
                self.draining = true;
            }
        }
        Ok(())
    }

    fn collect_exit(&mut self) {
        let Some(pidfd) = self.pidfd.as_ref() else {
            return;
        };
        let status = rustix::process::waitid(
            WaitId::PidFd(pidfd.as_fd()),
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
        );
        let Ok(Some(status)) = status else { return };
        self.exit = Some((exit_status(&status), monotonic_us()));
        self.retired.keep(self.pidfd.take());
        crate::set_current_command(None);
        // Nobody is left to read stdin that matters: discard it and free the client's credit.
        self.close_stdin_discarding();
    }

    fn close_stdin_discarding(&mut self) {
        self.credit_owed += self.stdin_tail - self.stdin_head;
        self.stdin_head = 0;
        self.stdin_tail = 0;
        self.stdin = None;
    }

    fn write_stdin(&mut self) {
        let Some(fd) = self.stdin.as_ref() else {
            return;
        };
        match rustix::io::write(fd, &self.stdin_buf[self.stdin_head..self.stdin_tail]) {
            Ok(n) => {
                self.stdin_head += n;
                self.credit_owed += n;
                if self.stdin_head == self.stdin_tail {
                    self.stdin_head = 0;
                    self.stdin_tail = 0;
                    if self.stdin_eof {
                        self.stdin = None;
                    }
                }
            }
            Err(Errno::AGAIN | Errno::INTR) => {}
            // EPIPE: the command closed its stdin. Whatever was left will never be read.
            Err(_) => self.close_stdin_discarding(),
        }
    }

    fn receive(&mut self) -> Result<(), PumpEnd> {
        match self.inbox.fill(self.sock) {
            Ok(true) => {}
            Ok(false) | Err(_) => return Err(PumpEnd::Disconnected),
        }
        self.handle_frames()
    }

    /// Handles every whole frame in the inbox (some may have arrived with the request).
    fn handle_frames(&mut self) -> Result<(), PumpEnd> {
        loop {
            let body = match self.inbox.next() {
                Ok(Some(body)) => body,
                Ok(None) => return Ok(()),
                Err(_) => {
                    let failure = Failure::new(ErrorCode::FrameTooLarge, "frame exceeds the limit");
                    return Err(PumpEnd::Violation(failure));
                }
            };
            let frame = match decode_client_frame(&self.inbox.buf[body]) {
                Ok(frame) => frame,
                Err(_) => {
                    let failure = Failure::new(ErrorCode::Malformed, "bad frame");
                    return Err(PumpEnd::Violation(failure));
                }
            };
            match frame {
                ClientFrame::Stdin(data) if self.stdin_piped && !self.stdin_eof => {
                    let data = data.0;
                    if self.outstanding + data.len() > STDIN_WINDOW {
                        let failure =
                            Failure::new(ErrorCode::ProtocolViolation, "stdin beyond credit");
                        return Err(PumpEnd::Violation(failure));
                    }
                    self.outstanding += data.len();
                    if self.stdin.is_none() {
                        self.credit_owed += data.len();
                        continue;
                    }
                    if self.stdin_tail + data.len() > self.stdin_buf.len() {
                        self.stdin_buf
                            .copy_within(self.stdin_head..self.stdin_tail, 0);
                        self.stdin_tail -= self.stdin_head;
                        self.stdin_head = 0;
                    }
                    // Fits: buffered bytes never exceed outstanding credit <= STDIN_WINDOW.
                    let Some(dest) = self
                        .stdin_buf
                        .get_mut(self.stdin_tail..self.stdin_tail + data.len())
                    else {
                        let failure = Failure::new(ErrorCode::Internal, "stdin accounting");
                        return Err(PumpEnd::Violation(failure));
                    };
                    dest.copy_from_slice(data);
                    self.stdin_tail += data.len();
                }
                ClientFrame::StdinEof if self.stdin_piped && !self.stdin_eof => {
                    self.stdin_eof = true;
                    if self.stdin_tail == self.stdin_head {
                        self.stdin = None;
                    }
                }
                _ => {
                    let failure = Failure::new(ErrorCode::ProtocolViolation, "unexpected frame");
                    return Err(PumpEnd::Violation(failure));
                }
            }
        }
    }
}

fn exit_status(status: &WaitIdStatus) -> ExitStatus {
    if let Some(code) = status.exit_status() {
        return ExitStatus::Code(code as u8);
    }
    ExitStatus::Signal {
        number: status.terminating_signal().unwrap_or(0) as u8,
        core_dumped: status.dumped(),
    }
}
