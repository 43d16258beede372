//! The listener: bind, accept, and fork one process per connection, never more than
//! `max_connections` at once; beyond that a client is told `Busy` at once. It never reads from
//! a client, so no client can slow it down. Over vsock only the host (and the CIDs the policy
//! allows) may connect; out of descriptors, a client is still told so.

use core::ffi::CStr;

use ferry_wire::session::{encode_refusal, Refusal};
use ferry_wire::ErrorCode;
use linux_raw_sys::vm_sockets::{VMADDR_CID_ANY, VMADDR_CID_HOST, VMADDR_CID_LOCAL};
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::fd::OwnedFd;
use rustix::io::Errno;
use rustix::net::{AddressFamily, SendFlags, SocketAddrUnix, SocketFlags, SocketType};
use rustix::process::Signal;

use crate::auth::Serving;
use crate::config::ListenAddr;
use crate::policy::{Policy, MAX_ALLOW_CIDS, MAX_CONNECTIONS};
use crate::power::{self, PowerRequest};
use crate::successor::{report, Successor};
use crate::sys::{self, VsockAddr};
use crate::{cgroup, clock, conn, log};

/// Creates the listening socket; a Unix socket gets the policy's mode and group.
pub fn bind(addr: &ListenAddr, policy: &Policy) -> Result<OwnedFd, Errno> {
    let flags = SocketFlags::CLOEXEC;
    let sock = match addr {
        ListenAddr::Vsock(port) => {
            let sock =
                rustix::net::socket_with(AddressFamily::VSOCK, SocketType::STREAM, flags, None)?;
            let any = linux_raw_sys::vm_sockets::VMADDR_CID_ANY as u32;
            rustix::net::bind(&sock, &VsockAddr::new(any, *port))?;
            sock
        }
        ListenAddr::Unix { path } => {
            let nul = path.iter().position(|b| *b == 0).ok_or(Errno::INVAL)?;
            let path = path
                .get(..=nul)
                .and_then(crate::sys::cstr_with_nul)
                .ok_or(Errno::INVAL)?;
            let sock =
                rustix::net::socket_with(AddressFamily::UNIX, SocketType::STREAM, flags, None)?;
            let addr = SocketAddrUnix::new(path)?;
            // Whoever can connect can run commands: the socket has exactly the policy's mode
            // (0600 unless widened), whatever umask the agent was started with. The kernel
            // creates it as 0777 less the umask, so that umask is set around `bind` (no moment
            // with a wider mode) and restored at once: commands inherit the agent's own.
            let umask = rustix::process::umask(socket_umask(policy.socket_mode));
            let mut bound = rustix::net::bind(&sock, &addr);
            // A socket file left by an earlier run makes bind fail: it is removed only when
            // nobody listens on it. A live agent's socket is never taken over (that agent would
            // keep running, unreachable): this one fails instead.
            if bound == Err(Errno::ADDRINUSE) && is_stale_socket(path, &addr) {
                let _ = rustix::fs::unlink(path);
                bound = rustix::net::bind(&sock, &addr);
            }
            rustix::process::umask(umask);
            bound?;
            if let Some(gid) = policy.socket_group {
                // Before `listen`: nobody can connect yet. Not through a symlink: the path is
                // the socket just bound, nothing else.
                let group = Some(rustix::fs::Gid::from_raw(gid));
                let changed = rustix::fs::chownat(
                    rustix::fs::CWD,
                    path,
                    None,
                    group,
                    rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
                );
                if let Err(errno) = changed {
                    let _ = rustix::fs::unlink(path);
                    return Err(errno);
                }
            }
            sock
        }
    };
    rustix::net::listen(&sock, 1024)?;
    Ok(sock)
}

/// The umask under which `bind` creates a Unix socket with permissions `mode` (its
/// permission bits; anything else is not a socket's to have).
fn socket_umask(mode: u32) -> rustix::fs::Mode {
    rustix::fs::Mode::from_raw_mode(!mode & 0o777)
}

/// Whether `path` is a socket file nobody listens on: a connection to it is refused. Anything
/// else (a listener, even one whose backlog is full; a file that is not a socket; no
/// permission to tell) is left alone. If another agent is listening there, it sees this probe
/// as a client that left without a word. (Two agents starting at once on the same stale file
/// can still both remove it; the first one's socket is then lost. Not worth a lock file.)
fn is_stale_socket(path: &CStr, addr: &SocketAddrUnix) -> bool {
    let is_socket = rustix::fs::lstat(path).is_ok_and(|stat| {
        rustix::fs::FileType::from_raw_mode(stat.st_mode) == rustix::fs::FileType::Socket
    });
    if !is_socket {
        return false;
    }
    let flags = SocketFlags::CLOEXEC | SocketFlags::NONBLOCK;
    let Ok(probe) = rustix::net::socket_with(AddressFamily::UNIX, SocketType::STREAM, flags, None)
    else {
        return false;
    };
    rustix::net::connect(&probe, addr) == Err(Errno::CONNREFUSED)
}

/// Spare connection processes kept waiting in `accept`. One is being replaced after each
/// connection; the other takes the next client meanwhile, so back-to-back connections never
/// wait for a `fork`. A spare costs a few KiB of private memory (its pages are shared with the
/// listener until written).
const SPARES: usize = 2;

/// How long the listener waits before trying again after a failed `pipe` or `fork`.
const RETRY_PAUSE: Timespec = Timespec {
    tv_sec: 0,
    tv_nsec: 50_000_000,
};

/// How often the listener retries removing exec cgroups that still held processes.
const LEFTOVER_PAUSE: Timespec = Timespec {
    tv_sec: 2,
    tv_nsec: 0,
};

/// At most this many clients are turned away in one go before the listener looks at its
/// children again (one may have ended and freed a place).
const REFUSALS_PER_ROUND: usize = 64;

/// The answer to a client beyond `max_connections`.
// The message cannot carry the number: a refusal's text is static (the number is in the log).
const BUSY: Refusal = Refusal::new(ErrorCode::Busy, "agent busy: at its connection limit");

/// Serves connections forever, each in its own process, at most `policy.max_connections` at
/// once.
///
/// Processes are forked *before* their connection arrives: [`SPARES`] spares wait in `accept`,
/// and each tells the listener through its own pipe once it has taken a connection (see
/// [`Successor`]); only then is its replacement forked. A client never waits for a fork, and
/// the listener still never reads from a client.
///
/// The pipe also counts the connection: the listener keeps its read end until the connection
/// process exits (EOF), and forks spares only while connections and spares together are fewer
/// than `max_connections`. At the limit no spare waits, so the listener accepts each waiting
/// client itself and answers `Busy` at once, without blocking.
pub fn serve_forever(listener: OwnedFd, is_init: bool, policy: &Policy, serving: &Serving) -> ! {
    // With SIGCHLD ignored the kernel reaps our children (connection processes, and as PID 1 or
    // subreaper every orphan) the moment they exit: no zombies, and no `wait` that could steal
    // a status a connection process is waiting for.
    if let Err(errno) = sys::set_signal_ignored(Signal::CHILD, true) {
        log::error(b"cannot ignore SIGCHLD", errno);
    }
    if !is_init {
        // Orphans of our commands come to us (and are reaped) instead of the system's init.
        let _ = rustix::process::set_child_subreaper(Some(rustix::process::getpid()));
    }
    // Before the first fork: every agent process shares the log's rate limit.
    if let Err(errno) = sys::map_shared_state() {
        log::error(b"cannot map the shared log limit", errno);
    }
    let max = policy.max_connections.clamp(1, MAX_CONNECTIONS) as usize;
    ensure_descriptor_room(max);
    let gate = Gate::new(&listener, policy);
    let listener_pid = rustix::process::getpid();
    let mut reserve = Reserve::open();
    let mut children = Children::new();
    let mut leftovers = Leftovers::new();
    // Start-up is over: the stack it used goes.
    sys::trim_resident_memory();
    loop {
        let mut failure = None;
        // Before the spares, which inherit its channel: the jobs' supervisor, forked again if
        // it died (old spares keep the dead channel and answer job requests with an error).
        if children.supervisor.is_none() {
            match fork_supervisor() {
                Ok(ForkedSupervisor::Supervisor(channel)) => {
                    children.forget();
                    drop((listener, reserve));
                    crate::jobs::serve(channel, serving, listener_pid)
                }
                Ok(ForkedSupervisor::Listener(channel)) => children.supervisor = Some(channel),
                Err(errno) => log::error(b"cannot start the jobs' supervisor", errno),
            }
        }
        while children.spares() < SPARES && children.len() < max {
            match fork_spare() {
                Ok(Forked::Spare(report)) => {
                    // The other children's report pipes and the reserve are the listener's: a
                    // spare (and the connection it becomes) holds only its own pipe, and the
                    // jobs' channel.
                    let channel = children.supervisor.take();
                    children.forget();
                    drop(reserve);
                    if let Some(channel) = channel {
                        crate::jobs::set_channel(channel);
                    }
                    spare(listener, report, listener_pid, &gate, serving)
                }
                Ok(Forked::Listener(taken, pid)) => children.add_spare(taken, pid),
                Err(errno) => {
                    failure = Some(errno);
                    break;
                }
            }
        }
        // Nobody waits in `accept`: the listener answers whoever comes, at once.
        let turn_away = |children: &Children| {
            if children.spares() > 0 {
                None
            } else if children.len() >= max {
                Some(BUSY)
            } else {
                failure.map(|errno: Errno| {
                    let errno = errno.raw_os_error().unsigned_abs();
                    Refusal::os(
                        ErrorCode::ResourceExhausted,
                        errno,
                        "cannot fork a connection process",
                    )
                })
            }
        };
        let watch = turn_away(&children).is_some().then_some(&listener);
        let pause = match (failure, leftovers.is_empty()) {
            (Some(_), _) => Some(&RETRY_PAUSE),
            (None, false) => Some(&LEFTOVER_PAUSE),
            (None, true) => None,
        };
        let clients_waiting = children.wait(watch, pause);
        if let Some(request) = children.power.take() {
            if is_init {
                // Nothing is accepted any more: the socket closes before everything stops.
                drop((listener, children, reserve));
                power::halt(request)
            }
            power::ask_system(request, policy);
        }
        for (pid, clean) in children.ended.drain(..) {
            connection_ended(pid, clean, &mut leftovers);
        }
        leftovers.retry(cgroup::remove_exec);
        // A child's news may have freed a place: then a spare is forked instead.
        if let (true, Some(refusal)) = (clients_waiting, turn_away(&children)) {
            refuse_pending(&listener, &gate, &mut reserve, refusal);
            if refusal.code == ErrorCode::Busy {
                log::Line::new()
                    .push(b"agent busy: turned clients away at ")
                    .num(max as u64)
                    .push(b" connections")
                    .emit_limited();
            } else {
                // A pause before the next `fork`, so a failing one does not spin.
                clock::sleep_ms(50);
            }
        }
    }
}

/// Raises the soft descriptor limit (up to the hard one) if `max_connections` needs more than
/// it allows: the listener holds a pipe per connection process. Commands inherit the raised
/// limit; the default `max_connections` needs no raise.
fn ensure_descriptor_room(max_connections: usize) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    // The standard three, the socket, the reserve, a pipe being made, and some slack.
    let needed = (max_connections as u64).saturating_add(16);
    let limit = getrlimit(Resource::Nofile);
    let Some(current) = limit.current else { return };
    if current >= needed {
        return;
    }
    let raised = limit.maximum.map_or(needed, |maximum| maximum.min(needed));
    let done = raised > current
        && setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(raised),
                maximum: limit.maximum,
            },
        )
        .is_ok();
    if !done || raised < needed {
        log::Line::new()
            .push(b"RLIMIT_NOFILE allows fewer descriptors than max_connections needs (")
            .num(needed)
            .push(b"): beyond it clients are told the agent is out of resources")
            .emit();
    }
}

/// Who may connect, checked on every accepted connection before a byte is sent.
struct Gate {
    /// For a vsock listener; a Unix socket is guarded by its mode and group instead.
    vsock: Option<VsockPeers>,
}

/// The vsock peers allowed: the host, and the policy's CIDs.
struct VsockPeers {
    /// This guest's CID, when it could be learnt at start (otherwise asked again at each check).
    own_cid: Option<u32>,
    allowed: heapless::Vec<u32, MAX_ALLOW_CIDS>,
}

impl Gate {
    fn new(listener: &OwnedFd, policy: &Policy) -> Gate {
        let is_vsock = rustix::net::getsockname(listener)
            .is_ok_and(|addr| addr.address_family() == AddressFamily::VSOCK);
        let vsock = is_vsock.then(|| VsockPeers {
            own_cid: local_cid(),
            allowed: policy.allow_cids.clone(),
        });
        Gate { vsock }
    }

    /// Accepts the next connection (close-on-exec); `Ok(None)` when its peer was turned away:
    /// closed without a word, and logged.
    fn accept(&self, listener: &OwnedFd) -> Result<Option<OwnedFd>, Errno> {
        let Some(peers) = &self.vsock else {
            return rustix::net::accept_with(listener, SocketFlags::CLOEXEC).map(Some);
        };
        let (conn, addr) = rustix::net::acceptfrom_with(listener, SocketFlags::CLOEXEC)?;
        let peer = addr.as_ref().and_then(VsockAddr::from_any);
        if let Some(peer) = peer {
            let own_cid = peers.own_cid.or_else(local_cid);
            if peer_allowed(peer.cid(), own_cid, &peers.allowed) {
                return Ok(Some(conn));
            }
        }
        drop(conn);
        let mut line = log::Line::new();
        line.push(b"refused a vsock connection from ");
        match peer {
            Some(peer) => line
                .push(b"CID ")
                .num(u64::from(peer.cid()))
                .push(b" port ")
                .num(u64::from(peer.port())),
            None => line.push(b"an unknown address"),
        };
        line.emit_limited();
        Ok(None)
    }
}

/// This guest's vsock CID, from `/dev/vsock`.
fn local_cid() -> Option<u32> {
    use rustix::fs::{Mode, OFlags};
    let dev = rustix::fs::open(
        c"/dev/vsock",
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    );
    let cid = sys::vsock_local_cid(dev.ok()?).ok()?;
    (cid != VMADDR_CID_ANY as u32).then_some(cid)
}

/// Whether a vsock peer at `cid` may connect: the host (2) or a CID in `allowed`, but never
/// this guest itself, whether as the local CID (1) or as its own (`own_cid`), listed or not: a
/// process in the guest must not reach the agent that runs its commands.
pub fn peer_allowed(cid: u32, own_cid: Option<u32>, allowed: &[u32]) -> bool {
    if cid == VMADDR_CID_LOCAL || Some(cid) == own_cid || cid == VMADDR_CID_ANY as u32 {
        return false;
    }
    cid == VMADDR_CID_HOST || allowed.contains(&cid)
}

/// One descriptor held back (`/dev/null`): out of descriptors, `accept` fails at once, before
/// even waiting for a client, so the client would wait forever. Freeing this one lets a single
/// `accept` succeed to tell the client why it is refused.
struct Reserve(Option<OwnedFd>);

/// The answer to a client when no descriptor is left.
fn out_of_descriptors(errno: Errno) -> Refusal {
    let errno = errno.raw_os_error().unsigned_abs();
    Refusal::os(
        ErrorCode::ResourceExhausted,
        errno,
        "out of file descriptors",
    )
}

impl Reserve {
    fn open() -> Reserve {
        use rustix::fs::{Mode, OFlags};
        let flags = OFlags::RDONLY | OFlags::CLOEXEC;
        Reserve(rustix::fs::open(c"/dev/null", flags, Mode::empty()).ok())
    }

    /// `accept` failed with `errno` (EMFILE or ENFILE): frees the reserve, accepts one client
    /// (blocking, as a spare's `accept` does) and answers `ResourceExhausted`, then takes the
    /// reserve back. `false` when nobody could be answered: the caller pauses.
    fn answer_one(&mut self, listener: &OwnedFd, gate: &Gate, errno: Errno) -> bool {
        log::error(b"accept: out of descriptors", errno);
        let Some(reserve) = self.0.take() else {
            *self = Reserve::open();
            return false;
        };
        drop(reserve);
        let answered = match gate.accept(listener) {
            Ok(Some(conn)) => {
                refuse_connection(&conn, out_of_descriptors(errno));
                true
            }
            Ok(None) => true,
            Err(_) => false,
        };
        *self = Reserve::open();
        answered
    }
}

/// The listener's children, each by the read end of its report pipe: spares waiting for a
/// connection, and connection processes serving one.
struct Children {
    all: heapless::Vec<ChildProcess, { MAX_CONNECTIONS as usize + SPARES }>,
    /// The children whose pipes closed at the last [`Children::wait`]: each pid, and whether
    /// it ended cleanly (its tree is left alone) rather than died.
    ended: heapless::Vec<(u32, bool), { MAX_CONNECTIONS as usize + SPARES }>,
    /// A shutdown a connection process acknowledged at the last [`Children::wait`].
    power: Option<PowerRequest>,
    /// The connection processes' end of the channel to the jobs' supervisor, while it lives:
    /// it hangs up once the supervisor's end is closed (only the supervisor holds it), that
    /// is, once the supervisor died.
    supervisor: Option<OwnedFd>,
}

struct ChildProcess {
    report: OwnedFd,
    pid: u32,
    /// It has taken its connection (its byte came); it stays until the pipe's EOF.
    serving: bool,
    /// It said its conversation ended normally ([`report::ENDED_CLEANLY`]).
    clean: bool,
}

impl Children {
    fn new() -> Children {
        Children {
            all: heapless::Vec::new(),
            ended: heapless::Vec::new(),
            power: None,
            supervisor: None,
        }
    }

    /// Spares and connection processes together.
    fn len(&self) -> usize {
        self.all.len()
    }

    fn spares(&self) -> usize {
        self.all.iter().filter(|child| !child.serving).count()
    }

    fn add_spare(&mut self, report: OwnedFd, pid: u32) {
        // Never full: spares are forked only while fewer than `MAX_CONNECTIONS` exist.
        let _ = self.all.push(ChildProcess {
            report,
            pid,
            serving: false,
            clean: false,
        });
    }

    /// Closes every pipe (in a new spare: they are the listener's).
    fn forget(&mut self) {
        self.all.clear();
        self.supervisor = None;
    }

    /// Blocks until a child has news (a spare took a connection or died, a connection
    /// process ended), or `timeout` passes, or a client waits on `listener` (when given);
    /// applies the news. Returns whether clients wait.
    fn wait(&mut self, listener: Option<&OwnedFd>, timeout: Option<&Timespec>) -> bool {
        const CAPACITY: usize = MAX_CONNECTIONS as usize + SPARES;
        let mut ready = heapless::Vec::<bool, CAPACITY>::new();
        let clients_waiting;
        let mut ready_supervisor_gone = false;
        {
            let mut fds = heapless::Vec::<PollFd<'_>, { CAPACITY + 2 }>::new();
            for child in &self.all {
                let _ = fds.push(PollFd::new(&child.report, PollFlags::IN));
            }
            if let Some(listener) = listener {
                let _ = fds.push(PollFd::new(listener, PollFlags::IN));
            }
            if let Some(channel) = &self.supervisor {
                // Nothing is ever sent to this end: only its hangup wakes us.
                let _ = fds.push(PollFd::new(channel, PollFlags::empty()));
            }
            if poll(&mut fds, timeout).is_err() {
                return false;
            }
            if self.supervisor.is_some() && fds.last().is_some_and(|fd| !fd.revents().is_empty()) {
                log::Line::new()
                    .push(b"the jobs' supervisor died: its jobs end; starting a new one")
                    .emit_limited();
                // A pause, so a supervisor that keeps dying cannot turn into a fork storm.
                clock::sleep_ms(50);
                ready_supervisor_gone = true;
            }
            for fd in fds.iter().take(self.all.len()) {
                let _ = ready.push(!fd.revents().is_empty());
            }
            clients_waiting = listener.is_some()
                && fds
                    .get(self.all.len())
                    .is_some_and(|fd| fd.revents().contains(PollFlags::IN));
        }
        if ready_supervisor_gone {
            self.supervisor = None;
        }
        let mut ready = ready.into_iter();
        let ended = &mut self.ended;
        let power = &mut self.power;
        self.all.retain_mut(|child| {
            if ready.next() != Some(true) {
                return true;
            }
            // At least everything a connection process ever sends: each of its writes is whole
            // (a pipe never splits a write this small), so a message is never cut.
            let mut bytes = [0u8; 2 + report::MAX_MESSAGE + 1];
            let read = match rustix::io::read(&child.report, &mut bytes) {
                Ok(n) => bytes.get(..n).unwrap_or(&[]),
                Err(_) => &[],
            };
            let mut rest = read.iter();
            while let Some(byte) = rest.next() {
                match *byte {
                    // A spare took its connection: it is counted until it exits.
                    report::TAKEN => child.serving = true,
                    report::ENDED_CLEANLY => child.clean = true,
                    // Only a connection process that served an authorized shutdown writes
                    // this (nothing else holds its pipe).
                    kind @ (report::POWER_OFF | report::REBOOT) if child.serving => {
                        let mut grace = [0u8; 4];
                        for slot in &mut grace {
                            *slot = rest.next().copied().unwrap_or(0);
                        }
                        *power = Some(PowerRequest {
                            reboot: kind == report::REBOOT,
                            grace_ms: u32::from_le_bytes(grace),
                        });
                    }
                    // Not a byte we send: ignored.
                    _ => {}
                }
            }
            if !read.is_empty() {
                return true;
            }
            if !child.serving {
                // The spare died before accepting (killed, or a bug). Pause so a spare that
                // keeps dying cannot turn into a fork storm.
                clock::sleep_ms(10);
            }
            // A connection process ended, whatever the cause; a spare ran no command.
            let _ = ended.push((child.pid, child.clean || !child.serving));
            false
        });
        clients_waiting
    }
}

/// A connection process `pid` ended, `clean`ly or not (see [`report::ENDED_CLEANLY`]): one that
/// died has its exec cgroup killed, since its command's tree would otherwise run on unwatched
/// (without a cgroup, its command's direct child dies by its death signal, see
/// `bounds::die_with_parent`, and nothing more is done). Its exec cgroup is removed, or
/// remembered while it still holds processes.
fn connection_ended(pid: u32, clean: bool, leftovers: &mut Leftovers) {
    if !clean {
        let _ = cgroup::kill_exec(pid);
    }
    if cgroup::remove_exec(pid) == Err(Errno::BUSY) {
        leftovers.push(pid);
    }
}

/// How many exec cgroups the listener remembers to remove once they are empty.
const LEFTOVERS: usize = 256;

/// Exec cgroups that still held processes when their connection ended (daemons left after a
/// normal end, or a killed tree still exiting), by connection pid, oldest first; retried at
/// every wake of the listener, and every [`LEFTOVER_PAUSE`] while any is left.
///
/// NOTE: bounded. When full, the oldest is forgotten and its directory left in place (it is
/// harmless, and `kill-all` still reaches its processes); an operator can `rmdir` it.
struct Leftovers(heapless::Deque<u32, LEFTOVERS>);

impl Leftovers {
    fn new() -> Leftovers {
        Leftovers(heapless::Deque::new())
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn push(&mut self, pid: u32) {
        if self.0.iter().any(|p| *p == pid) {
            return;
        }
        if self.0.is_full() {
            let _ = self.0.pop_front();
            log::Line::new()
                .push(b"cgroup: too many exec cgroups left behind; the oldest stays")
                .emit_limited();
        }
        let _ = self.0.push_back(pid);
    }

    /// Tries `remove` on each; keeps those still busy.
    fn retry(&mut self, mut remove: impl FnMut(u32) -> Result<(), Errno>) {
        for _ in 0..self.0.len() {
            let Some(pid) = self.0.pop_front() else { break };
            if remove(pid) == Err(Errno::BUSY) {
                let _ = self.0.push_back(pid);
            }
        }
    }
}

/// Each side of [`fork_supervisor`].
enum ForkedSupervisor {
    /// The new supervisor, with its end of the channel.
    Supervisor(OwnedFd),
    /// The listener, with the connection processes' end of the channel.
    Listener(OwnedFd),
}

/// Forks the jobs' supervisor with a fresh channel.
fn fork_supervisor() -> Result<ForkedSupervisor, Errno> {
    let (theirs, ours) = crate::jobs::new_channel()?;
    // SAFETY: the agent is single-threaded and installs no signal handlers; the child runs the
    // agent's own code (see `sys::fork`).
    #[allow(unsafe_code)]
    let forked = unsafe { sys::fork() }?;
    match forked {
        sys::Forked::Child => {
            drop(ours);
            Ok(ForkedSupervisor::Supervisor(theirs))
        }
        sys::Forked::Parent(_) => {
            drop(theirs);
            Ok(ForkedSupervisor::Listener(ours))
        }
    }
}

/// Each side of [`fork_spare`], with its end of the report pipe (and the listener, the
/// spare's pid).
enum Forked {
    Spare(OwnedFd),
    Listener(OwnedFd, u32),
}

fn fork_spare() -> Result<Forked, Errno> {
    let (taken, report) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .inspect_err(|&errno| log::error(b"cannot create a pipe", errno))?;
    // SAFETY: the agent is single-threaded and installs no signal handlers; the child runs the
    // agent's own code (see `sys::fork`).
    #[allow(unsafe_code)]
    let forked = unsafe { sys::fork() };
    match forked {
        Ok(sys::Forked::Child) => Ok(Forked::Spare(report)),
        Ok(sys::Forked::Parent(pid)) => Ok(Forked::Listener(
            taken,
            pid.as_raw_nonzero().get().unsigned_abs(),
        )),
        Err(errno) => {
            log::error(b"cannot fork a connection process", errno);
            Err(errno)
        }
    }
}

/// A spare connection process: takes the next connection it may serve, tells the listener,
/// serves it.
fn spare(
    listener: OwnedFd,
    report: OwnedFd,
    listener_pid: rustix::process::Pid,
    gate: &Gate,
    serving: &Serving,
) -> ! {
    // A spare must not outlive its listener (when the agent runs as an ordinary process and is
    // stopped): it would keep accepting on a socket nobody manages. A connection already taken
    // is served to its end, as before.
    let _ = rustix::process::set_parent_process_death_signal(Some(Signal::KILL));
    if rustix::process::getppid() != Some(listener_pid) {
        // The listener died before the death signal was armed.
        sys::exit(0);
    }
    sys::prefault_code();
    // Before anything else takes descriptors.
    let mut reserve = Reserve::open();
    let prepared = conn::prepare();
    // Preparing resolved the default user through two file buffers on the stack: give them back
    // while waiting, and fault in what a connection will use instead.
    sys::trim_resident_memory();
    sys::prefault_stack();
    let conn = loop {
        match gate.accept(&listener) {
            Ok(Some(conn)) => break conn,
            // A peer turned away: this spare is still free.
            Ok(None) => {}
            Err(Errno::INTR | Errno::CONNABORTED | Errno::AGAIN) => {}
            Err(errno @ (Errno::MFILE | Errno::NFILE)) => {
                if !reserve.answer_one(&listener, gate, errno) {
                    clock::sleep_ms(10);
                }
            }
            Err(errno @ (Errno::NOBUFS | Errno::NOMEM)) => {
                log::error(b"accept", errno);
                clock::sleep_ms(10);
            }
            Err(errno) => {
                log::error(b"accept", errno);
                clock::sleep_ms(100);
            }
        }
    };
    let _ = rustix::process::set_parent_process_death_signal(None);
    drop(listener);
    // The connection may need that descriptor more.
    drop(reserve);
    conn::serve(conn, prepared, Successor::new(report), serving)
}

/// Nobody else accepts (no spare waits): answers up to [`REFUSALS_PER_ROUND`] waiting clients
/// with `refusal`, each at once, never blocking.
fn refuse_pending(listener: &OwnedFd, gate: &Gate, reserve: &mut Reserve, refusal: Refusal) {
    for _ in 0..REFUSALS_PER_ROUND {
        // No spare exists now, so nothing else accepts between the poll and the accept.
        let mut fds = [PollFd::new(listener, PollFlags::IN)];
        match poll(&mut fds, Some(&Timespec::default())) {
            Ok(1..) if fds[0].revents().contains(PollFlags::IN) => {}
            _ => break,
        }
        match gate.accept(listener) {
            Ok(Some(conn)) => refuse_connection(&conn, refusal),
            Ok(None) => {}
            Err(errno @ (Errno::MFILE | Errno::NFILE)) => {
                if !reserve.answer_one(listener, gate, errno) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
}

/// Tells a client we will not serve its connection, without ever blocking the listener.
fn refuse_connection(conn: &OwnedFd, refusal: Refusal) {
    let mut buf = [0u8; 128];
    let len = encode_refusal(&refusal, &mut buf).unwrap_or(0);
    if let Some(frame @ [_, ..]) = buf.get(..len) {
        let _ = rustix::net::send(conn, frame, SendFlags::DONTWAIT | SendFlags::NOSIGNAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_wire::{decode_agent_frame, split_frame, AgentFrame};

    fn pair() -> (OwnedFd, OwnedFd) {
        rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap()
    }

    /// The one frame `refuse_connection` sent, as (code, errno, message).
    fn refusal_seen(refusal: Refusal) -> (ErrorCode, u32, String) {
        let (agent, client) = pair();
        refuse_connection(&agent, refusal);
        drop(agent);
        let mut buf = [0u8; 256];
        let n = rustix::io::read(&client, &mut buf).unwrap();
        let (body, used) = split_frame(&buf[..n], 256).unwrap().unwrap();
        assert_eq!(used, n, "one frame, nothing else");
        let AgentFrame::Error(error) = decode_agent_frame(body).unwrap() else {
            panic!("not an error frame");
        };
        (error.code, error.errno, error.message.to_owned())
    }

    #[test]
    fn a_refused_connection_gets_one_error_frame() {
        let errno = Errno::AGAIN.raw_os_error() as u32;
        let refusal = Refusal::os(ErrorCode::ResourceExhausted, errno, "cannot fork");
        let (code, seen_errno, _) = refusal_seen(refusal);
        assert_eq!(code, ErrorCode::ResourceExhausted);
        assert_eq!(seen_errno, errno);
        let (code, seen_errno, message) = refusal_seen(BUSY);
        assert_eq!((code, seen_errno), (ErrorCode::Busy, 0));
        assert!(message.starts_with("agent busy"), "{message}");
        let (code, seen_errno, message) = refusal_seen(out_of_descriptors(Errno::MFILE));
        assert_eq!(code, ErrorCode::ResourceExhausted);
        assert_eq!(seen_errno, Errno::MFILE.raw_os_error() as u32);
        assert_eq!(message, "out of file descriptors");
    }

    #[test]
    fn a_refusal_never_blocks_on_a_full_socket() {
        let (agent, _client) = pair();
        // Fill the socket until a send would block; the refusal must return at once anyway.
        let chunk = [0u8; 4096];
        while rustix::net::send(&agent, &chunk, SendFlags::DONTWAIT).is_ok() {}
        let started = std::time::Instant::now();
        refuse_connection(&agent, BUSY);
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn vsock_peers_at_the_edges() {
        let own = Some(7);
        // The host, by default; nobody else.
        assert!(peer_allowed(2, own, &[]));
        assert!(peer_allowed(2, None, &[]));
        for cid in [0, 3, 6, 8, 1000, u32::MAX - 1] {
            assert!(!peer_allowed(cid, own, &[]), "{cid}");
        }
        // The policy's CIDs too, exactly those.
        assert!(peer_allowed(3, own, &[3, 1000]));
        assert!(peer_allowed(1000, own, &[3, 1000]));
        assert!(!peer_allowed(4, own, &[3, 1000]));
        assert!(!peer_allowed(999, own, &[3, 1000]));
        // Never the guest itself, listed or not: the local CID, its own, the wildcard.
        assert!(!peer_allowed(1, own, &[1, 7]));
        assert!(!peer_allowed(7, own, &[1, 7]));
        assert!(!peer_allowed(1, None, &[1]));
        assert!(!peer_allowed(u32::MAX, own, &[u32::MAX]));
        // Its own CID unknown: still the list decides.
        assert!(peer_allowed(7, None, &[7]));
    }

    #[test]
    fn the_socket_umask_gives_exactly_the_mode() {
        assert_eq!(socket_umask(0o600).as_raw_mode(), 0o177);
        assert_eq!(socket_umask(0o660).as_raw_mode(), 0o117);
        assert_eq!(socket_umask(0o777).as_raw_mode(), 0);
        assert_eq!(socket_umask(0).as_raw_mode(), 0o777);
        // Bits beyond the permissions are not a socket's.
        assert_eq!(socket_umask(0o4660).as_raw_mode(), 0o117);
    }

    #[test]
    fn a_child_counts_from_its_fork_until_its_pipe_closes() {
        let mut children = Children::new();
        let (taken_a, report_a) = rustix::pipe::pipe().unwrap();
        let (taken_b, report_b) = rustix::pipe::pipe().unwrap();
        children.add_spare(taken_a, 10);
        children.add_spare(taken_b, 11);
        assert_eq!((children.len(), children.spares()), (2, 2));
        let pause = Timespec::default();
        assert!(!children.wait(None, Some(&pause)));
        assert_eq!((children.len(), children.spares()), (2, 2), "no news");
        // A takes its connection: still counted, no longer a spare.
        rustix::io::write(&report_a, &[1]).unwrap();
        children.wait(None, Some(&pause));
        assert_eq!((children.len(), children.spares()), (2, 1));
        // Its connection goes on as long as its pipe is open.
        children.wait(None, Some(&pause));
        assert_eq!((children.len(), children.spares()), (2, 1));
        // B took one and ended at once: counted no more either way.
        rustix::io::write(&report_b, &[1]).unwrap();
        drop(report_b);
        children.wait(None, Some(&pause));
        children.wait(None, Some(&pause));
        assert_eq!((children.len(), children.spares()), (1, 0));
        // A's process exits (or crashes): its end closes.
        drop(report_a);
        children.wait(None, Some(&pause));
        assert_eq!((children.len(), children.spares()), (0, 0));
    }

    #[test]
    fn a_spare_that_dies_before_its_connection_is_dropped() {
        let mut children = Children::new();
        let (taken, report) = rustix::pipe::pipe().unwrap();
        children.add_spare(taken, 12);
        drop(report);
        children.wait(None, Some(&Timespec::default()));
        assert_eq!(children.len(), 0);
        // It ran no command: nothing to kill, its cgroup only to remove.
        assert_eq!(children.ended.as_slice(), &[(12, true)]);
    }

    #[test]
    fn a_connection_that_ends_cleanly_says_so_and_one_that_dies_does_not() {
        use crate::successor::Successor;
        let mut children = Children::new();
        let pause = Timespec::default();
        let (taken_a, report_a) = rustix::pipe::pipe().unwrap();
        let (taken_b, report_b) = rustix::pipe::pipe().unwrap();
        children.add_spare(taken_a, 20);
        children.add_spare(taken_b, 21);
        // A: taken, then its conversation ends normally, then it exits.
        let mut a = Successor::new(report_a);
        a.release();
        a.end_cleanly();
        // B: taken, then killed (`kill -9 $PPID`): EOF without the byte.
        rustix::io::write(&report_b, &[report::TAKEN]).unwrap();
        children.wait(None, Some(&pause));
        assert_eq!((children.len(), children.spares()), (2, 0));
        assert!(children.ended.is_empty());
        drop(a);
        drop(report_b);
        children.wait(None, Some(&pause));
        assert_eq!(children.len(), 0);
        let mut ended = children.ended.clone();
        ended.sort_unstable();
        assert_eq!(ended.as_slice(), &[(20, true), (21, false)]);
        // The bytes on the pipe, exactly: one "taken", one "ended cleanly".
        assert_eq!((report::TAKEN, report::ENDED_CLEANLY), (1, 2));
        let (read, write) = rustix::pipe::pipe().unwrap();
        let mut successor = Successor::new(write);
        successor.end_cleanly();
        drop(successor);
        let mut bytes = [0u8; 4];
        let n = rustix::io::read(&read, &mut bytes).unwrap();
        assert_eq!(&bytes[..n], &[1, 2]);
    }

    #[test]
    fn a_power_request_comes_only_from_a_connection_process() {
        use crate::successor::Successor;
        let pause = Timespec::default();
        // A spare that has not taken a connection cannot ask (nothing it could have served).
        let mut children = Children::new();
        let (taken, report) = rustix::pipe::pipe().unwrap();
        children.add_spare(taken, 40);
        rustix::io::write(&report, &[report::POWER_OFF, 1, 0, 0, 0]).unwrap();
        children.wait(None, Some(&pause));
        assert_eq!(children.power, None);
        // A connection process: taken, the request with its grace, then its clean end.
        let (taken, report) = rustix::pipe::pipe().unwrap();
        children.add_spare(taken, 41);
        let mut successor = Successor::new(report);
        successor.request_power(true, 70_000);
        successor.end_cleanly();
        children.wait(None, Some(&pause));
        assert_eq!(
            children.power,
            Some(PowerRequest {
                reboot: true,
                grace_ms: 70_000
            })
        );
        assert!(children
            .all
            .iter()
            .any(|child| child.pid == 41 && child.clean));
        children.power = None;
        // A cut message (never written by us) reads as grace 0, never out of bounds.
        let (taken, report) = rustix::pipe::pipe().unwrap();
        children.add_spare(taken, 42);
        rustix::io::write(&report, &[report::TAKEN, report::POWER_OFF, 9]).unwrap();
        children.wait(None, Some(&pause));
        assert_eq!(
            children.power,
            Some(PowerRequest {
                reboot: false,
                grace_ms: 9
            })
        );
    }

    #[test]
    fn a_process_dying_after_taken_is_seen_as_died() {
        // Only the byte 2 means clean; any other byte, or none, does not.
        let mut children = Children::new();
        let (taken, report) = rustix::pipe::pipe().unwrap();
        children.add_spare(taken, 30);
        rustix::io::write(&report, &[report::TAKEN, 7]).unwrap();
        drop(report);
        let pause = Timespec::default();
        children.wait(None, Some(&pause));
        children.wait(None, Some(&pause));
        assert_eq!(children.ended.as_slice(), &[(30, false)]);
    }

    #[test]
    fn leftover_cgroups_are_bounded_and_retried_until_removed() {
        let mut leftovers = Leftovers::new();
        assert!(leftovers.is_empty());
        for pid in 0..LEFTOVERS as u32 {
            leftovers.push(pid);
        }
        leftovers.push(5);
        assert_eq!(leftovers.0.len(), LEFTOVERS, "no duplicates");
        // Full: the oldest is dropped (its directory left in place).
        leftovers.push(1000);
        assert_eq!(leftovers.0.len(), LEFTOVERS);
        assert_eq!(leftovers.0.front(), Some(&1));
        assert_eq!(leftovers.0.back(), Some(&1000));
        // Busy ones stay, in order; removed or vanished ones go.
        let mut tried = Vec::new();
        leftovers.retry(|pid| {
            tried.push(pid);
            match pid % 3 {
                0 => Err(Errno::BUSY),
                1 => Ok(()),
                _ => Err(Errno::NOENT),
            }
        });
        assert_eq!(tried.len(), LEFTOVERS);
        assert!(leftovers.0.iter().all(|pid| pid % 3 == 0));
        assert_eq!(leftovers.0.front(), Some(&3));
        // 1000 was removed; 255 is the newest still busy.
        assert_eq!(leftovers.0.back(), Some(&255));
        leftovers.retry(|_| Ok(()));
        assert!(leftovers.is_empty());
    }

    #[test]
    fn waiting_clients_are_seen_only_when_watched() {
        let (listener, client) = pair();
        rustix::io::write(&client, b"x").unwrap();
        let mut children = Children::new();
        let pause = Timespec::default();
        assert!(!children.wait(None, Some(&pause)));
        assert!(children.wait(Some(&listener), Some(&pause)));
    }
}
