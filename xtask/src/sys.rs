//! xtask's `unsafe`: the benchmark baseline (a literal fork + execve + waitpid) and the peer
//! benchmark's process plumbing (a subreaper, a private mount namespace for a daemon).
#![allow(unsafe_code)]

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

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

/// Makes this process the reaper of its orphaned descendants (`PR_SET_CHILD_SUBREAPER`): a
/// daemon's grandchild whose parent died is then re-parented to us, not to init, so a teardown
/// can find (in `/proc/self/task/*/children`), kill and reap everything it started.
pub fn become_subreaper() -> Result<()> {
    // SAFETY: plain prctl on this process with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        bail!(
            "prctl(PR_SET_CHILD_SUBREAPER): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Reaps one exited child of ours, if any (`waitpid(-1, WNOHANG)`): its pid.
pub fn reap_one() -> Option<u32> {
    let mut status = 0;
    // SAFETY: `status` is a live int; WNOHANG never blocks.
    let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    u32::try_from(pid).ok().filter(|&pid| pid > 0)
}

/// A private view of the file system for one daemon: its own mount namespace in which files are
/// bind-mounted over system paths and a fresh tmpfs covers a directory, seen by that process and
/// its descendants only. Nothing outside changes, and nothing is left to undo: the namespace ends
/// with its last process.
#[derive(Debug, Default, Clone)]
pub struct PrivateView {
    /// `(our file, the path it covers)`.
    pub binds: Vec<(PathBuf, PathBuf)>,
    /// A tmpfs (mode 0755) over this directory, then these directories made inside it (0755).
    pub tmpfs: Option<(PathBuf, Vec<PathBuf>)>,
}

impl PrivateView {
    /// Makes `command` start in this view (after `unshare(CLONE_NEWNS)`, mounts private to it).
    pub fn apply(&self, command: &mut std::process::Command) -> Result<()> {
        use std::os::unix::process::CommandExt;
        let c = |path: &Path| {
            CString::new(path.as_os_str().as_bytes())
                .with_context(|| format!("{} has a NUL", path.display()))
        };
        let binds = self
            .binds
            .iter()
            .map(|(from, to)| Ok((c(from)?, c(to)?)))
            .collect::<Result<Vec<_>>>()?;
        let tmpfs = match &self.tmpfs {
            Some((dir, subdirs)) => Some((
                c(dir)?,
                subdirs.iter().map(|d| c(d)).collect::<Result<Vec<_>>>()?,
            )),
            None => None,
        };
        let root = c(Path::new("/"))?;
        let none = c(Path::new("none"))?;
        let tmpfs_type = CString::new("tmpfs")?;
        let tmpfs_data = CString::new("mode=0755")?;
        // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
        // syscalls (unshare, mount, mkdir) on C strings built before the fork.
        unsafe {
            command.pre_exec(move || {
                let check = |rc: libc::c_int| {
                    if rc == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                };
                check(libc::unshare(libc::CLONE_NEWNS))?;
                // Our mounts must not propagate back to the system's namespace.
                check(libc::mount(
                    none.as_ptr(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                for (from, to) in &binds {
                    check(libc::mount(
                        from.as_ptr(),
                        to.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ))?;
                }
                if let Some((dir, subdirs)) = &tmpfs {
                    check(libc::mount(
                        tmpfs_type.as_ptr(),
                        dir.as_ptr(),
                        tmpfs_type.as_ptr(),
                        0,
                        tmpfs_data.as_ptr().cast(),
                    ))?;
                    for sub in subdirs {
                        check(libc::mkdir(sub.as_ptr(), 0o755))?;
                    }
                }
                Ok(())
            })
        };
        Ok(())
    }
}
