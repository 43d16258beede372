//! The host library's only `unsafe`: opening an AF_VSOCK stream, which std has no type for, and
//! waiting for a socket with a deadline without changing its timeouts.
//!
//! The connected socket is handed out as a `UnixStream`: every method the library uses on it
//! (read, write, shutdown, timeouts, try_clone) is an address-family-agnostic socket call.
#![allow(unsafe_code)]

use std::io;
use std::mem;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// `SO_VM_SOCKETS_CONNECT_TIMEOUT` (`_OLD`, a `struct timeval`, on 64-bit Linux).
const SO_VM_SOCKETS_CONNECT_TIMEOUT: libc::c_int = 6;

/// Connects an AF_VSOCK stream to `cid:port`, giving up after `timeout`.
pub fn connect_vsock(cid: u32, port: u32, timeout: Duration) -> io::Result<UnixStream> {
    // SAFETY: plain syscall with constant arguments; the result is checked below.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket() and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let sock = UnixStream::from(fd);

    let tv = libc::timeval {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: `tv` is a live timeval and the length passed is its size.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::AF_VSOCK,
            SO_VM_SOCKETS_CONNECT_TIMEOUT,
            (&tv as *const libc::timeval).cast(),
            mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }

    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    // SAFETY: `addr` is a live sockaddr_vm and the length passed is its size.
    let rc = unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            (&addr as *const libc::sockaddr_vm).cast(),
            mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// Waits until `fd` is readable (or hung up) or `timeout` passes; `Ok(false)` on timeout.
pub fn wait_readable(fd: std::os::fd::BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let mut pollfd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
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
