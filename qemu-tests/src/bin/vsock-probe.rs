//! `vsock-probe`: a guest-side client for the agent's peer check, shipped in the full image as
//! `/bin/vsock-probe` (built static by `cargo xtask initramfs`).
//!
//! `vsock-probe CID PORT` connects over AF_VSOCK to `CID:PORT`, sends nothing, reads with a
//! 3-second timeout and prints exactly one line: `refused-at-connect ERRNO`,
//! `closed-without-a-byte`, `got-bytes N` or `timeout`. An agent that refuses the peer before the
//! hello closes the connection without a byte.
//!
//! `vsock-probe cid` prints the guest's own CID (`IOCTL_VM_SOCKETS_GET_LOCAL_CID` on /dev/vsock).
#![allow(unsafe_code)] // the one ioctl, in `local_cid`

use std::io::{ErrorKind, Read};
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
        _ => usage(),
    }
}

fn usage() -> ExitCode {
    eprintln!("usage: vsock-probe CID PORT | vsock-probe cid");
    ExitCode::from(2)
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
