//! The listener: bind, accept, and fork one process per connection. It never reads from a
//! client, so no client can slow it down.

use core::ffi::CStr;

use ferry_wire::{encode_agent_frame, AgentFrame, ErrorCode, ErrorFrame};
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::fd::OwnedFd;
use rustix::io::Errno;
use rustix::net::{AddressFamily, SendFlags, SocketAddrUnix, SocketFlags, SocketType};
use rustix::process::Signal;

use crate::sys::{self, VsockAddr};
use crate::{clock, conn, log};

/// The longest Unix socket path (`sun_path` less its NUL).
const MAX_UNIX_PATH: usize = 107;

/// Where the agent listens.
#[derive(Clone, Copy)]
pub enum ListenAddr {
    /// AF_VSOCK, any CID, this port.
    Vsock(u32),
    /// A Unix socket path (NUL-terminated in `path`).
    Unix { path: [u8; MAX_UNIX_PATH + 1] },
}

impl ListenAddr {
    /// Parses `vsock:PORT` or `unix:PATH`.
    pub fn parse(spec: &[u8]) -> Option<Self> {
        if let Some(port) = spec.strip_prefix(b"vsock:") {
            return crate::init::parse_u32(port).map(ListenAddr::Vsock);
        }
        let path = spec.strip_prefix(b"unix:")?;
        if path.is_empty() || path.len() > MAX_UNIX_PATH || path.contains(&0) {
            return None;
        }
        let mut buf = [0u8; MAX_UNIX_PATH + 1];
        buf[..path.len()].copy_from_slice(path);
        Some(ListenAddr::Unix { path: buf })
    }

    /// The vsock port, if this is a vsock address.
    pub fn vsock_port(&self) -> Option<u32> {
        match self {
            ListenAddr::Vsock(port) => Some(*port),
            ListenAddr::Unix { .. } => None,
        }
    }
}

/// Creates the listening socket.
pub fn bind(addr: &ListenAddr) -> Result<OwnedFd, Errno> {
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
            let path = CStr::from_bytes_until_nul(path).map_err(|_| Errno::INVAL)?;
            let sock =
                rustix::net::socket_with(AddressFamily::UNIX, SocketType::STREAM, flags, None)?;
            // A socket file left by an earlier run would make bind fail; nothing else is removed.
            if let Ok(stat) = rustix::fs::lstat(path) {
                if rustix::fs::FileType::from_raw_mode(stat.st_mode) == rustix::fs::FileType::Socket
                {
                    let _ = rustix::fs::unlink(path);
                }
            }
            rustix::net::bind(&sock, &SocketAddrUnix::new(path)?)?;
            sock
        }
    };
    rustix::net::listen(&sock, 1024)?;
    Ok(sock)
}

/// Spare connection processes kept waiting in `accept`. One is being replaced after each
/// connection; the other takes the next client meanwhile, so back-to-back connections never
/// wait for a `fork`. A spare costs a few KiB of private memory (its pages are shared with the
/// listener until written).
const SPARES: usize = 2;

/// Serves connections forever, each in its own process.
///
/// Processes are forked *before* their connection arrives: [`SPARES`] spares wait in `accept`,
/// and each tells the listener through its own pipe once it has taken a connection (see
/// [`Successor`]); only then is its replacement forked. A client never waits for a fork, and
/// the listener still never reads from a client.
pub fn serve_forever(listener: OwnedFd, is_init: bool) -> ! {
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
    let listener_pid = rustix::process::getpid();
    // The read end of each spare's report pipe; `None` while that spare is to be replaced.
    let mut spares: [Option<OwnedFd>; SPARES] = Default::default();
    loop {
        let mut failure = None;
        for slot in spares.iter_mut().filter(|slot| slot.is_none()) {
            match fork_spare() {
                Ok(Forked::Spare(report)) => spare(listener, report, listener_pid),
                Ok(Forked::Listener(taken)) => *slot = Some(taken),
                Err(errno) => failure = Some(errno),
            }
        }
        if let Some(errno) = failure {
            if spares.iter().all(Option::is_none) {
                // Nobody accepts: answer whoever waits, then pause before trying again.
                refuse_pending(&listener, errno);
                continue;
            }
        }
        wait_until_taken(&mut spares, failure.is_some());
    }
}

/// Each side of [`fork_spare`], with its end of the report pipe.
enum Forked {
    Spare(OwnedFd),
    Listener(OwnedFd),
}

fn fork_spare() -> Result<Forked, Errno> {
    let (taken, report) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .inspect_err(|&errno| log::error(b"cannot create a pipe", errno))?;
    match sys::fork() {
        Ok(sys::Forked::Child) => Ok(Forked::Spare(report)),
        Ok(sys::Forked::Parent) => Ok(Forked::Listener(taken)),
        Err(errno) => {
            log::error(b"cannot fork a connection process", errno);
            Err(errno)
        }
    }
}

/// A spare connection process: takes the next connection, tells the listener, serves it.
fn spare(listener: OwnedFd, report: OwnedFd, listener_pid: rustix::process::Pid) -> ! {
    // A spare must not outlive its listener (when the agent runs as an ordinary process and is
    // stopped): it would keep accepting on a socket nobody manages. A connection already taken
    // is served to its end, as before.
    let _ = rustix::process::set_parent_process_death_signal(Some(Signal::KILL));
    if rustix::process::getppid() != Some(listener_pid) {
        // The listener died before the death signal was armed.
        sys::exit(0);
    }
    let prepared = conn::prepare();
    let conn = loop {
        match rustix::net::accept_with(&listener, SocketFlags::CLOEXEC) {
            Ok(conn) => break conn,
            Err(Errno::INTR | Errno::CONNABORTED | Errno::AGAIN) => {}
            Err(errno @ (Errno::MFILE | Errno::NFILE | Errno::NOBUFS | Errno::NOMEM)) => {
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
    conn::serve(conn, prepared, Successor(Some(report)))
}

/// A connection process's promise to tell the listener it has taken its connection, so the
/// listener forks the next spare. Kept as late as possible, to be done while the command
/// starts (waking the listener is a cross-CPU wake-up, and its fork competes for a CPU), but
/// never past anything that waits on a client: the next client must never wait on this one.
pub struct Successor(Option<OwnedFd>);

impl Successor {
    /// Sends the byte (once); the listener also takes EOF, should this process die first.
    pub fn release(&mut self) {
        if let Some(report) = self.0.take() {
            let _ = rustix::io::write(&report, &[1]);
        }
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        self.release();
    }
}

/// Blocks until a spare has taken a connection or died, and empties its slot. `retry_soon`: a
/// slot is empty after a failed fork, so return after a pause to try again.
fn wait_until_taken(spares: &mut [Option<OwnedFd>; SPARES], retry_soon: bool) {
    let mut ready = [false; SPARES];
    {
        let Some(any) = spares.iter().flatten().next() else {
            return;
        };
        let mut fds: [PollFd<'_>; SPARES] =
            core::array::from_fn(|_| PollFd::new(any, PollFlags::IN));
        let mut slots = [0; SPARES];
        let mut n = 0;
        for (index, fd) in spares.iter().enumerate() {
            if let Some(fd) = fd {
                fds[n] = PollFd::new(fd, PollFlags::IN);
                slots[n] = index;
                n += 1;
            }
        }
        let pause = Timespec {
            tv_sec: 0,
            tv_nsec: 50_000_000,
        };
        if poll(&mut fds[..n], retry_soon.then_some(&pause)).is_err() {
            return;
        }
        for (fd, &index) in fds[..n].iter().zip(&slots) {
            ready[index] = !fd.revents().is_empty();
        }
    }
    for (slot, _) in spares.iter_mut().zip(ready).filter(|(_, ready)| *ready) {
        let mut byte = [0u8];
        let taken = slot
            .take()
            .is_some_and(|pipe| matches!(rustix::io::read(&pipe, &mut byte), Ok(1)));
        if !taken {
            // EOF: the spare died before accepting (killed, or a bug). Pause so a spare that
            // keeps dying cannot turn into a fork storm.
            clock::sleep_ms(10);
        }
    }
}

/// No connection process can be made: answers whoever is waiting, then pauses before the
/// next attempt.
fn refuse_pending(listener: &OwnedFd, errno: Errno) {
    // No spare exists now, so nothing else accepts between the poll and the accept.
    loop {
        let mut fds = [PollFd::new(listener, PollFlags::IN)];
        match poll(&mut fds, Some(&Timespec::default())) {
            Ok(1..) if fds[0].revents().contains(PollFlags::IN) => {}
            _ => break,
        }
        match rustix::net::accept_with(listener, SocketFlags::CLOEXEC) {
            Ok(conn) => refuse_connection(&conn, errno),
            Err(_) => break,
        }
    }
    clock::sleep_ms(50);
}

/// Tells a client we could not take its connection, without ever blocking the listener.
fn refuse_connection(conn: &OwnedFd, errno: Errno) {
    let mut buf = [0u8; 96];
    let frame = AgentFrame::Error(ErrorFrame {
        code: ErrorCode::ResourceExhausted,
        errno: errno.raw_os_error().unsigned_abs(),
        message: "cannot fork a connection process",
    });
    if let Ok(len) = encode_agent_frame(&frame, &mut buf) {
        let _ = rustix::net::send(conn, &buf[..len], SendFlags::DONTWAIT | SendFlags::NOSIGNAL);
    }
}
