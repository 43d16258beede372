//! The running command: a `poll` loop that moves bytes between the socket, the command's pipes
//! and the session, until the session has its last frame; and what ends a command early (a
//! timeout, a cancel, the policy's limits, a client that is gone).
//!
//! Bounded by construction: stdin is held only within the credit the session grants; output is
//! read only when the previous frame has been sent, so a slow reader slows the command instead
//! of growing a buffer; past a stream's head (its cap, see `cap`) output goes into a fixed ring
//! instead. When to read, close and finish is the session's to say
//! ([`AgentSession::output_phase`], its deadlines, its credit).
//!
//! Ending a tree: a timeout or a cancel sends SIGTERM to the whole tree ([`cgroup::terminate_tree`])
//! and SIGKILL ([`cgroup::kill_tree`]) once the grace is over, unless nothing of the tree is left
//! by then; the record's `ending` says which came first. The policy's limits and a client that
//! is gone kill at once.

use ferry_wire::limits::MAX_DATA;
use ferry_wire::session::{AgentEvent, AgentSession, EndFacts, OutputPhase, Refusal};
use ferry_wire::{DataKind, Ending, ErrorCode, Stream, TreeKill, WindowSize};
use rustix::event::{poll, PollFd, PollFlags};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::io::Errno;
use rustix::process::{Pid, WaitId, WaitIdOptions};

use super::cap::{Cap, Next, Ring};
use super::io::{read_pipe, Link, Output, Received};
use super::start::{self, Child, RunLimits};
use super::End;
use crate::{cgroup, clock, crash, pty};

/// Descriptors that are done with (a pipe at EOF, a reaped pidfd), closed after the final
/// frame rather than on the way to it: each `close` is a syscall the client would wait for.
pub type Retired = heapless::Vec<OwnedFd, 3>;

/// The connection's buffers the pump works in.
pub struct Buffers<'b> {
    /// Stdin on its way to the command: the credit window.
    pub stdin: &'b mut [u8],
    /// The tails of stdout and stderr past their caps.
    pub stdout_tail: &'b mut Ring,
    pub stderr_tail: &'b mut Ring,
}

/// Runs `child` to its end (or the client's); returns what is left to do, and the descriptors
/// to close once it is done.
pub fn run(
    link: &mut Link<'_, '_>,
    session: &mut AgentSession,
    child: Child,
    buffers: Buffers<'_>,
) -> (End, Retired) {
    let cap = child.limits.cap;
    let mut pump = Pump {
        link,
        session,
        stdin: StdinPipe::new(child.stdin, buffers.stdin),
        stdout: OutputPipe::new(
            DataKind::Stdout,
            Some(child.stdout),
            cap,
            buffers.stdout_tail,
        ),
        stderr: OutputPipe::new(DataKind::Stderr, child.stderr, cap, buffers.stderr_tail),
        prefer_stderr: false,
        pid: child.pid,
        pidfd: Some(child.pidfd),
        now: clock::monotonic_us(),
        exited: false,
        retired: Retired::new(),
        limits: child.limits,
        ending: Ending::Exited,
        tree_kill: TreeKill::None,
        kill_at: None,
        killed: false,
        pipes_held: false,
    };
    let end = pump.run();
    (end, pump.retired)
}

/// Moves bytes between the socket and the command until the session has its last frame.
struct Pump<'l, 's, 'b> {
    link: &'l mut Link<'s, 'b>,
    session: &'l mut AgentSession,
    stdin: StdinPipe<'l>,
    stdout: OutputPipe<'l>,
    stderr: OutputPipe<'l>,
    /// The pipes take turns, so neither starves the other.
    prefer_stderr: bool,
    pid: Pid,
    /// `None` once the command is reaped.
    pidfd: Option<OwnedFd>,
    /// The monotonic clock when the last `poll` returned: what this iteration's work goes by
    /// (each clock read is a syscall).
    now: u64,
    exited: bool,
    retired: Retired,
    /// The policy's limits and the request's.
    limits: RunLimits,
    /// What ended the command: the first of a timeout, a cancel or a limit, while it ran.
    ending: Ending,
    /// How the tree was ended, if it was.
    tree_kill: TreeKill,
    /// When the SIGKILL follows the SIGTERM already sent to the tree.
    kill_at: Option<u64>,
    /// The tree got its SIGKILL.
    killed: bool,
    /// Other processes still held the output pipes when the drain stopped waiting.
    pipes_held: bool,
}

/// One of the command's output streams.
struct OutputPipe<'r> {
    kind: DataKind,
    /// `None` once closed (or never opened: stderr on a terminal).
    fd: Option<OwnedFd>,
    /// `poll` said it is readable (or hung up) since the last read found it empty.
    ready: bool,
    /// `poll` said it hung up with nothing in it: at its EOF, no `read` needed to know.
    hung_up: bool,
    /// Its head and tail (see `cap`).
    cap: Cap<'r>,
    /// The stream ended: what is left is its `OutputDropped` (if anything was dropped) and
    /// then its tail.
    ended: bool,
    dropped_notice: Option<u64>,
}

impl<'r> OutputPipe<'r> {
    fn new(kind: DataKind, fd: Option<OwnedFd>, cap: u64, ring: &'r mut Ring) -> Self {
        OutputPipe {
            kind,
            ended: fd.is_none(),
            fd,
            ready: false,
            hung_up: false,
            cap: Cap::new(cap, ring),
            dropped_notice: None,
        }
    }

    /// Notes what `poll` said of it.
    fn saw(&mut self, events: PollFlags) {
        if events.intersects(READABLE) {
            self.ready = true;
        }
        // A pipe reports `POLLIN` while it holds anything.
        self.hung_up = events == PollFlags::HUP;
    }

    /// Ends the stream (at its EOF, or closed by the drain); its descriptor, if still open.
    fn end(&mut self) -> Option<OwnedFd> {
        if !self.ended {
            self.ended = true;
            self.dropped_notice = Some(self.cap.dropped()).filter(|n| *n > 0);
        }
        self.fd.take()
    }

    /// Ended, and nothing of it left to send.
    fn done(&self) -> bool {
        self.ended && self.dropped_notice.is_none() && self.cap.tail_pending() == 0
    }

    fn stream(&self) -> Stream {
        match self.kind {
            DataKind::Stderr => Stream::Stderr,
            _ => Stream::Stdout,
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

    /// Blocks until something is ready, a signal arrives, or `deadline` passes (counted from
    /// `now`, a moment ago).
    fn poll(mut self, deadline: Option<u64>, now: u64) -> Result<Events, Errno> {
        let timeout = deadline.map(|deadline| clock::timeout_between(now, deadline));
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

/// The earlier of two optional deadlines.
fn earliest(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl Pump<'_, '_, '_> {
    fn run(&mut self) -> End {
        // Frames that arrived with the request.
        if let Err(end) = self.handle_frames() {
            return end;
        }
        loop {
            if !self.link.outbox.refill(self.session) && !self.send_stream_end() {
                self.read_output();
            }
            if self.link.flush().is_err() {
                return self.kill(End::ClientGone);
            }
            let output_done = self.stdout.done() && self.stderr.done();
            if self.exited && output_done && self.link.outbox.is_empty() && !self.awaiting_kill() {
                let memory = cgroup::exec_memory_facts();
                let facts = EndFacts {
                    ending: self.ending,
                    tree_kill: self.tree_kill,
                    pipes_held: self.pipes_held,
                    oom_killed: memory.oom_killed,
                    peak_memory: memory.peak_memory,
                };
                return match self.session.finish_with(self.now, facts) {
                    Ok(()) => End::Closing,
                    Err(_) => End::ClientGone,
                };
            }
            // A stream's end still to send has no descriptor to wake the poll: an iteration
            // taken by a control frame (a keepalive) must not leave it waiting for the next.
            let ending = |pipe: &OutputPipe<'_>| pipe.ended && !pipe.done();
            if self.link.outbox.is_empty() && (ending(&self.stdout) || ending(&self.stderr)) {
                continue;
            }
            if let Err(end) = self.wait_and_handle() {
                return end;
            }
        }
    }

    /// Kills the command (see [`start::kill`]); `end` is how the pump ends.
    fn kill(&mut self, end: End) -> End {
        self.record(start::kill(self.pid, self.exited));
        end
    }

    /// Notes how the tree was ended.
    fn record(&mut self, how: cgroup::TreeKill) {
        self.tree_kill = match how {
            cgroup::TreeKill::Cgroup => TreeKill::Cgroup,
            cgroup::TreeKill::ProcessGroup => TreeKill::ProcessGroup,
        };
    }

    /// Ends the tree: SIGTERM now, SIGKILL after `grace_us` (an earlier SIGKILL already due
    /// stays). `ending` is what the record says ended the command, unless something came first.
    fn terminate(&mut self, ending: Ending, grace_us: u64) {
        if self.ending == Ending::Exited {
            self.ending = ending;
        }
        if self.kill_at.is_none() {
            self.record(cgroup::terminate_tree(self.pid));
        }
        let at = clock::monotonic_us().saturating_add(grace_us);
        self.kill_at = earliest(self.kill_at, Some(at));
    }

    /// SIGKILL to the tree, now.
    fn kill_tree(&mut self) {
        if !self.killed {
            self.record(cgroup::kill_tree(self.pid));
            self.killed = true;
        }
    }

    /// A SIGTERM was sent and its SIGKILL is still to come for what is left of the tree: the
    /// record waits for it (a command that ended at the SIGTERM may leave a tree that does not).
    fn awaiting_kill(&self) -> bool {
        self.kill_at.is_some() && !self.killed && cgroup::tree_remains(self.pid)
    }

    /// Puts a stream's end into the empty outbox: its `OutputDropped`, then its tail, in order
    /// behind its head. Whether there is a frame to send.
    fn send_stream_end(&mut self) -> bool {
        for pipe in [&mut self.stdout, &mut self.stderr] {
            if !pipe.ended {
                continue;
            }
            if let Some(bytes) = pipe.dropped_notice.take() {
                let stream = pipe.stream();
                let session = &mut *self.session;
                if self
                    .link
                    .outbox
                    .put(|out| session.encode_output_dropped(stream, bytes, out))
                {
                    return true;
                }
                self.session.note_output_dropped();
            }
            if pipe.cap.tail_pending() > 0 {
                let cap = &mut pipe.cap;
                match self
                    .link
                    .outbox
                    .copy_output(pipe.kind, self.session, |out| cap.take_tail(out))
                {
                    Output::Read(_) => return true,
                    _ => {
                        // Cannot be framed (never expected): counted as lost, not retried.
                        while pipe.cap.take_tail(&mut [0u8; 512]) > 0 {}
                        self.session.note_output_dropped();
                    }
                }
            }
        }
        false
    }

    /// Reads the next output chunk into the empty outbox (or a stream's tail), as the
    /// session's output phase allows.
    fn read_output(&mut self) {
        let now = self.now;
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
        // Within the policy's output limit, a read takes at most what is left of it; at the
        // limit, one more byte is one too many ("exactly at the limit" completes normally).
        let produced = self
            .stdout
            .cap
            .produced()
            .saturating_add(self.stderr.cap.produced());
        let left = self
            .limits
            .max_output
            .map(|max| max.saturating_sub(produced));
        let bound = |n: u64| left.map_or(n, |left| left.min(n));
        let terminal = self.limits.terminal;
        for kind in order {
            let pipe = match kind {
                DataKind::Stderr => &mut self.stderr,
                _ => &mut self.stdout,
            };
            let Some(fd) = pipe.fd.as_ref() else { continue };
            if !pipe.ready && !draining {
                continue;
            }
            let fd = fd.as_fd();
            let head = match pipe.cap.next() {
                Next::Live(head) => Some(head),
                Next::Tail(_) => None,
            };
            let (output, live) = match (left, head) {
                // Not a terminal's: its master may still have output on its way from the slave,
                // which only a `read` flushes.
                _ if pipe.hung_up && !terminal => (Output::Eof, None),
                (Some(0), _) => (read_one_byte(fd), None),
                (_, Some(head)) => {
                    let at_most = usize::try_from(bound(head)).unwrap_or(MAX_DATA);
                    let outbox = &mut self.link.outbox;
                    (
                        outbox.read_output(fd, kind, self.session, at_most),
                        Some(true),
                    )
                }
                (left, None) => {
                    let bound = left.unwrap_or(u64::MAX);
                    (drain_into_tail(&mut pipe.cap, fd, bound), Some(false))
                }
            };
            match (output, live) {
                // A byte past the limit (read and dropped, not framed).
                (Output::Read(_), None) => {
                    self.output_limit_passed();
                    return;
                }
                (Output::Read(n), Some(true)) => {
                    pipe.cap.commit_live(n);
                    self.prefer_stderr = kind == DataKind::Stdout;
                    // That chunk may have crossed the drain limit.
                    if self.session.output_phase(now) == OutputPhase::Closed {
                        self.close_output();
                    }
                    return;
                }
                (Output::Read(n), Some(false)) => {
                    self.prefer_stderr = kind == DataKind::Stdout;
                    // Past its command's end, a writer that never pauses is cut off here too.
                    self.session.note_drained(n);
                    if self.session.output_phase(now) == OutputPhase::Closed {
                        self.close_output();
                    }
                    return;
                }
                (Output::Eof, _) => {
                    if let Some(fd) = pipe.end() {
                        let _ = self.retired.push(fd);
                    }
                }
                (Output::Empty, _) => {
                    pipe.ready = false;
                    if draining {
                        // Idle past the grace, yet not at EOF: another process holds it.
                        self.pipes_held = true;
                        pipe.end();
                    }
                }
                (Output::Failed, _) => {
                    pipe.end();
                    self.session.note_output_dropped();
                }
            }
        }
    }

    /// The command wrote more than the policy's output limit: nothing more is read, its tree
    /// is killed, and the termination record says output was dropped.
    fn output_limit_passed(&mut self) {
        self.session.note_output_dropped();
        // Killed before its pipes close: a command still writing dies of SIGKILL, never of a
        // SIGPIPE that raced the kill (that made the status flaky).
        self.kill_for_limit(Ending::OutputLimit);
        self.close_output();
    }

    /// Kills the command's tree for passing a limit of the policy's; its end is reported as
    /// usual (the status shows SIGKILL). Also after the command exited: what is left of its
    /// tree may be what keeps writing (the record then says it exited).
    fn kill_for_limit(&mut self, ending: Ending) {
        if !self.exited && self.ending == Ending::Exited {
            self.ending = ending;
        }
        self.kill_tree();
    }

    /// Closes both output pipes, drained by the session's say (what they still hold is the
    /// session's to report as dropped); their tails are still sent.
    fn close_output(&mut self) {
        for pipe in [&mut self.stdout, &mut self.stderr] {
            if pipe.end().is_some() && self.exited {
                self.pipes_held = true;
            }
        }
    }

    fn wait_and_handle(&mut self) -> Result<(), End> {
        // Output is read only into an empty outbox: one frame in flight.
        let output_wanted = self.link.outbox.is_empty();
        // After the client's half-close nothing is read from it; a real close still shows
        // (POLLHUP, which poll reports whatever was asked).
        let input = !self.session.input_closed();
        let mut socket = PollFlags::empty();
        if input {
            socket |= PollFlags::IN;
        }
        if !output_wanted {
            socket |= PollFlags::OUT;
        }
        let stdout = self.stdout.fd.as_ref().filter(|_| output_wanted);
        let stderr = self.stderr.fd.as_ref().filter(|_| output_wanted);
        let stdin = self.stdin.fd.as_ref().filter(|_| self.stdin.buffered() > 0);
        let running = !self.exited;
        // The policy's runtime limit, while it runs and has not been killed yet.
        let runtime = self.limits.deadline_us.filter(|_| running && !self.killed);
        // The request's timeout, until something else ended it.
        let timeout = self
            .limits
            .timeout_us
            .filter(|_| running && self.kill_at.is_none() && !self.killed);
        let kill_at = self.kill_at.filter(|_| !self.killed);
        let deadline = [runtime, timeout, kill_at]
            .into_iter()
            .fold(self.session.poll_timeout(), earliest);
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
        let Ok(events) = set.poll(deadline, self.now) else {
            return Err(self.kill(End::ClientGone));
        };
        self.now = clock::monotonic_us();

        self.stdout.saw(events.of(Slot::Stdout));
        self.stderr.saw(events.of(Slot::Stderr));
        if events.of(Slot::Pidfd).intersects(READABLE) {
            self.collect_exit();
        }
        if !events.of(Slot::Stdin).is_empty() {
            self.write_stdin();
        }
        let socket = events.of(Slot::Socket);
        if input && socket.intersects(READABLE) {
            self.receive()?;
        } else if !input && socket.intersects(PollFlags::HUP | PollFlags::ERR) {
            // Gone after its half-close: nobody will read the record.
            return Err(self.kill(End::ClientGone));
        }
        if deadline.is_some() {
            let now = self.now;
            let due = |at: Option<u64>| at.is_some_and(|at| now >= at);
            if due(runtime) {
                // Ran too long: its end (SIGKILL) comes through the pidfd like any other.
                self.kill_for_limit(Ending::RuntimeLimit);
            }
            if due(timeout) {
                self.terminate(Ending::TimedOut, self.limits.kill_grace_us);
            }
            if due(kill_at) {
                self.kill_tree();
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
            .child_exited(start::exit_status(&status), self.now);
        self.exited = true;
        if let Some(pidfd) = self.pidfd.take() {
            let _ = self.retired.push(pidfd);
        }
        crash::set_current_command(None);
        // Nobody is left to read stdin.
        self.discard_stdin();
        // Asked for: what the command left behind goes with it (its pipes then close soon).
        if self.limits.kill_tree_on_exit && !self.killed {
            if let Some(how) = cgroup::kill_tree_on_exit(self.pid) {
                self.record(how);
                self.killed = true;
            }
        }
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
            if self.limits.terminal {
                self.stdin.type_end_of_input();
            }
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
            // The end of the client's stream while the command runs is a half-close: no more
            // input (stdin ends), the command runs on and its record is still sent. A client
            // that closed its socket is gone (it refuses even an empty send); one that goes
            // later shows as POLLHUP (Unix sockets) or a failed send (a keepalive at the
            // latest). A stream that ends in the middle of a frame was cut off: a disconnect.
            Received::Closed => {
                let _ = self.session.handle_eof();
                let cut_off = !self.link.inbox.data().is_empty();
                if !self.session.input_closed() || cut_off || !self.link.peer_receives() {
                    return Err(self.kill(End::ClientGone));
                }
                self.close_stdin_if_done();
                Ok(())
            }
        }
    }

    /// Sets the terminal's size; nothing without a terminal (or once its output ended).
    fn resize(&self, size: WindowSize) {
        if let (true, Some(master)) = (self.limits.terminal, self.stdout.fd.as_ref()) {
            let _ = pty::resize(master, size);
        }
    }

    /// Hands every whole buffered frame to the session, and does what it says.
    fn handle_frames(&mut self) -> Result<(), End> {
        let now = self.now;
        loop {
            let Ok(input) = self.session.handle_input(self.link.inbox.data(), now) else {
                // A breach: the session queued the error frame.
                return Err(self.kill(End::Closing));
            };
            let consumed = input.consumed;
            match input.event {
                None if consumed == 0 => return Ok(()),
                Some(AgentEvent::Stdin(data)) => {
                    // Nobody reads it: its credit goes straight back. Else what the pipe takes
                    // at once is consumed, the rest buffered.
                    let written = match self.stdin.fd {
                        None => data.len(),
                        Some(_) => self.stdin.write_through(data),
                    };
                    if written > 0 {
                        self.session.stdin_consumed(written);
                    }
                    let rest = data.get(written..).unwrap_or(&[]);
                    if !rest.is_empty() && !self.stdin.push(rest) {
                        // Within credit it always fits: the accounting is broken.
                        let refusal = Refusal::new(ErrorCode::Internal, "stdin accounting");
                        let _ = self.session.refuse(refusal, now);
                        return Err(self.kill(End::Closing));
                    }
                }
                Some(AgentEvent::StdinEof) => self.close_stdin_if_done(),
                // Once the command has ended, signals and cancels have nothing to reach; what
                // it left behind is left alone, as after any normal end.
                Some(AgentEvent::Signal(number)) if !self.exited => {
                    let _ = start::signal(self.pid, number);
                }
                Some(AgentEvent::Cancel { grace_ms }) if !self.exited => {
                    let grace = grace_ms.map_or(self.limits.kill_grace_us, |ms| {
                        u64::from(ms).saturating_mul(1000)
                    });
                    self.terminate(Ending::Cancelled, grace);
                }
                Some(AgentEvent::Resize(size)) => self.resize(size),
                Some(AgentEvent::Signal(_) | AgentEvent::Cancel { .. }) => {}
                // The session takes the handshake and a request only before the command,
                // and refuses them here.
                None
                | Some(
                    AgentEvent::Hello
                    | AgentEvent::Authenticated
                    | AgentEvent::Exec(_)
                    | AgentEvent::KillAll
                    | AgentEvent::ExecPart { .. }
                    | AgentEvent::Put(_)
                    | AgentEvent::PutEnd(_)
                    | AgentEvent::Get(_)
                    | AgentEvent::Info
                    | AgentEvent::Shutdown(_)
                    | AgentEvent::TimeSync(_)
                    | AgentEvent::Reseed(_)
                    | AgentEvent::StartJob(_)
                    | AgentEvent::Jobs(_)
                    | AgentEvent::Attach(_)
                    | AgentEvent::Wait(_)
                    | AgentEvent::Kill(_)
                    | AgentEvent::Remove(_),
                ) => {}
            }
            self.link.inbox.consume(consumed);
        }
    }
}

/// Past its head: reads what the pipe holds into the ring, at most `bound` bytes, several
/// reads in a row (nothing is sent meanwhile, so no poll is needed between them; a bounded
/// number, so the other stream and the socket are not kept waiting). `Read` with the bytes
/// read, else what the first read found.
fn drain_into_tail(cap: &mut Cap<'_>, fd: BorrowedFd<'_>, mut bound: u64) -> Output {
    let mut total = 0usize;
    for _ in 0..16 {
        let Next::Tail(ring) = cap.next() else {
            break;
        };
        let at_most = usize::try_from(bound).map_or(ring.len(), |b| b.min(ring.len()));
        let Some(part @ [_, ..]) = ring.get_mut(..at_most) else {
            break;
        };
        match read_pipe(fd, part) {
            Output::Read(n) => {
                cap.commit_tail(n);
                total = total.saturating_add(n);
                bound = bound.saturating_sub(n as u64);
            }
            _ if total > 0 => break,
            other => return other,
        }
    }
    Output::Read(total)
}

/// Reads one byte from an output pipe at the policy's output limit, to tell "exactly at the
/// limit" from "past it": the byte is dropped (`Read(1)` means it was there).
fn read_one_byte(pipe: BorrowedFd<'_>) -> Output {
    read_pipe(pipe, &mut [0u8; 1])
}

/// The command's stdin pipe and the bytes on their way to it.
struct StdinPipe<'b> {
    /// `None` when the command has no stdin pipe, or it was closed.
    fd: Option<OwnedFd>,
    buf: &'b mut [u8],
    /// `buf[head..tail]` is buffered.
    head: usize,
    tail: usize,
    /// The last byte taken was not a newline.
    mid_line: bool,
}

impl<'b> StdinPipe<'b> {
    fn new(fd: Option<OwnedFd>, buf: &'b mut [u8]) -> Self {
        StdinPipe {
            fd,
            buf,
            mid_line: false,
            head: 0,
            tail: 0,
        }
    }

    fn buffered(&self) -> usize {
        self.tail.saturating_sub(self.head)
    }

    /// The end of the client's input on a terminal: closing our copy of the master is no end
    /// of anything there, so the end is typed as a user would, `^D` (VEOF by default) — twice
    /// after a line without its newline (the first only ends that line).
    fn type_end_of_input(&mut self) {
        let Some(fd) = self.fd.as_ref() else { return };
        let eof: &[u8] = if self.mid_line { b"\x04\x04" } else { b"\x04" };
        let _ = rustix::io::write(fd, eof);
    }

    /// Writes `data` straight from the receive buffer when nothing waits before it (one copy
    /// less on the upload path); returns how much the pipe took (0 when full, or on an error
    /// the next `write` meets again).
    fn write_through(&mut self, data: &[u8]) -> usize {
        let Some(fd) = self.fd.as_ref().filter(|_| self.buffered() == 0) else {
            return 0;
        };
        let written = rustix::io::write(fd, data).map_or(0, |n| n.min(data.len()));
        if let (true, Some(last)) = (written > 0, data.get(..written).and_then(<[u8]>::last)) {
            self.mid_line = *last != b'\n';
        }
        written
    }

    /// Buffers `data`; `false` when it does not fit.
    fn push(&mut self, data: &[u8]) -> bool {
        if let Some(last) = data.last() {
            self.mid_line = *last != b'\n';
        }
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
    fn past_its_head_a_stream_drains_into_its_tail_in_a_few_reads() {
        let (read, write) = pipe();
        rustix::pipe::fcntl_setpipe_size(&write, 1 << 20).unwrap();
        rustix::io::ioctl_fionbio(&read, true).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        rustix::io::write(&write, &data).unwrap();
        let mut ring = vec![0u8; crate::conn::MAX_TAIL].into_boxed_slice();
        let ring: &mut Ring = (&mut *ring).try_into().unwrap();
        let mut cap = Cap::new(0, ring);
        // Within a bound, then at will: 16 reads of at most 64 KiB each time.
        assert_eq!(
            drain_into_tail(&mut cap, read.as_fd(), 1000),
            Output::Read(1000)
        );
        assert_eq!(
            drain_into_tail(&mut cap, read.as_fd(), u64::MAX),
            Output::Read(299_000)
        );
        assert_eq!(
            drain_into_tail(&mut cap, read.as_fd(), u64::MAX),
            Output::Empty
        );
        drop(write);
        assert_eq!(
            drain_into_tail(&mut cap, read.as_fd(), u64::MAX),
            Output::Eof
        );
        assert_eq!((cap.produced(), cap.dropped()), (300_000, 300_000));
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
        let events = set.poll(Some(0), 0).unwrap();
        assert!(events.of(Slot::Pidfd).contains(PollFlags::IN));
        assert!(events.of(Slot::Stderr).is_empty());
        assert!(events.of(Slot::Stdout).is_empty(), "not polled");
        assert!(events.of(Slot::Socket).is_empty(), "not polled");
    }

    #[test]
    fn a_pipe_is_at_its_eof_without_a_read_only_when_hung_up_and_empty() {
        let mut ring = vec![0u8; super::super::cap::MAX_TAIL];
        let ring: &mut Ring = ring.as_mut_slice().try_into().unwrap();
        let (read, write) = pipe();
        let mut output = OutputPipe::new(DataKind::Stdout, Some(read), u64::MAX, ring);
        let poll_it = |output: &mut OutputPipe<'_>| {
            let mut set = PollSet::new();
            set.add(
                Slot::Stdout,
                output.fd.as_ref().map(AsFd::as_fd),
                PollFlags::IN,
            );
            output.saw(set.poll(Some(0), 0).unwrap().of(Slot::Stdout));
        };
        // Written and closed: readable first, whatever the hang-up.
        rustix::io::write(&write, b"last words").unwrap();
        drop(write);
        poll_it(&mut output);
        assert!(output.ready && !output.hung_up);
        let mut buf = [0u8; 16];
        assert_eq!(
            read_pipe(output.fd.as_ref().unwrap().as_fd(), &mut buf),
            Output::Read(10)
        );
        // Drained: nothing left but the hang-up.
        poll_it(&mut output);
        assert!(output.hung_up);
    }
}
