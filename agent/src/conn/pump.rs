//! The running command: a `poll` loop that moves bytes between the socket, the command's pipes
//! and the session, until the session has its last frame.
//!
//! Bounded by construction: stdin is held only within the credit the session grants; output is
//! read only when the previous frame has been sent, so a slow reader slows the command instead
//! of growing a buffer. When to read, close and finish is the session's to say
//! ([`AgentSession::output_phase`], its deadlines, its credit).

use ferry_wire::limits::MAX_DATA;
use ferry_wire::session::{AgentEvent, AgentSession, OutputPhase, Refusal};
use ferry_wire::{DataKind, ErrorCode};
use rustix::event::{poll, PollFd, PollFlags};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::io::Errno;
use rustix::process::{Pid, WaitId, WaitIdOptions};

use super::io::{Link, Output, Received};
use super::start::{self, Child, RunLimits};
use super::End;
use crate::cgroup::TreeKill;
use crate::{clock, crash};

/// Descriptors that are done with (a pipe at EOF, a reaped pidfd), closed after the final
/// frame rather than on the way to it: each `close` is a syscall the client would wait for.
pub type Retired = heapless::Vec<OwnedFd, 3>;

/// Runs `child` to its end (or the client's); returns what is left to do, and the descriptors
/// to close once it is done.
pub fn run(
    link: &mut Link<'_, '_>,
    session: &mut AgentSession,
    child: Child,
    stdin_buf: &mut [u8],
) -> (End, Retired) {
    let mut pump = Pump {
        link,
        session,
        stdin: StdinPipe::new(child.stdin, stdin_buf),
        stdout: OutputPipe::new(child.stdout),
        stderr: OutputPipe {
            fd: child.stderr,
            ready: false,
        },
        prefer_stderr: false,
        pid: child.pid,
        pidfd: Some(child.pidfd),
        exited: false,
        retired: Retired::new(),
        limits: child.limits,
        forwarded: 0,
        limit_killed: false,
        tree_kill: None,
    };
    let end = pump.run();
    (end, pump.retired)
}

/// Moves bytes between the socket and the command until the session has its last frame.
struct Pump<'l, 's, 'b> {
    link: &'l mut Link<'s, 'b>,
    session: &'l mut AgentSession,
    stdin: StdinPipe<'l>,
    stdout: OutputPipe,
    stderr: OutputPipe,
    /// The pipes take turns, so neither starves the other.
    prefer_stderr: bool,
    pid: Pid,
    /// `None` once the command is reaped.
    pidfd: Option<OwnedFd>,
    exited: bool,
    retired: Retired,
    /// The policy's runtime and output limits.
    limits: RunLimits,
    /// Output bytes framed so far, stdout and stderr together.
    forwarded: u64,
    /// The command's group was killed for passing a limit.
    limit_killed: bool,
    /// How the command's tree was killed, if it was.
    // NOTE: the termination record reports it (cgroup / process group) once the wire carries
    // it; until then it is only recorded here.
    #[allow(dead_code)]
    tree_kill: Option<TreeKill>,
}

/// One of the command's output pipes.
struct OutputPipe {
    /// `None` once closed.
    fd: Option<OwnedFd>,
    /// `poll` said it is readable (or hung up) since the last read found it empty.
    ready: bool,
}

impl OutputPipe {
    fn new(fd: OwnedFd) -> Self {
        OutputPipe {
            fd: Some(fd),
            ready: false,
        }
    }
}

/// The descriptors the pump may wait on: `poll`'s answers are read back by slot, never by
/// position in the poll set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Socket,
    Stdout,
    Stderr,
    Stdin,
    Pidfd,
}

impl Slot {
    const COUNT: usize = 5;
}

/// The poll set: each descriptor with its slot.
struct PollSet<'a> {
    fds: heapless::Vec<PollFd<'a>, { Slot::COUNT }>,
    slots: heapless::Vec<Slot, { Slot::COUNT }>,
}

/// What `poll` reported, by slot.
struct Events(heapless::Vec<(Slot, PollFlags), { Slot::COUNT }>);

impl<'a> PollSet<'a> {
    fn new() -> Self {
        PollSet {
            fds: heapless::Vec::new(),
            slots: heapless::Vec::new(),
        }
    }

    /// Waits for `flags` on `fd` (when there is one) as `slot`.
    fn add(&mut self, slot: Slot, fd: Option<BorrowedFd<'a>>, flags: PollFlags) {
        let Some(fd) = fd else { return };
        // Never full: there is one place per slot, and each slot is added once.
        if self.slots.push(slot).is_ok() {
            let _ = self.fds.push(PollFd::from_borrowed_fd(fd, flags));
        }
    }

    /// Blocks until something is ready, a signal arrives, or `deadline` passes.
    fn poll(mut self, deadline: Option<u64>) -> Result<Events, Errno> {
        let timeout = deadline.map(clock::timeout_until);
        match poll(&mut self.fds, timeout.as_ref()) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(errno) => return Err(errno),
        }
        let mut events = heapless::Vec::new();
        for (slot, fd) in self.slots.iter().zip(&self.fds) {
            let _ = events.push((*slot, fd.revents()));
        }
        Ok(Events(events))
    }
}

impl Events {
    fn of(&self, slot: Slot) -> PollFlags {
        self.0
            .iter()
            .find(|(s, _)| *s == slot)
            .map_or(PollFlags::empty(), |(_, flags)| *flags)
    }
}

/// Readable, or at EOF, or failed: a read will not block.
const READABLE: PollFlags = PollFlags::IN.union(PollFlags::HUP).union(PollFlags::ERR);

impl Pump<'_, '_, '_> {
    fn run(&mut self) -> End {
        // Frames that arrived with the request.
        if let Err(end) = self.handle_frames() {
            return end;
        }
        loop {
            if !self.link.outbox.refill(self.session) {
                self.read_output();
            }
            if self.link.flush().is_err() {
                return self.kill(End::ClientGone);
            }
            let pipes_done = self.stdout.fd.is_none() && self.stderr.fd.is_none();
            if self.exited && pipes_done && self.link.outbox.is_empty() {
                return match self.session.finish(clock::monotonic_us()) {
                    Ok(()) => End::Closing,
                    Err(_) => End::ClientGone,
                };
            }
            if let Err(end) = self.wait_and_handle() {
                return end;
            }
        }
    }

    /// Kills the command (see [`start::kill`]); `end` is how the pump ends.
    fn kill(&mut self, end: End) -> End {
        self.tree_kill = Some(start::kill(self.pid, self.exited));
        end
    }

    /// Reads the next output chunk into the empty outbox, as the session's output phase allows.
    fn read_output(&mut self) {
        let now = clock::monotonic_us();
        let phase = self.session.output_phase(now);
        if phase == OutputPhase::Closed {
            self.close_output();
            return;
        }
        let draining = phase == OutputPhase::Drain;
        let order = if self.prefer_stderr {
            [DataKind::Stderr, DataKind::Stdout]
        } else {
            [DataKind::Stdout, DataKind::Stderr]
        };
        // Within the output limit, a read takes at most what is left of it; at the limit, one
        // more byte is one too many ("exactly at the limit" completes normally).
        let left = self
            .limits
            .max_output
            .map(|max| max.saturating_sub(self.forwarded));
        for kind in order {
            let pipe = match kind {
                DataKind::Stderr => &mut self.stderr,
                _ => &mut self.stdout,
            };
            let Some(fd) = pipe.fd.as_ref() else { continue };
            if !pipe.ready && !draining {
                continue;
            }
            let output = match left {
                Some(0) => read_one_byte(fd.as_fd()),
                _ => {
                    let at_most = left.map_or(MAX_DATA, |n| usize::try_from(n).unwrap_or(MAX_DATA));
                    self.link
                        .outbox
                        .read_output(fd.as_fd(), kind, self.session, at_most)
                }
            };
            match output {
                // A byte past the limit (read and dropped, not framed).
                Output::Framed(_) if left == Some(0) => {
                    self.output_limit_passed();
                    return;
                }
                Output::Framed(n) => {
                    self.forwarded = self.forwarded.saturating_add(n as u64);
                    self.prefer_stderr = kind == DataKind::Stdout;
                    // That chunk may have crossed the drain limit.
                    if self.session.output_phase(now) == OutputPhase::Closed {
                        self.close_output();
                    }
                    return;
                }
                Output::Eof => {
                    if let Some(fd) = pipe.fd.take() {
                        let _ = self.retired.push(fd);
                    }
                }
                Output::Empty => {
                    pipe.ready = false;
                    if draining {
                        pipe.fd = None;
                    }
                }
                Output::Failed => {
                    pipe.fd = None;
                    self.session.note_output_dropped();
                }
            }
        }
    }

    /// The command wrote more than the output limit: nothing more is forwarded, its group is
    /// killed, and the termination record says output was dropped.
    fn output_limit_passed(&mut self) {
        self.session.note_output_dropped();
        // Killed before its pipes close: a command still writing dies of SIGKILL, never of a
        // SIGPIPE that raced the kill (that made the status flaky).
        self.kill_for_limit();
        self.close_output();
    }

    /// Kills the command's group for passing a limit; its end is reported as usual (the
    /// status shows SIGKILL). Also after the command exited: what is left of its group may be
    /// what keeps writing.
    fn kill_for_limit(&mut self) {
        if !self.limit_killed {
            self.tree_kill = Some(start::kill_tree(self.pid));
            self.limit_killed = true;
            // NOTE: the termination record's "killed by a limit" (timed out / output limit)
            // flag is set here once the wire carries it.
        }
    }

    /// Closes both output pipes (what they still hold is the session's to report as dropped).
    fn close_output(&mut self) {
        self.stdout.fd = None;
        self.stderr.fd = None;
    }

    fn wait_and_handle(&mut self) -> Result<(), End> {
        // Output is read only into an empty outbox: one frame in flight.
        let output_wanted = self.link.outbox.is_empty();
        let socket = if output_wanted {
            PollFlags::IN
        } else {
            PollFlags::IN | PollFlags::OUT
        };
        let stdout = self.stdout.fd.as_ref().filter(|_| output_wanted);
        let stderr = self.stderr.fd.as_ref().filter(|_| output_wanted);
        let stdin = self.stdin.fd.as_ref().filter(|_| self.stdin.buffered() > 0);
        // The command's runtime limit, while it runs and has not been killed for a limit yet.
        let runtime_deadline = self
            .limits
            .deadline_us
            .filter(|_| !self.exited && !self.limit_killed);
        let deadline = match (self.session.poll_timeout(), runtime_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut set = PollSet::new();
        set.add(Slot::Socket, Some(self.link.sock), socket);
        set.add(Slot::Stdout, stdout.map(AsFd::as_fd), PollFlags::IN);
        set.add(Slot::Stderr, stderr.map(AsFd::as_fd), PollFlags::IN);
        set.add(Slot::Stdin, stdin.map(AsFd::as_fd), PollFlags::OUT);
        set.add(
            Slot::Pidfd,
            self.pidfd.as_ref().map(AsFd::as_fd),
            PollFlags::IN,
        );
        let Ok(events) = set.poll(deadline) else {
            return Err(self.kill(End::ClientGone));
        };

        if events.of(Slot::Stdout).intersects(READABLE) {
            self.stdout.ready = true;
        }
        if events.of(Slot::Stderr).intersects(READABLE) {
            self.stderr.ready = true;
        }
        if events.of(Slot::Pidfd).intersects(READABLE) {
            self.collect_exit();
        }
        if !events.of(Slot::Stdin).is_empty() {
            self.write_stdin();
        }
        if events.of(Slot::Socket).intersects(READABLE) {
            self.receive()?;
        }
        if deadline.is_some() {
            let now = clock::monotonic_us();
            if !self.exited && runtime_deadline.is_some_and(|at| now >= at) {
                // Ran too long: its end (SIGKILL) comes through the pidfd like any other.
                self.kill_for_limit();
            }
            let _ = self.session.handle_timeout(now);
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
        let _ = self
            .session
            .child_exited(start::exit_status(&status), clock::monotonic_us());
        self.exited = true;
        if let Some(pidfd) = self.pidfd.take() {
            let _ = self.retired.push(pidfd);
        }
        crash::set_current_command(None);
        // Nobody is left to read stdin.
        self.discard_stdin();
    }

    fn write_stdin(&mut self) {
        match self.stdin.write() {
            Ok(n) => {
                self.session.stdin_consumed(n);
                self.close_stdin_if_done();
            }
            Err(Errno::AGAIN | Errno::INTR) => {}
            // EPIPE: the command closed its stdin. Whatever was left will never be read.
            Err(_) => self.discard_stdin(),
        }
    }

    /// Closes stdin once everything buffered is written and the client has ended it.
    fn close_stdin_if_done(&mut self) {
        if self.stdin.buffered() == 0 && !self.session.stdin_open() {
            self.stdin.close();
        }
    }

    /// Closes stdin, discarding what is buffered and returning its credit.
    fn discard_stdin(&mut self) {
        let discarded = self.stdin.close();
        self.session.stdin_consumed(discarded);
    }

    fn receive(&mut self) -> Result<(), End> {
        match self.link.receive() {
            Received::Data => self.handle_frames(),
            Received::Nothing => Ok(()),
            // Any end of the client's stream before the final frame is a disconnect, a
            // half-close after stdin's end included (see `AgentSession::handle_eof`): the
            // command's group is killed, even if only its output was left to send.
            Received::Closed => {
                let _ = self.session.handle_eof();
                Err(self.kill(End::ClientGone))
            }
        }
    }

    /// Hands every whole buffered frame to the session, and does what it says.
    fn handle_frames(&mut self) -> Result<(), End> {
        let now = clock::monotonic_us();
        loop {
            let Ok(input) = self.session.handle_input(self.link.inbox.data(), now) else {
                // A breach: the session queued the error frame.
                return Err(self.kill(End::Closing));
            };
            let consumed = input.consumed;
            match input.event {
                None if consumed == 0 => return Ok(()),
                Some(AgentEvent::Stdin(data)) => {
                    if self.stdin.fd.is_none() {
                        // Nobody reads it: its credit goes straight back.
                        self.session.stdin_consumed(data.len());
                    } else if !self.stdin.push(data) {
                        // Within credit it always fits: the accounting is broken.
                        let refusal = Refusal::new(ErrorCode::Internal, "stdin accounting");
                        let _ = self.session.refuse(refusal, now);
                        return Err(self.kill(End::Closing));
                    }
                }
                Some(AgentEvent::StdinEof) => self.close_stdin_if_done(),
                // NOTE: protocol v3's controls; the pump acts on them in the next step (issue
                // 10). Until then they are accepted and ignored.
                Some(AgentEvent::Signal(_) | AgentEvent::Resize(_) | AgentEvent::Cancel { .. }) => {
                }
                // The session takes the handshake and a request only before the command,
                // and refuses them here.
                None
                | Some(
                    AgentEvent::Hello
                    | AgentEvent::Authenticated
                    | AgentEvent::Exec(_)
                    | AgentEvent::KillAll
                    | AgentEvent::ExecPart { .. },
                ) => {}
            }
            self.link.inbox.consume(consumed);
        }
    }
}

/// Reads one byte from an output pipe at the output limit, to tell "exactly at the limit"
/// from "past it": the byte is dropped (`Framed(1)` means it was there; nothing is framed).
fn read_one_byte(pipe: BorrowedFd<'_>) -> Output {
    let mut byte = [0u8; 1];
    loop {
        match rustix::io::read(pipe, &mut byte) {
            // EIO: a terminal's master without a slave (see `Outbox::read_output`).
            Ok(0) | Err(Errno::IO) => return Output::Eof,
            Ok(_) => return Output::Framed(1),
            Err(Errno::INTR) => {}
            Err(Errno::AGAIN) => return Output::Empty,
            Err(_) => return Output::Failed,
        }
    }
}

/// The command's stdin pipe and the bytes on their way to it.
struct StdinPipe<'b> {
    /// `None` when the command has no stdin pipe, or it was closed.
    fd: Option<OwnedFd>,
    buf: &'b mut [u8],
    /// `buf[head..tail]` is buffered.
    head: usize,
    tail: usize,
}

impl<'b> StdinPipe<'b> {
    fn new(fd: Option<OwnedFd>, buf: &'b mut [u8]) -> Self {
        StdinPipe {
            fd,
            buf,
            head: 0,
            tail: 0,
        }
    }

    fn buffered(&self) -> usize {
        self.tail.saturating_sub(self.head)
    }

    /// Buffers `data`; `false` when it does not fit.
    fn push(&mut self, data: &[u8]) -> bool {
        if self.buf.len().saturating_sub(self.tail) < data.len() {
            self.compact();
        }
        let end = self.tail.saturating_add(data.len());
        let Some(dest) = self.buf.get_mut(self.tail..end) else {
            return false;
        };
        dest.copy_from_slice(data);
        self.tail = end;
        true
    }

    /// Moves what is buffered to the front.
    fn compact(&mut self) {
        if let Some(pending) = self.buf.get(self.head..self.tail) {
            let len = pending.len();
            self.buf.copy_within(self.head..self.tail, 0);
            self.head = 0;
            self.tail = len;
        }
    }

    /// Writes what is buffered (without blocking); returns how much went.
    fn write(&mut self) -> Result<usize, Errno> {
        let (Some(fd), Some(pending)) = (self.fd.as_ref(), self.buf.get(self.head..self.tail))
        else {
            return Ok(0);
        };
        let n = rustix::io::write(fd, pending)?.min(pending.len());
        self.head += n;
        if self.head == self.tail {
            self.head = 0;
            self.tail = 0;
        }
        Ok(n)
    }

    /// Closes the pipe; returns how many buffered bytes were discarded.
    fn close(&mut self) -> usize {
        let discarded = self.buffered();
        self.head = 0;
        self.tail = 0;
        self.fd = None;
        discarded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe() -> (OwnedFd, OwnedFd) {
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap()
    }

    #[test]
    fn stdin_buffers_up_to_its_size_compacting_as_needed() {
        let (read, write) = pipe();
        let mut buf = [0u8; 8];
        let mut stdin = StdinPipe::new(Some(write), &mut buf);
        assert!(stdin.push(b"abcdef"));
        assert!(!stdin.push(b"ghi"), "9 bytes do not fit 8");
        assert_eq!(stdin.write(), Ok(6));
        assert_eq!(stdin.buffered(), 0);
        assert!(stdin.push(b"abcde"));
        let mut got = [0u8; 16];
        assert_eq!(rustix::io::read(&read, &mut got[..4]), Ok(4));
        // Half written: the rest moves to the front to make room.
        stdin.head = 2;
        assert!(stdin.push(b"xyzuv"));
        assert_eq!(stdin.buffered(), 8);
        assert_eq!(stdin.write(), Ok(8));
        let n = rustix::io::read(&read, &mut got).unwrap();
        assert_eq!(&got[..n], b"efcdexyzuv");
        assert!(stdin.push(b""));
        assert_eq!(stdin.close(), 0);
        assert!(stdin.fd.is_none());
    }

    #[test]
    fn closing_stdin_discards_what_is_buffered() {
        let (_read, write) = pipe();
        let mut buf = [0u8; 8];
        let mut stdin = StdinPipe::new(Some(write), &mut buf);
        assert!(stdin.push(b"abc"));
        assert_eq!(stdin.close(), 3);
        assert_eq!(stdin.buffered(), 0);
        assert_eq!(stdin.write(), Ok(0), "nothing to write to");
    }

    #[test]
    fn poll_answers_come_back_by_slot() {
        let (read, write) = pipe();
        let (idle, _idle_write) = pipe();
        rustix::io::write(&write, b"x").unwrap();
        let mut set = PollSet::new();
        set.add(Slot::Stdout, None, PollFlags::IN);
        set.add(Slot::Stderr, Some(idle.as_fd()), PollFlags::IN);
        set.add(Slot::Pidfd, Some(read.as_fd()), PollFlags::IN);
        let events = set.poll(Some(0)).unwrap();
        assert!(events.of(Slot::Pidfd).contains(PollFlags::IN));
        assert!(events.of(Slot::Stderr).is_empty());
        assert!(events.of(Slot::Stdout).is_empty(), "not polled");
        assert!(events.of(Slot::Socket).is_empty(), "not polled");
    }
}
