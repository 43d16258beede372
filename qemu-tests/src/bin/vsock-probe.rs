//! `vsock-probe`: a guest-side client for the agent's peer check, shipped in the full image as
//! `/bin/vsock-probe` (built static by `cargo xtask initramfs`).
//!
//! `vsock-probe CID PORT` connects over AF_VSOCK to `CID:PORT`, sends nothing, reads with a
//! 3-second timeout and prints exactly one line: `refused-at-connect ERRNO`,
//! `closed-without-a-byte`, `got-bytes N` or `timeout`. An agent that refuses the peer before the
//! hello closes the connection without a byte.
//!
//! `vsock-probe cid` prints the guest's own CID (`IOCTL_VM_SOCKETS_GET_LOCAL_CID` on /dev/vsock).
//!
//! Two more modes are `cargo xtask bench --vm`'s raw vsock baselines, the same bytes moved without
//! ferry. Each listens on `PORT` (every CID), says `listening` on stderr, serves one connection
//! from the host and says `sent N` / `received N` on stderr when it is done:
//! - `vsock-probe send PORT FILE` sends FILE's bytes and closes (the host reads to EOF);
//! - `vsock-probe recv PORT FILE` reads an 8-byte little-endian length and that many bytes, writes
//!   them to FILE (`-` for stdout; a regular file is fsynced), then answers the count as 8
//!   little-endian bytes: the host's clock stops when the bytes are where they were going.
#![allow(unsafe_code)] // one ioctl, in `local_cid`, and one poll, in `accept_one`

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

use ferry_host::{errno_name, vsock};

const TIMEOUT: Duration = Duration::from_secs(3);
/// `_IO(7, 0xb9)` from `<linux/vm_sockets.h>` (the libc crate does not name it).
const IOCTL_VM_SOCKETS_GET_LOCAL_CID: u32 = 0x7b9;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [what] if what == "cid" => match local_cid() {
            Ok(cid) => {
                println!("{cid}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("vsock-probe: reading the local CID: {err}");
                ExitCode::from(1)
            }
        },
        [cid, port] => match (cid.parse(), port.parse()) {
            (Ok(cid), Ok(port)) => {
                println!("{}", probe(cid, port));
                ExitCode::SUCCESS
            }
            _ => usage(),
        },
        [mode, port, file] if mode == "send" || mode == "recv" => {
            let Ok(port) = port.parse() else {
                return usage();
            };
            let served = if mode == "send" {
                send(port, file)
            } else {
                recv(port, file)
            };
            match served {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("vsock-probe {mode}: {err}");
                    ExitCode::from(1)
                }
            }
        }
        _ => usage(),
    }
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: vsock-probe CID PORT | vsock-probe cid | vsock-probe send PORT FILE | \
         vsock-probe recv PORT FILE"
    );
    ExitCode::from(2)
}

/// The copy buffer: as large as the host's, so neither side pays more syscalls than the other.
const CHUNK: usize = 256 * 1024;

/// Listens on `port`, says so on stderr, and takes one connection (blocking).
fn accept_one(port: u32) -> std::io::Result<UnixStream> {
    let listener = vsock::listen(vsock::CID_ANY, port)?;
    eprintln!("listening");
    loop {
        let mut pollfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pollfd` is one valid `struct pollfd`, alive for the call, and its descriptor
        // is the open listener; the count passed is 1.
        let rc = unsafe { libc::poll(&mut pollfd, 1, -1) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        match vsock::accept(listener.as_fd()) {
            Ok(stream) => return Ok(stream),
            Err(err) if err.kind() == ErrorKind::WouldBlock => {}
            Err(err) => return Err(err),
        }
    }
}

/// `send PORT FILE`: FILE's bytes to the one connection, then close.
fn send(port: u32, file: &str) -> std::io::Result<()> {
    let mut source = std::fs::File::open(file)?;
    let mut stream = accept_one(port)?;
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    loop {
        let n = source.read(&mut buf)?;
        if n == 0 {
            break;
        }
        stream.write_all(&buf[..n])?;
        sent += n as u64;
    }
    drop(stream);
    eprintln!("sent {sent}");
    Ok(())
}

/// `recv PORT FILE`: a length, that many bytes into FILE (fsynced if regular), the count back.
fn recv(port: u32, file: &str) -> std::io::Result<()> {
    // Stdout as a file of its own (a duplicate of fd 1): std's `Stdout` is line-buffered, and
    // would scan and split binary data at its newlines.
    let mut sink = match file {
        "-" => std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned()?),
        path => std::fs::File::create(path)?,
    };
    let mut stream = accept_one(port)?;
    let mut length = [0u8; 8];
    stream.read_exact(&mut length)?;
    let total = u64::from_le_bytes(length);
    let mut buf = vec![0u8; CHUNK];
    let mut received = 0u64;
    while received < total {
        let want = (total - received).min(CHUNK as u64) as usize;
        let n = stream.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                format!("the host closed after {received} of {total} bytes"),
            ));
        }
        sink.write_all(&buf[..n])?;
        received += n as u64;
    }
    if sink.metadata()?.is_file() {
        sink.sync_all()?;
    }
    drop(sink);
    stream.write_all(&received.to_le_bytes())?;
    drop(stream);
    eprintln!("received {received}");
    Ok(())
}

/// Connects to `cid:port` and says how the connection ended.
fn probe(cid: u32, port: u32) -> String {
    let errno = |err: &std::io::Error| {
        err.raw_os_error()
            .map_or_else(|| err.to_string(), |e| errno_name(e.unsigned_abs()))
    };
    let mut stream = match vsock::connect(cid, port, TIMEOUT) {
        Ok(stream) => stream,
        Err(err) if err.kind() == ErrorKind::TimedOut => return "timeout".to_owned(),
        Err(err) => return format!("refused-at-connect {}", errno(&err)),
    };
    if let Err(err) = stream.set_read_timeout(Some(TIMEOUT)) {
        return format!("error setting the read timeout: {}", errno(&err));
    }
    let mut buf = [0u8; 4096];
    let mut got = 0usize;
    loop {
        match stream.read(&mut buf) {
            Ok(0) if got == 0 => return "closed-without-a-byte".to_owned(),
            Ok(0) => return format!("got-bytes {got}"),
            Ok(n) => got += n,
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return if got == 0 {
                    "timeout".to_owned()
                } else {
                    format!("got-bytes {got}")
                };
            }
            // A reset after the accept is still a close without a byte if none came.
            Err(err) if got == 0 && err.kind() == ErrorKind::ConnectionReset => {
                return "closed-without-a-byte".to_owned()
            }
            Err(err) => return format!("error after {got} bytes: {}", errno(&err)),
        }
    }
}

/// This guest's CID, from `/dev/vsock`.
fn local_cid() -> std::io::Result<u32> {
    use std::os::fd::AsRawFd;
    let dev = std::fs::File::open("/dev/vsock")?;
    let mut cid: libc::c_uint = 0;
    // SAFETY: IOCTL_VM_SOCKETS_GET_LOCAL_CID writes one `unsigned int` through its argument,
    // which points at `cid`, alive for the call; `dev` is an open descriptor.
    let rc = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            IOCTL_VM_SOCKETS_GET_LOCAL_CID as _,
            &mut cid as *mut libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cid)
}
