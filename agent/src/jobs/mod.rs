//! Detached jobs: the supervising process. The listener forks it at start (and again if it
//! dies); it owns the registry, the spools and the runners, in one `poll` loop that never
//! blocks on a peer.
//!
//! - A connection process with a job request makes a private `SOCK_SEQPACKET` pair and sends
//!   one end over the *channel* (a `SOCK_SEQPACKET` socketpair made by the listener; every
//!   connection process inherits its other end) with `SCM_RIGHTS`; then it talks to the
//!   supervisor in small records (`record.rs`).
//! - A *runner* is a forked connection process serving the job's exec over a stream
//!   socketpair, insecure, with the supervisor as its client (`link.rs`): the exec's start
//!   errors, limits, tree kill and terminal are the ordinary ones.
//! - A job's output goes into its spool (`spool.rs`); attachers each read from their own
//!   cursor, only as their socket accepts.
//!
//! Deaths: the supervisor dies → each runner sees its client gone and kills its command's tree,
//! as for a dropped connection; the listener forks a new, empty supervisor. A runner dies → its
//! job is `Lost` (its exec cgroup is killed).

pub mod client;
pub mod link;
pub mod record;
mod spool;

use ferry_wire::session::Refusal;
use ferry_wire::{ClientFrame, ErrorCode, Termination};
use rustix::event::{poll, PollFd, PollFlags};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendFlags, SocketFlags,
    SocketType,
};

use self::link::{Control, RunnerFrame};
use self::record::{Answer, Incoming, JobInfo, Request, ANY_VIEWER, MAX_OUTPUT, MAX_RECORD};
use self::spool::{Chunk, Spool};
use crate::auth::Serving;
use crate::policy::{self, MAX_JOBS};
use crate::sys::{self, ScratchPages, SetOnce};
use crate::{cgroup, clock, log};

/// The error codes of job requests the wire names.
pub mod codes {
    use ferry_wire::ErrorCode;
    pub const NO_SUCH_JOB: ErrorCode = ErrorCode::NoSuchJob;
    pub const JOB_RUNNING: ErrorCode = ErrorCode::JobRunning;
    pub const JOB_ENDED: ErrorCode = ErrorCode::JobEnded;
}

/// Connection processes talking to the supervisor at once (attachers, waiters, requests).
const MAX_PEERS: usize = 256;

/// A runner's frames as they arrive: one whole frame at least.
const RUNNER_INBOX: usize = ferry_wire::limits::MAX_FRAME;

/// The channel's end that connection processes use (set in each spare, before it serves).
static CHANNEL: SetOnce<OwnedFd> = SetOnce::new();

/// Keeps `channel` as this process's way to the supervisor (a spare, once forked).
pub fn set_channel(channel: OwnedFd) {
    let _ = CHANNEL.set(channel);
}

/// The channel to the supervisor, if this process has one.
pub fn channel() -> Option<BorrowedFd<'static>> {
    CHANNEL.get().map(|fd| fd.as_fd())
}

/// A new channel: (the supervisor's end, the connection processes' end).
pub fn new_channel() -> Result<(OwnedFd, OwnedFd), Errno> {
    rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
}

/// A job's state, as the wire's `JobState` orders it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    Exited,
    Killed,
    Lost,
}

struct Job {
    id: u32,
    name: heapless::Vec<u8, 64>,
    argv_len: u16,
    uid: u32,
    gid: u32,
    pid: u32,
    /// The runner's pid (its exec cgroup is named after it).
    runner_pid: u32,
    started_real: (i64, u32),
    started_us: u64,
    ended_us: Option<u64>,
    state: State,
    termination: Option<Termination>,
    spool: Spool,
    /// While the runner lives: its socket and what it sent that is not handled yet.
    runner: Option<Runner>,
    /// The starter waits for `Started` (or the refusal).
    starting: bool,
    /// A kill was asked for: the end reads as `Killed`.
    killed: bool,
    /// The peer whose stdin goes to the job (by its socket's fd number).
    stdin_owner: Option<i32>,
    /// Stdin bytes relayed to the runner and not yet credited back: the runner's window holds
    /// them whoever sent them, so stdin is granted anew only when none are (a new owner's
    /// session gives it the whole window).
    stdin_in_flight: usize,
    /// An owner closed the job's stdin: nobody is granted it again.
    stdin_closed: bool,
}

struct Runner {
    sock: OwnedFd,
    inbox: ScratchPages,
    have: usize,
    /// What the last poll found.
    ready: PollFlags,
}

#[derive(Clone, Copy)]
enum Role {
    /// Its request has not come yet.
    New,
    /// It started the job with this id and awaits `Started`.
    Starting(u32),
    /// Listing: the next job after this id.
    Listing {
        after: u32,
        count: u32,
        viewer: u32,
    },
    Attached(Attach),
    Waiting(u32),
    /// Its last record was sent: closed at the next turn.
    Finished,
}

#[derive(Clone, Copy)]
struct Attach {
    job: u32,
    at: [u64; 2],
    follow: bool,
    /// The socket took nothing at the last try: wait for POLLOUT.
    blocked: bool,
    /// Which stream goes first next time.
    turn: usize,
}

struct Peer {
    sock: OwnedFd,
    role: Role,
    /// What the last poll found.
    ready: PollFlags,
}

/// The registry's tables: in `.bss`, not on the stack, so that only the entries in use cost
/// memory (the stack frame of a full registry's tables was kept resident whole).
struct Tables {
    peers: heapless::Vec<Peer, MAX_PEERS>,
    jobs: heapless::Vec<Job, { MAX_JOBS as usize }>,
}

static TABLES: sys::TakeOnce<Tables> = sys::TakeOnce::new(Tables {
    peers: heapless::Vec::new(),
    jobs: heapless::Vec::new(),
});

struct Supervisor {
    channel: Option<OwnedFd>,
    serving: Serving,
    peers: &'static mut heapless::Vec<Peer, MAX_PEERS>,
    jobs: &'static mut heapless::Vec<Job, { MAX_JOBS as usize }>,
    next_id: u32,
    max_jobs: usize,
    /// An attacher has more to send than one turn sends: the next poll does not wait.
    more: bool,
}

/// Runs the supervisor forever (the listener's fork). `serving` is the agent's; runners serve
/// insecurely over their private socketpairs.
pub fn serve(channel: OwnedFd, serving: &Serving, listener: rustix::process::Pid) -> ! {
    // Service mode: the supervisor ends with its listener (and its runners then kill their
    // commands, as for a dropped connection).
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM));
    if rustix::process::getppid() != Some(listener) {
        // The listener died before the death signal was armed.
        sys::exit(0);
    }
    // Told apart from the spares in `ps` (and by tests that count them).
    let _ = rustix::thread::set_name(c"ferry-jobs");
    let _ = rustix::io::ioctl_fionbio(&channel, true);
    let policy = policy::current();
    let Some(Tables { peers, jobs }) = TABLES.take() else {
        sys::exit(70);
    };
    let mut sup = Supervisor {
        channel: Some(channel),
        serving: Serving {
            config: serving.config,
            secret: None,
        },
        peers,
        jobs,
        next_id: 1,
        max_jobs: policy.max_jobs.clamp(1, MAX_JOBS) as usize,
        more: false,
    };
    // Records in and out: mapped once, touched only as far as records go.
    let mut scratch = ScratchPages::new(2 * MAX_RECORD);
    sys::trim_resident_memory();
    loop {
        match scratch.bytes() {
            Ok(buf) => sup.turn(buf),
            Err(errno) => {
                log::error(b"jobs: no memory for records", errno);
                clock::sleep_ms(1000);
            }
        }
    }
}

/// What a job request names: an id in decimal, or a name.
fn find(jobs: &[Job], job: &[u8]) -> Option<usize> {
    let id = ferry_wire::parse_job_id(job);
    jobs.iter()
        .position(|j| Some(j.id) == id || (id.is_none() && j.name.as_slice() == job))
}

fn refusal(code: ErrorCode, message: &'static str) -> Answer<'static> {
    refused(Refusal::new(code, message))
}

fn refused(refusal: Refusal) -> Answer<'static> {
    Answer::Refused {
        code: refusal.code,
        errno: refusal.errno,
        message: refusal.message.as_bytes(),
    }
}

/// Sends one record without blocking; `Err(AGAIN)` when the socket is full.
fn send_record(sock: BorrowedFd<'_>, record: &[u8]) -> Result<(), Errno> {
    let flags = SendFlags::DONTWAIT | SendFlags::NOSIGNAL;
    loop {
        match rustix::net::send(sock, record, flags) {
            Ok(_) => return Ok(()),
            Err(Errno::INTR) => {}
            Err(errno) => return Err(errno),
        }
    }
}

fn send_answer(sock: BorrowedFd<'_>, answer: &Answer<'_>, buf: &mut [u8]) -> Result<(), Errno> {
    let n = answer.encode(buf).ok_or(Errno::MSGSIZE)?;
    send_record(sock, buf.get(..n).unwrap_or(&[]))
}

/// Sends a whole frame to a runner; a runner that does not take it at once (its socket holds
/// far more than the credit window and a control) is broken.
fn send_frame(sock: BorrowedFd<'_>, frame: &[u8]) -> Result<(), Errno> {
    let mut rest = frame;
    let flags = SendFlags::DONTWAIT | SendFlags::NOSIGNAL;
    while !rest.is_empty() {
        match rustix::net::send(sock, rest, flags) {
            Ok(n) => rest = rest.get(n..).unwrap_or(&[]),
            Err(Errno::INTR) => {}
            Err(errno) => return Err(errno),
        }
    }
    Ok(())
}

impl Job {
    fn visible_to(&self, viewer: u32) -> bool {
        viewer == ANY_VIEWER || viewer == self.uid
    }

    fn running(&self) -> bool {
        self.state == State::Running
    }

    fn info<'a>(&'a self, argv: &'a [u8]) -> JobInfo<'a> {
        let end = self.ended_us.unwrap_or_else(clock::monotonic_us);
        JobInfo {
            id: self.id,
            name: &self.name,
            argv,
            uid: self.uid,
            gid: self.gid,
            pid: self.pid,
            state: self.state as u8,
            started_secs: self.started_real.0,
            started_nanos: self.started_real.1,
            duration_us: end.saturating_sub(self.started_us),
            bytes: [self.spool.total(0), self.spool.total(1)],
            termination: self.termination,
        }
    }

    /// What a waiter or a caught-up attacher of the ended job is told: its record, or that
    /// there is none.
    fn end_answer(&self) -> Answer<'static> {
        match self.termination {
            Some(t) => Answer::Ended(t),
            None => refusal(
                ErrorCode::Internal,
                "the job's runner died: its end is unknown",
            ),
        }
    }

    /// The job's end: the runner is gone, with its record or without.
    fn end(&mut self, termination: Option<Termination>) {
        self.runner = None;
        self.ended_us = Some(clock::monotonic_us());
        self.termination = termination;
        self.state = match termination {
            None => {
                // The runner died: what it ran must not run on unwatched.
                let _ = cgroup::kill_exec(self.runner_pid);
                State::Lost
            }
            Some(t) if self.killed || matches!(t.status, ferry_wire::ExitStatus::Signal { .. }) => {
                State::Killed
            }
            Some(_) => State::Exited,
        };
        let _ = cgroup::remove_exec(self.runner_pid);
    }
}

impl Supervisor {
    fn turn(&mut self, buf: &mut [u8]) {
        const CAPACITY: usize = 1 + MAX_PEERS + MAX_JOBS as usize;
        // NOTE: listened to even when every peer's slot is taken: the next is refused `Busy`
        // at once (not left waiting for a slot, maybe for as long as a job runs).
        let listening = self.channel.is_some();
        let mut revents = heapless::Vec::<PollFlags, CAPACITY>::new();
        {
            // In this order: the channel (if listened to), each peer, each runner.
            let mut fds = heapless::Vec::<PollFd<'_>, CAPACITY>::new();
            if let Some(channel) = self.channel.as_ref().filter(|_| listening) {
                let _ = fds.push(PollFd::new(channel, PollFlags::IN));
            }
            for peer in self.peers.iter() {
                let mut flags = PollFlags::IN;
                if let Role::Attached(Attach { blocked: true, .. }) | Role::Listing { .. } =
                    peer.role
                {
                    flags |= PollFlags::OUT;
                }
                let _ = fds.push(PollFd::new(&peer.sock, flags));
            }
            for runner in self.jobs.iter().filter_map(|job| job.runner.as_ref()) {
                let _ = fds.push(PollFd::new(&runner.sock, PollFlags::IN));
            }
            // NOTE: an attacher cut short by its per-turn bound has nothing to wake the poll
            // (an ended job's replay): the poll must not wait then.
            let zero = rustix::event::Timespec::default();
            let timeout = self.more.then_some(&zero);
            match poll(&mut fds, timeout) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(errno) => {
                    log::error(b"jobs: poll", errno);
                    clock::sleep_ms(100);
                }
            }
            for fd in fds.iter() {
                let _ = revents.push(fd.revents());
            }
        }
        let mut revents = revents.into_iter();
        let mut next = || revents.next().unwrap_or(PollFlags::empty());
        let channel = if listening {
            next()
        } else {
            PollFlags::empty()
        };
        for peer in self.peers.iter_mut() {
            peer.ready = next();
        }
        for runner in self.jobs.iter_mut().filter_map(|job| job.runner.as_mut()) {
            runner.ready = next();
        }
        // Runners first (their output reaches attachers this turn), then peers, then the
        // channel. A job removed meanwhile shifts the others: one may wait for the next turn.
        for i in 0..self.jobs.len() {
            let ready = self.jobs.get(i).and_then(|job| job.runner.as_ref());
            if ready.is_some_and(|runner| !runner.ready.is_empty()) {
                self.runner_ready(i, buf);
            }
        }
        // Peers are only added (at the end) and removed (by the sweep) after this.
        for i in 0..self.peers.len() {
            let Some(peer) = self.peers.get_mut(i) else {
                break;
            };
            if peer.ready.intersects(PollFlags::IN | PollFlags::HUP) {
                self.peer_readable(i, buf);
            } else if let (false, Role::Attached(attach)) = (peer.ready.is_empty(), &mut peer.role)
            {
                attach.blocked = false;
            }
        }
        // Every other end of the channel is closed: the listener is gone (it holds one for as
        // long as this supervisor lives), and so is everyone it served.
        if channel.contains(PollFlags::HUP) {
            sys::exit(0);
        }
        if !channel.is_empty() {
            self.accept_peer();
        }
        self.pump_peers(buf);
        self.sweep();
    }

    /// Takes the connection process's end of its private pair off the channel.
    fn accept_peer(&mut self) {
        let Some(channel) = &self.channel else { return };
        let mut space = [core::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut byte = [0u8; 1];
        let mut iov = [rustix::io::IoSliceMut::new(&mut byte)];
        let flags = RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC;
        if rustix::net::recvmsg(channel, &mut iov, &mut control, flags).is_err() {
            return;
        }
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = message {
                for sock in fds {
                    if rustix::io::ioctl_fionbio(&sock, true).is_err() {
                        continue;
                    }
                    let peer = Peer {
                        sock,
                        role: Role::New,
                        ready: PollFlags::empty(),
                    };
                    if let Err(peer) = self.peers.push(peer) {
                        // Its request is not read: the refusal answers it.
                        let busy = refusal(
                            ErrorCode::Busy,
                            "too many job requests at once (256): try again",
                        );
                        let mut buf = [0u8; 128];
                        let _ = send_answer(peer.sock.as_fd(), &busy, &mut buf);
                    }
                }
            }
        }
    }

    fn peer_readable(&mut self, i: usize, buf: &mut [u8]) {
        let Some(peer) = self.peers.get(i) else {
            return;
        };
        let Some((input, out)) = buf.split_at_mut_checked(MAX_RECORD) else {
            return;
        };
        let n = match rustix::net::recv(&peer.sock, &mut *input, RecvFlags::DONTWAIT) {
            Ok((0, _)) | Err(_) => {
                self.peer_gone(i);
                return;
            }
            Ok((n, _)) => n.min(MAX_RECORD),
        };
        let record = input.get(..n).unwrap_or(&[]);
        let role = peer.role;
        let owner = rustix::fd::AsRawFd::as_raw_fd(&peer.sock);
        let next = match (role, record::request(record)) {
            (Role::New, Some(Incoming::Request(request))) => handle_request(request, i, out, self),
            (Role::Attached(attach), Some(Incoming::Relay(frame))) => {
                relay(self.jobs, attach.job, owner, frame);
                role
            }
            // Garbage, or a record out of place: the peer goes.
            _ => Role::Finished,
        };
        if let Some(peer) = self.peers.get_mut(i) {
            peer.role = next;
        }
    }

    fn peer_gone(&mut self, i: usize) {
        if let Some(peer) = self.peers.get_mut(i) {
            peer.role = Role::Finished;
        }
    }

    /// Reads what a runner sent and handles each whole frame.
    fn runner_ready(&mut self, i: usize, buf: &mut [u8]) {
        let Some(job) = self.jobs.get_mut(i) else {
            return;
        };
        let Some(runner) = job.runner.as_mut() else {
            return;
        };
        let gone = match runner.inbox.bytes() {
            Ok(inbox) => {
                let space = inbox.get_mut(runner.have..).unwrap_or(&mut []);
                match rustix::net::recv(&runner.sock, space, RecvFlags::DONTWAIT) {
                    Ok((0, _)) => true,
                    Ok((n, _)) => {
                        runner.have = runner.have.saturating_add(n).min(RUNNER_INBOX);
                        false
                    }
                    Err(Errno::AGAIN | Errno::INTR) => false,
                    Err(_) => true,
                }
            }
            Err(_) => true,
        };
        let mut lost = gone;
        let mut consumed_total = 0usize;
        loop {
            let Some(job) = self.jobs.get_mut(i) else {
                return;
            };
            let Some(runner) = job.runner.as_mut() else {
                break;
            };
            let Ok(inbox) = runner.inbox.bytes() else {
                break;
            };
            let have = inbox.get(consumed_total..runner.have).unwrap_or(&[]);
            let (body, used) = match ferry_wire::split_frame(have, RUNNER_INBOX) {
                Ok(Some((body, used))) => (body, used),
                Ok(None) => break,
                Err(_) => {
                    lost = true;
                    break;
                }
            };
            consumed_total = consumed_total.saturating_add(used);
            // Copy out what the frame says before the job is touched again.
            let Some(frame) = link::runner_frame(body) else {
                lost = true;
                break;
            };
            match frame {
                RunnerFrame::Output { stream, data } => {
                    if job.spool.write(stream, data).is_err() {
                        log::Line::new()
                            .push(b"jobs: cannot write a spool")
                            .emit_limited();
                    }
                }
                RunnerFrame::Started { pid } => {
                    job.pid = pid;
                    job.starting = false;
                    let answer = Answer::Started { id: job.id, pid };
                    self.answer_starter(i, &answer, buf);
                }
                RunnerFrame::StdinCredit(n) => {
                    job.stdin_in_flight = job.stdin_in_flight.saturating_sub(n as usize);
                    if let Some(owner) = job.stdin_owner {
                        self.credit_owner(owner, n, buf);
                    }
                }
                RunnerFrame::Exited(t) => {
                    job.end(Some(t));
                    break;
                }
                RunnerFrame::Error {
                    code,
                    errno,
                    message,
                } => {
                    if job.starting {
                        let mut text = [0u8; 200];
                        let n = message.len().min(text.len());
                        if let (Some(dest), Some(src)) = (text.get_mut(..n), message.get(..n)) {
                            dest.copy_from_slice(src);
                        }
                        let answer = Answer::Refused {
                            code,
                            errno,
                            message: text.get(..n).unwrap_or(&[]),
                        };
                        self.answer_starter(i, &answer, buf);
                        // A job that never started leaves nothing behind.
                        if let Some(job) = self.jobs.get_mut(i) {
                            job.end(None);
                            let _ = cgroup::remove_exec(job.runner_pid);
                            job.state = State::Lost;
                            job.starting = true;
                        }
                        self.forget_unstarted(i);
                        return;
                    }
                    lost = true;
                    break;
                }
                RunnerFrame::Other => {}
            }
        }
        let Some(job) = self.jobs.get_mut(i) else {
            return;
        };
        if let Some(runner) = job.runner.as_mut() {
            // Keep what is left of a frame at the front.
            if let Ok(inbox) = runner.inbox.bytes() {
                inbox.copy_within(consumed_total.min(runner.have)..runner.have, 0);
            }
            runner.have = runner.have.saturating_sub(consumed_total);
            if lost || runner.have >= RUNNER_INBOX {
                if job.starting {
                    self.answer_starter(
                        i,
                        &refusal(ErrorCode::Internal, "the job's runner failed to start it"),
                        buf,
                    );
                    if let Some(job) = self.jobs.get_mut(i) {
                        job.end(None);
                    }
                    self.forget_unstarted(i);
                    return;
                }
                job.end(None);
            }
        }
        self.job_ended_news(i, buf);
    }

    /// Tells waiters of an ended job; attachers learn it as they drain.
    fn job_ended_news(&mut self, i: usize, buf: &mut [u8]) {
        let Some(job) = self.jobs.get(i) else { return };
        if job.running() {
            return;
        }
        for peer in self.peers.iter_mut() {
            if let Role::Waiting(id) = peer.role {
                if id == job.id {
                    let _ = send_answer(peer.sock.as_fd(), &job.end_answer(), buf);
                    peer.role = Role::Finished;
                }
            }
        }
    }

    fn answer_starter(&mut self, i: usize, answer: &Answer<'_>, buf: &mut [u8]) {
        let Some(job) = self.jobs.get(i) else { return };
        for peer in self.peers.iter_mut() {
            if let Role::Starting(id) = peer.role {
                if id == job.id {
                    let _ = send_answer(peer.sock.as_fd(), answer, buf);
                    peer.role = Role::Finished;
                }
            }
        }
    }

    /// A job whose exec failed to start leaves no entry.
    fn forget_unstarted(&mut self, i: usize) {
        if i < self.jobs.len() {
            let _ = self.jobs.remove(i);
        }
    }

    fn credit_owner(&mut self, owner: i32, n: u32, buf: &mut [u8]) {
        for peer in self.peers.iter() {
            if rustix::fd::AsRawFd::as_raw_fd(&peer.sock) == owner {
                let _ = send_answer(peer.sock.as_fd(), &Answer::Credit(n), buf);
            }
        }
    }

    /// Sends each attacher and lister what its socket takes now.
    fn pump_peers(&mut self, buf: &mut [u8]) {
        self.more = false;
        for peer in self.peers.iter_mut() {
            let sock = peer.sock.as_fd();
            peer.role = match peer.role {
                Role::Attached(attach) if !attach.blocked => {
                    let (role, more) = pump_attacher(attach, self.jobs, sock, buf);
                    self.more |= more;
                    role
                }
                Role::Listing {
                    after,
                    count,
                    viewer,
                } => pump_listing(after, count, viewer, self.jobs, sock, buf),
                role => role,
            };
        }
    }

    /// Drops finished peers (their stdin goes back to the job for the next attacher).
    fn sweep(&mut self) {
        let jobs = &mut self.jobs;
        self.peers.retain(|peer| {
            if !matches!(peer.role, Role::Finished) {
                return true;
            }
            let fd = rustix::fd::AsRawFd::as_raw_fd(&peer.sock);
            for job in jobs.iter_mut() {
                if job.stdin_owner == Some(fd) {
                    job.stdin_owner = None;
                }
            }
            false
        });
    }

    /// Starts a job: checks its name and the registry's room, forks its runner and hands it
    /// the exec. The answer comes when the runner says `Started` (or refuses).
    fn start(&mut self, uid: u32, gid: u32, name: &[u8], exec: &[u8]) -> Result<u32, Refusal> {
        if !name.is_empty() && self.jobs.iter().any(|j| j.name.as_slice() == name) {
            return Err(Refusal::new(
                ErrorCode::AlreadyExists,
                "a job has that name",
            ));
        }
        let name = heapless::Vec::from_slice(name)
            .map_err(|_| Refusal::new(ErrorCode::InvalidRequest, "job name too long"))?;
        if self.jobs.len() >= self.max_jobs {
            // Room is made by the job that ended first.
            let oldest = self
                .jobs
                .iter()
                .enumerate()
                .filter(|(_, j)| !j.running() && !j.starting)
                .min_by_key(|(_, j)| j.ended_us)
                .map(|(i, _)| i);
            let Some(oldest) = oldest else {
                return Err(Refusal::new(
                    ErrorCode::Busy,
                    "the job registry is full of running jobs (policy max_jobs)",
                ));
            };
            let _ = self.jobs.remove(oldest);
            self.close_attachers_of_missing();
        }
        let policy = policy::current();
        let os = |errno: Errno| {
            Refusal::os(
                ErrorCode::ResourceExhausted,
                errno.raw_os_error().unsigned_abs(),
                "cannot make the job's spool or runner",
            )
        };
        let mut spool = Spool::new(policy.job_spool_head, policy.job_spool_ring).map_err(os)?;
        let argv = exec_argv(exec);
        spool.set_argv(argv).map_err(os)?;
        let (ours, theirs) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(os)?;
        let id = self.next_id;
        // SAFETY: the agent is single-threaded and installs no signal handlers (see
        // `sys::fork`); the child runs the agent's own code.
        #[allow(unsafe_code)]
        let forked = unsafe { sys::fork() }.map_err(os)?;
        let runner_pid = match forked {
            sys::Forked::Child => {
                // NOTE: the runner keeps nothing of the supervisor's: no other runner's socket
                // (that runner would not see the supervisor die), no attacher, no spool, not
                // the channel (a connection process would talk to a runner).
                drop(ours);
                self.peers.clear();
                self.jobs.clear();
                self.channel = None;
                drop(spool);
                run_runner(theirs, &self.serving)
            }
            sys::Forked::Parent(pid) => pid.as_raw_nonzero().get().unsigned_abs(),
        };
        drop(theirs);
        let _ = rustix::io::ioctl_fionbio(&ours, true);
        let mut hello = [0u8; 16];
        let hello_len = link::client_hello(&mut hello).unwrap_or(0);
        let sent = send_frame(ours.as_fd(), hello.get(..hello_len).unwrap_or(&[]))
            .and_then(|()| send_frame(ours.as_fd(), exec));
        if let Err(errno) = sent {
            let _ = cgroup::kill_exec(runner_pid);
            return Err(os(errno));
        }
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let now = sys::clock_gettime(rustix::time::ClockId::Realtime);
        let job = Job {
            id,
            name,
            argv_len: argv.len() as u16,
            uid,
            gid,
            pid: 0,
            runner_pid,
            started_real: (now.tv_sec, now.tv_nsec as u32),
            started_us: clock::monotonic_us(),
            ended_us: None,
            state: State::Running,
            termination: None,
            spool,
            runner: Some(Runner {
                sock: ours,
                inbox: ScratchPages::new(RUNNER_INBOX),
                have: 0,
                ready: PollFlags::empty(),
            }),
            starting: true,
            killed: false,
            stdin_owner: None,
            stdin_in_flight: 0,
            stdin_closed: false,
        };
        // Never full: room was made above.
        let _ = self.jobs.push(job);
        Ok(id)
    }

    fn close_attachers_of_missing(&mut self) {
        let jobs = &self.jobs;
        for peer in self.peers.iter_mut() {
            if let Role::Attached(Attach { job, .. }) | Role::Waiting(job) = peer.role {
                if !jobs.iter().any(|j| j.id == job) {
                    peer.role = Role::Finished;
                }
            }
        }
    }
}

/// The client frame `frame` (header and body) holds, if it holds exactly one.
fn client_frame(frame: &[u8]) -> Option<ferry_wire::ClientFrame<'_>> {
    match ferry_wire::split_frame(frame, ferry_wire::limits::MAX_FRAME) {
        Ok(Some((body, used))) if used == frame.len() => ferry_wire::decode_client_frame(body).ok(),
        _ => None,
    }
}

/// The argv of an exec frame (cut on an entry boundary to the spool's room for it).
fn exec_argv(exec: &[u8]) -> &[u8] {
    let Some(ferry_wire::ClientFrame::Exec(request)) = client_frame(exec) else {
        return &[];
    };
    let argv = request.argv.as_bytes();
    if argv.len() <= spool::META as usize {
        return argv;
    }
    let cut = argv.get(..spool::META as usize).unwrap_or(&[]);
    let end = cut.iter().rposition(|b| *b == 0).map_or(0, |i| i + 1);
    cut.get(..end).unwrap_or(&[])
}

/// Relays an attacher's frame to its job's runner as it is: stdin (from the attacher that
/// holds the job's stdin only) or a control (a signal, a resize, a cancel); anything else,
/// or a job that has ended, and it goes nowhere.
fn relay(jobs: &mut [Job], id: u32, owner: i32, frame: &[u8]) {
    use link::client_tag::{CANCEL, RESIZE, SIGNAL, STDIN, STDIN_EOF};
    let Some(job) = jobs.iter_mut().find(|j| j.id == id) else {
        return;
    };
    let Some(runner) = &job.runner else { return };
    let owns = job.stdin_owner == Some(owner);
    let relayed = match ferry_wire::split_frame(frame, ferry_wire::limits::MAX_FRAME) {
        Ok(Some((body, used))) if used == frame.len() => match body.first() {
            Some(&STDIN) if owns => {
                // The bytes after the tag and their length's varint (the connection process's
                // session checked the frame).
                let data = body.get(1..).unwrap_or(&[]);
                let varint = data.iter().take_while(|b| **b & 0x80 != 0).count() + 1;
                let n = data.len().saturating_sub(varint);
                job.stdin_in_flight = job.stdin_in_flight.saturating_add(n);
                true
            }
            Some(&STDIN_EOF) if owns => {
                job.stdin_closed = true;
                true
            }
            Some(&(SIGNAL | RESIZE | CANCEL)) => true,
            _ => false,
        },
        _ => false,
    };
    if relayed {
        let _ = send_frame(runner.sock.as_fd(), frame);
    }
}

/// Handles a peer's first record; returns its next role.
fn handle_request(request: Request<'_>, peer: usize, out: &mut [u8], sup: &mut Supervisor) -> Role {
    let owner = sup
        .peers
        .get(peer)
        .map(|p| rustix::fd::AsRawFd::as_raw_fd(&p.sock));
    // NOTE: no copy of the peer's socket is held here: a runner forked meanwhile would keep it.
    let send = |sup: &Supervisor, answer: &Answer<'_>, out: &mut [u8]| match sup.peers.get(peer) {
        Some(p) => send_answer(p.sock.as_fd(), answer, out),
        None => Err(Errno::BADF),
    };
    let answer = |sup: &Supervisor, answer: Answer<'_>, out: &mut [u8]| {
        let _ = send(sup, &answer, out);
        Role::Finished
    };
    let (viewer, frame) = match request {
        Request::Start {
            uid,
            gid,
            name,
            exec,
        } => {
            return match sup.start(uid, gid, name, exec) {
                Ok(id) => Role::Starting(id),
                Err(refusal) => answer(sup, refused(refusal), out),
            }
        }
        Request::Frame { viewer, frame } => (viewer, frame),
    };
    let Some(frame) = client_frame(frame) else {
        return Role::Finished;
    };
    let job = match frame {
        ClientFrame::Jobs(_) => {
            return Role::Listing {
                after: 0,
                count: 0,
                viewer,
            }
        }
        ClientFrame::Attach(request) => request.job,
        ClientFrame::Wait(request) | ClientFrame::Remove(request) => request.job,
        ClientFrame::Kill(request) => request.job,
        _ => return Role::Finished,
    };
    // The job the request names, if the viewer may see it.
    let Some(i) = find(sup.jobs, job.0) else {
        return answer(sup, refusal(codes::NO_SUCH_JOB, "no such job"), out);
    };
    let Some(job) = sup.jobs.get_mut(i) else {
        return Role::Finished;
    };
    if !job.visible_to(viewer) {
        let denied = refusal(
            ErrorCode::PermissionDenied,
            "the job belongs to another user",
        );
        return answer(sup, denied, out);
    }
    match frame {
        ClientFrame::Attach(request) => {
            // NOTE: not while a previous owner's bytes are in the runner's window (the new
            // owner would overflow it: a breach, and the job lost) nor after its EOF.
            let granted = request.stdin
                && job.running()
                && job.stdin_owner.is_none()
                && job.stdin_in_flight == 0
                && !job.stdin_closed;
            if granted {
                job.stdin_owner = owner;
            }
            let (from0, lost0) = job.spool.resume(0, request.since_stdout);
            let (from1, lost1) = job.spool.resume(1, request.since_stderr);
            let header = Answer::Attached {
                id: job.id,
                from: [from0, from1],
                lost: [lost0, lost1],
                stdin: granted,
                running: job.running(),
                started_us: job.started_us,
            };
            let id = job.id;
            if send(sup, &header, out).is_err() {
                return Role::Finished;
            }
            Role::Attached(Attach {
                job: id,
                at: [from0, from1],
                follow: request.follow,
                blocked: false,
                turn: 0,
            })
        }
        ClientFrame::Wait(_) if job.running() => Role::Waiting(job.id),
        ClientFrame::Wait(_) => {
            let end = job.end_answer();
            answer(sup, end, out)
        }
        ClientFrame::Kill(request) => {
            let Some(runner) = job.runner.as_ref().filter(|_| job.state == State::Running) else {
                return answer(sup, refusal(codes::JOB_ENDED, "the job has ended"), out);
            };
            let control = match request.signal {
                0 => Control::Cancel {
                    grace_ms: request.grace_ms,
                },
                n => {
                    // The whole tree: each process of the job's exec cgroup (setsid escapees
                    // included); the runner signals the command's process group too (all
                    // there is without a cgroup). The runner lives, so its pid names its
                    // cgroup still.
                    if let Some(signal) = sys::signal_to_send(n) {
                        let _ = cgroup::signal_exec(job.runner_pid, signal);
                    }
                    Control::Signal(n)
                }
            };
            let mut frame = [0u8; 16];
            let n = link::control_frame(control, &mut frame).unwrap_or(0);
            let _ = send_frame(runner.sock.as_fd(), frame.get(..n).unwrap_or(&[]));
            job.killed = true;
            answer(sup, Answer::Done { count: 0 }, out)
        }
        _ if job.running() => answer(
            sup,
            refusal(codes::JOB_RUNNING, "the job is still running"),
            out,
        ),
        _ => {
            // A removal.
            let _ = sup.jobs.remove(i);
            sup.close_attachers_of_missing();
            answer(sup, Answer::Done { count: 0 }, out)
        }
    }
}

/// Sends an attacher what its socket takes: output from its cursors, losses, and at the end the
/// job's record (or `Done` without `follow`). Returns its next role.
fn pump_attacher(
    mut attach: Attach,
    jobs: &[Job],
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> (Role, bool) {
    let Some(job) = jobs.iter().find(|j| j.id == attach.job) else {
        return (Role::Finished, false);
    };
    // A bounded number of records per turn: the others get theirs too.
    for _ in 0..8 {
        let mut sent = false;
        for k in 0..2 {
            let stream = (attach.turn + k) % 2;
            let at = attach.at.get(stream).copied().unwrap_or(u64::MAX);
            let Some(data) = buf.get_mut(2..2 + MAX_OUTPUT) else {
                return (Role::Finished, false);
            };
            let (record_len, advance) = match job.spool.read(stream, at, data) {
                Ok(Chunk::Data(n)) => {
                    if let Some(head) = buf.get_mut(..2) {
                        head.copy_from_slice(&[record::OUTPUT_TAG, stream as u8]);
                    }
                    (2 + n, n as u64)
                }
                Ok(Chunk::Lost(lost)) => {
                    let dropped = Answer::Dropped {
                        stream: stream as u8,
                        bytes: lost,
                    };
                    (dropped.encode(buf).unwrap_or(0), lost)
                }
                Ok(Chunk::End) => continue,
                Err(_) => return (Role::Finished, false),
            };
            match send_record(sock, buf.get(..record_len).unwrap_or(&[])) {
                Ok(()) => {
                    if let Some(slot) = attach.at.get_mut(stream) {
                        *slot = at.saturating_add(advance);
                    }
                    attach.turn = (stream + 1) % 2;
                    sent = true;
                    break;
                }
                Err(Errno::AGAIN) => {
                    attach.blocked = true;
                    return (Role::Attached(attach), false);
                }
                Err(_) => return (Role::Finished, false),
            }
        }
        if !sent {
            // Caught up with both streams.
            let last = match (job.running(), attach.follow) {
                (true, true) => return (Role::Attached(attach), false),
                (true, false) => Answer::Done { count: 0 },
                (false, _) => job.end_answer(),
            };
            return match send_answer(sock, &last, buf) {
                Err(Errno::AGAIN) => {
                    attach.blocked = true;
                    (Role::Attached(attach), false)
                }
                _ => (Role::Finished, false),
            };
        }
    }
    // The bound cut it short: more next turn, at once.
    (Role::Attached(attach), true)
}

/// Lists the jobs `viewer` may see, as the socket takes them, then `Done`.
fn pump_listing(
    after: u32,
    mut count: u32,
    viewer: u32,
    jobs: &[Job],
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> Role {
    let mut after = after;
    let from = after;
    for job in jobs.iter().filter(|j| j.id > from && j.visible_to(viewer)) {
        let (argv_buf, out) = buf.split_at_mut(spool::META as usize);
        let argv = argv_buf.get_mut(..job.argv_len as usize).unwrap_or(&mut []);
        let _ = job.spool.argv(argv);
        match send_answer(sock, &Answer::Job(job.info(argv)), out) {
            Ok(()) => {
                after = job.id;
                count += 1;
            }
            Err(Errno::AGAIN) => {
                return Role::Listing {
                    after,
                    count,
                    viewer,
                }
            }
            Err(_) => return Role::Finished,
        }
    }
    match send_answer(sock, &Answer::Done { count }, buf) {
        Err(Errno::AGAIN) => Role::Listing {
            after,
            count,
            viewer,
        },
        _ => Role::Finished,
    }
}

/// A runner: a connection process serving the job's exec over `sock`, insecure (only the
/// supervisor holds the other end).
fn run_runner(sock: OwnedFd, serving: &Serving) -> ! {
    let _ = rustix::process::set_parent_process_death_signal(None);
    let _ = rustix::thread::set_name(c"ferry-job");
    let prepared = crate::conn::prepare();
    let report = match rustix::fs::open(
        c"/dev/null",
        rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(_) => sys::exit(72),
    };
    crate::conn::serve(
        sock,
        prepared,
        crate::successor::Successor::new(report),
        serving,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_wire::{
        AttachRequest, Bytes, ExecRequest, ExitStatus, JobQuery, JobRequest, KillJob, StdinMode,
        StrList,
    };

    /// A supervisor in a forked process; its channel's end for connection processes.
    fn supervisor() -> (OwnedFd, rustix::process::Pid) {
        let (theirs, ours) = new_channel().unwrap();
        let serving = Serving {
            config: ferry_wire::session::AgentConfig::DEFAULT,
            secret: None,
        };
        let parent = rustix::process::getpid();
        // SAFETY: the child runs only the agent's own code, which neither allocates nor takes
        // locks a test thread could hold, and ends with `exit`.
        #[allow(unsafe_code)]
        match unsafe { sys::fork() }.unwrap() {
            sys::Forked::Child => {
                drop(ours);
                serve(theirs, &serving, parent)
            }
            sys::Forked::Parent(pid) => (ours, pid),
        }
    }

    fn exec_frame(argv: &[u8]) -> Vec<u8> {
        let request = ExecRequest {
            argv: StrList::new(argv),
            env: StrList::default(),
            clean_env: false,
            cwd: None,
            stdin: StdinMode::Null,
            user: None,
            pty: None,
            timeout_ms: 0,
            kill_grace_ms: Some(100),
            kill_tree_on_exit: false,
            max_output: 0,
        };
        let mut buf = vec![0u8; 70_000];
        let n = ferry_wire::encode_client_frame(&ClientFrame::Exec(request), &mut buf).unwrap();
        buf.truncate(n);
        buf
    }

    /// Everything the supervisor answers `request` until it closes: each answer's debug text
    /// (output apart, as bytes per stream).
    fn ask(channel: &OwnedFd, request: &Request<'_>) -> (Vec<String>, [Vec<u8>; 2]) {
        let sock = client::open(channel.as_fd()).unwrap();
        let mut buf = vec![0u8; MAX_RECORD];
        client::send(sock.as_fd(), request, &mut buf).unwrap();
        let mut said = Vec::new();
        let mut output = [Vec::new(), Vec::new()];
        loop {
            let mut fds = [PollFd::new(&sock, PollFlags::IN)];
            let ten_s = rustix::time::Timespec {
                tv_sec: 10,
                tv_nsec: 0,
            };
            assert_eq!(
                poll(&mut fds, Some(&ten_s)).unwrap(),
                1,
                "no answer: {said:?}"
            );
            match client::receive(sock.as_fd(), &mut buf) {
                client::Received::Answer(Answer::Output { stream, data }) => {
                    output[stream as usize].extend_from_slice(data)
                }
                client::Received::Answer(answer) => said.push(format!("{answer:?}")),
                client::Received::Nothing => {}
                client::Received::Gone => return (said, output),
            }
        }
    }

    fn start(channel: &OwnedFd, name: &[u8], argv: &[u8]) -> Vec<String> {
        let exec = exec_frame(argv);
        let request = Request::Start {
            uid: 0,
            gid: 0,
            name,
            exec: &exec,
        };
        ask(channel, &request).0
    }

    /// [`ask`] with a client's request frame, as a connection process passes it on.
    fn ask_frame(
        channel: &OwnedFd,
        viewer: u32,
        frame: &ClientFrame<'_>,
    ) -> (Vec<String>, [Vec<u8>; 2]) {
        let mut buf = vec![0u8; 1024];
        let n = ferry_wire::encode_client_frame(frame, &mut buf).unwrap();
        let request = Request::Frame {
            viewer,
            frame: &buf[..n],
        };
        ask(channel, &request)
    }

    fn attach(channel: &OwnedFd, viewer: u32, job: &[u8]) -> (Vec<String>, [Vec<u8>; 2]) {
        let request = AttachRequest {
            job: Bytes(job),
            user: None,
            since_stdout: 0,
            since_stderr: 0,
            follow: true,
            stdin: false,
        };
        ask_frame(channel, viewer, &ClientFrame::Attach(request))
    }

    fn list(channel: &OwnedFd, viewer: u32) -> Vec<String> {
        ask_frame(channel, viewer, &ClientFrame::Jobs(JobQuery { user: None })).0
    }

    fn job(job: &[u8]) -> JobRequest<'_> {
        JobRequest {
            job: Bytes(job),
            user: None,
        }
    }

    #[test]
    fn a_supervisor_serves_jobs_from_start_to_removal() {
        let (channel, pid) = supervisor();
        assert_eq!(list(&channel, ANY_VIEWER), ["Done { count: 0 }"]);
        let said = start(
            &channel,
            b"t1",
            b"/bin/sh\0-c\0echo hi; echo err >&2; sleep 0.3; echo bye\0",
        );
        assert!(
            said.len() == 1 && said[0].starts_with("Started { id: 1,"),
            "{said:?}"
        );
        // Attached mid-run: everything from the start, then the record.
        let (said, output) = attach(&channel, ANY_VIEWER, b"1");
        assert_eq!(output[0], b"hi\nbye\n");
        assert_eq!(output[1], b"err\n");
        assert!(said[0].starts_with("Attached { id: 1,"), "{said:?}");
        assert!(said[1].starts_with("Ended("), "{said:?}");
        assert!(said[1].contains(&format!("{:?}", ExitStatus::Code(0))));
        // Again, by name, once it ended: the same bytes.
        let (_, again) = attach(&channel, ANY_VIEWER, b"t1");
        assert_eq!(again, output);
        // Its name stays taken while it exists.
        let said = start(&channel, b"t1", b"/bin/true\0");
        assert!(said[0].contains("AlreadyExists"), "{said:?}");
        // A start that fails is the exec's error, and leaves no entry.
        let said = start(&channel, b"", b"/nonexistent/program\0");
        assert!(said[0].contains("NotFound"), "{said:?}");
        let said = list(&channel, ANY_VIEWER);
        assert_eq!(said.len(), 2, "{said:?}");
        assert!(said[0].contains("id: 1,") && said[1] == "Done { count: 1 }");
        // Another user's job.
        let (said, _) = attach(&channel, 1234, b"t1");
        assert!(said[0].contains("PermissionDenied"), "{said:?}");
        assert_eq!(list(&channel, 1234), ["Done { count: 0 }"]);
        // Wait on an ended job: its record at once; kill: ended; remove: gone.
        let wait = |id: &[u8]| ask_frame(&channel, ANY_VIEWER, &ClientFrame::Wait(job(id))).0;
        assert!(wait(b"t1")[0].starts_with("Ended("));
        let kill = |job: &[u8]| {
            let kill = KillJob {
                job: Bytes(job),
                user: None,
                signal: 0,
                grace_ms: Some(100),
            };
            ask_frame(&channel, ANY_VIEWER, &ClientFrame::Kill(kill)).0
        };
        let said = kill(b"t1");
        assert!(
            said[0].contains(&format!("{:?}", codes::JOB_ENDED)),
            "{said:?}"
        );
        let remove = |id: &[u8]| ask_frame(&channel, ANY_VIEWER, &ClientFrame::Remove(job(id))).0;
        assert_eq!(remove(b"t1"), ["Done { count: 0 }"]);
        let (said, _) = attach(&channel, ANY_VIEWER, b"t1");
        assert!(
            said[0].contains(&format!("{:?}", codes::NO_SUCH_JOB)),
            "{said:?}"
        );
        // A running job: not removed; killed (its tree); waited for.
        let said = start(&channel, b"sleeper", b"/bin/sh\0-c\0sleep 30; echo never\0");
        assert!(said[0].starts_with("Started { id: 3,"), "{said:?}");
        let said = remove(b"sleeper");
        assert!(
            said[0].contains(&format!("{:?}", codes::JOB_RUNNING)),
            "{said:?}"
        );
        assert_eq!(kill(b"sleeper"), ["Done { count: 0 }"]);
        let said = wait(b"3");
        assert!(said[0].contains("Cancelled"), "{said:?}");
        let said = list(&channel, ANY_VIEWER);
        assert!(said[0].contains("state: 2"), "killed: {said:?}");
        // Garbage on the channel itself (no descriptor, a long record): ignored.
        rustix::net::send(&channel, &[0xee; 3000], SendFlags::empty()).unwrap();
        // Garbage on a private line: that peer goes, the supervisor serves on.
        let sock = client::open(channel.as_fd()).unwrap();
        rustix::net::send(&sock, b"\xff\x01garbage", SendFlags::empty()).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(
            rustix::net::recv(&sock, &mut buf, RecvFlags::empty())
                .unwrap()
                .0,
            0
        );
        // A frame that is no job request, a cut one, or two: that peer goes too.
        assert!(ask_frame(&channel, ANY_VIEWER, &ClientFrame::StdinEof)
            .0
            .is_empty());
        let mut two = vec![0u8; 64];
        let n = ferry_wire::encode_client_frame(&ClientFrame::Wait(job(b"3")), &mut two).unwrap();
        two.truncate(n);
        for frame in [&two[..n - 1], &[two.clone(), two.clone()].concat()] {
            let request = Request::Frame {
                viewer: ANY_VIEWER,
                frame,
            };
            assert!(ask(&channel, &request).0.is_empty());
        }
        assert_eq!(list(&channel, ANY_VIEWER).len(), 2);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
    }
}
