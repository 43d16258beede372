//! xtask's only `unsafe`: the benchmark baseline, a literal fork + execve + waitpid.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Runs `program` (no arguments) the plain way and waits for it: the cost ferry's exec is
/// compared against.
pub fn fork_exec_wait(program: &Path) -> Result<()> {
    let path = CString::new(program.as_os_str().as_bytes()).context("program path has a NUL")?;
    let argv = [path.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null::<libc::c_char>()];
    // SAFETY: the child calls only async-signal-safe functions (execve, _exit) on memory
    // prepared before the fork; the parent checks the result.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: argv and envp are NULL-terminated arrays of valid C strings that outlive
        // the call; _exit never returns.
        unsafe {
            libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
    }
    if pid < 0 {
        bail!("fork: {}", std::io::Error::last_os_error());
    }
    let mut status = 0;
    loop {
        // SAFETY: `status` is a live int; pid is our own child.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == pid {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            bail!("waitpid: {err}");
        }
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        bail!("{} failed locally (status {status:#x})", program.display());
    }
    Ok(())
}
