//! The listener: bind, accept, and fork one process per connection. It never reads from a
//! client, so no client can slow it down.

use core::ffi::CStr;

use ferry_wire::session::{encode_refusal, Refusal};
use ferry_wire::ErrorCode;
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::fd::OwnedFd;
use rustix::io::Errno;
use rustix::net::{AddressFamily, SendFlags, SocketAddrUnix, SocketFlags, SocketType};
use rustix::process::Signal;

use crate::auth::Serving;
use crate::config::ListenAddr;
use crate::successor::Successor;
use crate::sys::{self, VsockAddr};
use crate::{clock, conn, log};

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
            let addr = SocketAddrUnix::new(path)?;
            // Whoever can connect can run commands as the agent's user: the socket is the
            // owner's alone (0600), whatever umask the agent was started with. The umask is
            // restored at once, so commands still inherit the agent's own.
            let umask = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
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
            sock
        }
    };
    rustix::net::listen(&sock, 1024)?;
    Ok(sock)
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

/// Serves connections forever, each in its own process.
///
/// Processes are forked *before* their connection arrives: [`SPARES`] spares wait in `accept`,
/// and each tells the listener through its own pipe once it has taken a connection (see
/// [`Successor`]); only then is its replacement forked. A client never waits for a fork, and
/// the listener still never reads from a client.
pub fn serve_forever(listener: OwnedFd, is_init: bool, serving: &Serving) -> ! {
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
    // The read end of each waiting spare's report pipe.
    let mut spares = Spares::new();
    loop {
        let mut failure = None;
        while !spares.is_full() {
            match fork_spare() {
                Ok(Forked::Spare(report)) => {
                    // The other spares' report pipes are the listener's: a spare (and the
                    // connection it becomes) holds only its own.
                    spares.clear();
                    spare(listener, report, listener_pid, serving)
                }
                Ok(Forked::Listener(taken)) => {
                    let _ = spares.push(taken);
                }
                Err(errno) => {
                    failure = Some(errno);
                    break;
                }
            }
        }
        if let Some(errno) = failure {
            if spares.is_empty() {
                // Nobody accepts: answer whoever waits, then pause before trying again.
                refuse_pending(&listener, errno);
                continue;
            }
        }
        wait_until_taken(&mut spares, failure.is_some());
    }
}

/// The read ends of the waiting spares' report pipes.
type Spares = heapless::Vec<OwnedFd, SPARES>;

/// Each side of [`fork_spare`], with its end of the report pipe.
enum Forked {
    Spare(OwnedFd),
    Listener(OwnedFd),
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
        Ok(sys::Forked::Parent) => Ok(Forked::Listener(taken)),
        Err(errno) => {
            log::error(b"cannot fork a connection process", errno);
            Err(errno)
        }
    }
}

/// A spare connection process: takes the next connection, tells the listener, serves it.
fn spare(
    listener: OwnedFd,
    report: OwnedFd,
    listener_pid: rustix::process::Pid,
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
    conn::serve(conn, prepared, Successor::new(report), serving)
}

/// Blocks until a spare has taken a connection or died, and drops it from `spares`.
/// `retry_soon`: a spare is missing after a failed fork, so return after a pause to try again.
fn wait_until_taken(spares: &mut Spares, retry_soon: bool) {
    if spares.is_empty() {
        return;
    }
    let mut ready = heapless::Vec::<bool, SPARES>::new();
    {
        let mut fds = heapless::Vec::<PollFd<'_>, SPARES>::new();
        for fd in spares.iter() {
            let _ = fds.push(PollFd::new(fd, PollFlags::IN));
        }
        let pause = Timespec {
            tv_sec: 0,
            tv_nsec: 50_000_000,
        };
        if poll(&mut fds, retry_soon.then_some(&pause)).is_err() {
            return;
        }
        for fd in &fds {
            let _ = ready.push(!fd.revents().is_empty());
        }
    }
    let mut ready = ready.into_iter();
    spares.retain(|report| {
        if ready.next() != Some(true) {
            return true;
        }
        let mut byte = [0u8];
        if !matches!(rustix::io::read(report, &mut byte), Ok(1)) {
            // EOF: the spare died before accepting (killed, or a bug). Pause so a spare that
            // keeps dying cannot turn into a fork storm.
            clock::sleep_ms(10);
        }
        false
    });
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
    let refusal = Refusal::os(
        ErrorCode::ResourceExhausted,
        errno.raw_os_error().unsigned_abs(),
        "cannot fork a connection process",
    );
    let mut buf = [0u8; 96];
    let len = encode_refusal(&refusal, &mut buf).unwrap_or(0);
    if let Some(frame @ [_, ..]) = buf.get(..len) {
        let _ = rustix::net::send(conn, frame, SendFlags::DONTWAIT | SendFlags::NOSIGNAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_wire::{decode_agent_frame, split_frame, AgentFrame};

    #[test]
    fn a_refused_connection_gets_one_error_frame() {
        let (agent, client) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        refuse_connection(&agent, Errno::AGAIN);
        drop(agent);
        let mut buf = [0u8; 256];
        let n = rustix::io::read(&client, &mut buf).unwrap();
        let (body, used) = split_frame(&buf[..n], 256).unwrap().unwrap();
        assert_eq!(used, n, "one frame, nothing else");
        let AgentFrame::Error(error) = decode_agent_frame(body).unwrap() else {
            panic!("not an error frame");
        };
        assert_eq!(error.code, ErrorCode::ResourceExhausted);
        assert_eq!(error.errno, Errno::AGAIN.raw_os_error() as u32);
    }
}
