//! The host library's only `unsafe`: AF_VSOCK streams, which std has no type for, and waiting for
//! a socket with a deadline without changing its timeouts.
//!
//! A vsock stream is handed out as a `UnixStream`: every method used on it (read, write, shutdown,
//! timeouts, try_clone, set_nonblocking) is an address-family-agnostic socket call. Its address
//! methods (`peer_addr`, `local_addr`) are not: they expect a `sockaddr_un` and fail.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

pub(crate) use vsock::connect as connect_vsock;

/// AF_VSOCK for std code: connect, listen, accept. The one std-side home of the vsock address;
/// the no_std agent has its own (`agent/src/sys.rs`, through rustix).
pub mod vsock {
    use std::io;
    use std::mem;
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    /// Binds on every local CID (`VMADDR_CID_ANY`).
    pub const CID_ANY: u32 = libc::VMADDR_CID_ANY;

    /// `SO_VM_SOCKETS_CONNECT_TIMEOUT` (`_OLD`, a `struct timeval`, on 64-bit Linux).
    const SO_VM_SOCKETS_CONNECT_TIMEOUT: libc::c_int = 6;

    /// Connects an AF_VSOCK stream to `cid:port`, giving up after `timeout`. Blocking,
    /// close-on-exec.
    pub fn connect(cid: u32, port: u32, timeout: Duration) -> io::Result<UnixStream> {
        let sock = socket(0)?;
        let tv = libc::timeval {
            tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: `tv` is a live timeval and the length passed is its size.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::AF_VSOCK,
                SO_VM_SOCKETS_CONNECT_TIMEOUT,
                (&tv as *const libc::timeval).cast(),
                mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        check(rc)?;
        let addr = sockaddr(cid, port);
        // SAFETY: `addr` is a live sockaddr_vm and the length passed is its size.
        let rc = unsafe {
            libc::connect(
                sock.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        check(rc)?;
        Ok(UnixStream::from(sock))
    }

    /// Listens on `cid:port` ([`CID_ANY`] for every local CID). The listener is non-blocking
    /// and close-on-exec: [`accept`] answers `WouldBlock` while nobody is waiting, so a caller
    /// can check other things between tries.
    pub fn listen(cid: u32, port: u32) -> io::Result<OwnedFd> {
        let sock = socket(libc::SOCK_NONBLOCK)?;
        let addr = sockaddr(cid, port);
        // SAFETY: `addr` is a live sockaddr_vm and the length passed is its size.
        let rc = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        check(rc)?;
        // SAFETY: plain syscall on a bound socket we own; the result is checked.
        check(unsafe { libc::listen(sock.as_raw_fd(), 4) })?;
        Ok(sock)
    }

    /// Takes one connection from a [`listen`]er; `WouldBlock` when nobody is waiting. The
    /// connection is blocking and close-on-exec.
    pub fn accept(listener: BorrowedFd<'_>) -> io::Result<UnixStream> {
        // SAFETY: null address pointers are allowed (the peer's address is not wanted); the
        // result is checked before use.
        let raw = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        check(raw)?;
        // SAFETY: accept4 returned a fresh descriptor that nothing else owns.
        Ok(UnixStream::from(unsafe { OwnedFd::from_raw_fd(raw) }))
    }

    /// The one place a vsock address is built.
    fn sockaddr(cid: u32, port: u32) -> libc::sockaddr_vm {
        // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value of it.
        let mut addr: libc::sockaddr_vm = unsafe { mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = cid;
        addr.svm_port = port;
        addr
    }

    /// An AF_VSOCK stream socket, close-on-exec, with `flags` (`SOCK_NONBLOCK`) added.
    fn socket(flags: libc::c_int) -> io::Result<OwnedFd> {
        // SAFETY: plain syscall with constant arguments; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_VSOCK,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC | flags,
                0,
            )
        };
        check(fd)?;
        // SAFETY: `fd` was just returned by socket() and is owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn check(rc: libc::c_int) -> io::Result<()> {
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use std::os::fd::AsFd;

        use super::*;

        #[test]
        fn the_address_is_the_family_cid_and_port() {
            let addr = sockaddr(CID_ANY, 1024);
            assert_eq!(addr.svm_family, libc::AF_VSOCK as libc::sa_family_t);
            assert_eq!(addr.svm_cid, u32::MAX);
            assert_eq!(addr.svm_port, 1024);
            assert_eq!(addr.svm_reserved1, 0);
            assert_eq!(addr.svm_zero, [0; 4]);
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
