//! The host library's sockets beyond std: AF_VSOCK streams (std has no type for them), and the
//! only `unsafe`, waiting for a socket with a deadline without changing its timeouts.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

pub(crate) use vsock::connect as connect_vsock;

/// AF_VSOCK for std code: connect, listen, accept. The one std-side home of vsock sockets, built
/// on socket2's address type (no unsafe code here); the no_std agent has its own
/// (`agent/src/sys.rs`, through rustix).
///
/// NOTE: a vsock socket travels as a `UnixStream`: every call made on it (read, write,
/// readiness, `SO_ERROR`, shutdown, timeouts, `try_clone`) is address-family agnostic; its address
/// methods (`peer_addr`, `local_addr`) are not and fail.
pub mod vsock {
    use std::io;
    use std::os::fd::{BorrowedFd, OwnedFd};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    use socket2::{Domain, SockAddr, Socket, Type};

    /// Binds on every local CID (`VMADDR_CID_ANY`).
    pub const CID_ANY: u32 = libc::VMADDR_CID_ANY;

    /// The one place a vsock address is built.
    fn address(cid: u32, port: u32) -> SockAddr {
        SockAddr::vsock(cid, port)
    }

    /// An AF_VSOCK stream socket (socket2 makes it close-on-exec).
    fn socket(nonblocking: bool) -> io::Result<Socket> {
        let kind = if nonblocking {
            Type::STREAM.nonblocking()
        } else {
            Type::STREAM
        };
        Socket::new(Domain::VSOCK, kind, None)
    }

    /// Connects an AF_VSOCK stream to `cid:port`, giving up after `timeout`. The stream is
    /// blocking and close-on-exec.
    pub fn connect(cid: u32, port: u32, timeout: Duration) -> io::Result<UnixStream> {
        let sock = socket(false)?;
        sock.connect_timeout(&address(cid, port), timeout.max(Duration::from_millis(1)))?;
        Ok(UnixStream::from(OwnedFd::from(sock)))
    }

    /// Starts a non-blocking connect to `cid:port`: the stream is non-blocking, and its first
    /// writable readiness ends the connect (then check `take_error`). For event loops.
    pub fn connect_nonblocking(cid: u32, port: u32) -> io::Result<UnixStream> {
        let sock = socket(true)?;
        match sock.connect(&address(cid, port)) {
            Ok(()) => {}
            Err(err) if err.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(err) => return Err(err),
        }
        Ok(UnixStream::from(OwnedFd::from(sock)))
    }

    /// Listens on `cid:port` ([`CID_ANY`] for every local CID). The listener is non-blocking
    /// and close-on-exec: [`accept`] answers `WouldBlock` while nobody is waiting, so a caller
    /// can check other things between tries.
    pub fn listen(cid: u32, port: u32) -> io::Result<OwnedFd> {
        let sock = socket(true)?;
        sock.bind(&address(cid, port))?;
        sock.listen(4)?;
        Ok(OwnedFd::from(sock))
    }

    /// Takes one connection from a [`listen`]er; `WouldBlock` when nobody is waiting. The
    /// connection is blocking and close-on-exec.
    pub fn accept(listener: BorrowedFd<'_>) -> io::Result<UnixStream> {
        let (conn, _peer) = socket2::SockRef::from(&listener).accept()?;
        conn.set_nonblocking(false)?;
        Ok(UnixStream::from(OwnedFd::from(conn)))
    }

    #[cfg(test)]
    mod tests {
        use std::os::fd::AsFd;

        use super::*;

        #[test]
        fn the_address_is_the_family_cid_and_port() {
            let addr = address(CID_ANY, 1024);
            assert_eq!(addr.family(), libc::AF_VSOCK as libc::sa_family_t);
            assert_eq!(addr.as_vsock_address(), Some((u32::MAX, 1024)));
        }

        #[test]
        fn a_listener_with_nobody_waiting_would_block() {
            let listener = match listen(CID_ANY, libc::VMADDR_PORT_ANY) {
                Ok(listener) => listener,
                Err(err) if err.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                    eprintln!("skipped: no AF_VSOCK on this host");
                    return;
                }
                Err(err) => panic!("listen: {err}"),
            };
            let err = accept(listener.as_fd()).expect_err("nobody connects");
            assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        }
    }
}

/// Waits until `fd` is readable (or hung up) or `timeout` passes; `Ok(false)` on timeout.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let mut pollfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // Rounded up, so a sub-millisecond remainder still waits instead of spinning.
    let millis = timeout
        .as_micros()
        .div_ceil(1000)
        .min(libc::c_int::MAX as u128) as libc::c_int;
    loop {
        // SAFETY: `pollfd` is a live, initialised pollfd and the count passed is 1.
        let rc = unsafe { libc::poll(&mut pollfd, 1, millis) };
        match rc {
            0 => return Ok(false),
            1.. => return Ok(true),
            _ => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
}
