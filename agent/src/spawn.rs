//! Starting a command: argv/envp prepared before the child is made, and the child's
//! straight-line path from `clone` to `execve`.

use core::ffi::CStr;

use core::sync::atomic::{AtomicU64, Ordering};
use ferry_wire::{Bytes, ErrorCode, ValidExec};

use rustix::fd::BorrowedFd;
use rustix::io::Errno;
use rustix::process::Signal;

use crate::sys::{self, PtrArray};

/// The `PATH` searched when the command's environment has none.
pub const DEFAULT_PATH: &[u8] = b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Pointer arrays and paths for `execve`, ready before `clone` so the child only copies bytes.
pub struct Prepared<'a, const A: usize, const E: usize> {
    program: &'a CStr,
    argv: PtrArray<'a, A>,
    envp: PtrArray<'a, E>,
    cwd: Option<&'a CStr>,
    search_path: &'a [u8],
}

/// Why a request could not be turned into an `execve` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrepareError {
    pub code: ErrorCode,
    pub message: &'static str,
}

/// Builds argv, the effective environment (inherited minus overridden keys, then the overrides,
/// or the overrides alone for a clean environment) and the cwd.
pub fn prepare<'a, 'e: 'a, const A: usize, const E: usize>(
    exec: &ValidExec<'a>,
    inherited: impl Iterator<Item = &'e CStr> + Clone,
    argv_storage: &'a mut [*const u8; A],
    envp_storage: &'a mut [*const u8; E],
    cwd_storage: &'a mut [u8],
) -> Result<Prepared<'a, A, E>, PrepareError> {
    let request = exec.request();
    let mut argv = PtrArray::new(argv_storage);
    let mut program = None;
    for entry in request.argv.entries_with_nul() {
        let arg = CStr::from_bytes_with_nul(entry).map_err(|_| invalid("argv entry"))?;
        program.get_or_insert(arg);
        if !argv.push(arg) {
            return Err(limit());
        }
    }
    let program = program.ok_or(invalid("argv is empty"))?;

    let overrides = request.env;
    let overridden = |entry: &[u8]| overrides.entries().any(|o| key(o) == key(entry));
    let mut envp = PtrArray::new(envp_storage);
    let mut search_path = None;
    if !request.clean_env {
        for entry in inherited.clone() {
            let bytes = entry.to_bytes();
            if overridden(bytes) {
                continue;
            }
            if !envp.push(entry) {
                break; // the inherited environment is ours, not the caller's: cap it silently
            }
            if key(bytes) == b"PATH" {
                search_path = Some(&bytes[5..]);
            }
        }
    }
    let entries = overrides.entries_with_nul();
    for (index, entry) in entries.enumerate() {
        // A later override of the same key wins; earlier ones are skipped.
        let later = overrides
            .entries()
            .skip(index + 1)
            .any(|o| key(o) == key(entry));
        if later {
            continue;
        }
        let var = CStr::from_bytes_with_nul(entry).map_err(|_| invalid("env entry"))?;
        if !envp.push(var) {
            return Err(limit());
        }
        let bytes = var.to_bytes();
        if key(bytes) == b"PATH" {
            search_path = Some(&bytes[5..]);
        }
    }

    let cwd = match request.cwd {
        None => None,
        Some(Bytes(dir)) => {
            let with_nul = cwd_storage.get_mut(..dir.len() + 1).ok_or_else(limit)?;
            with_nul[..dir.len()].copy_from_slice(dir);
            with_nul[dir.len()] = 0;
            Some(CStr::from_bytes_with_nul(with_nul).map_err(|_| invalid("cwd"))?)
        }
    };
    Ok(Prepared {
        program,
        argv,
        envp,
        cwd,
        search_path: search_path.unwrap_or(DEFAULT_PATH),
    })
}

fn key(entry: &[u8]) -> &[u8] {
    let entry = entry.strip_suffix(&[0]).unwrap_or(entry);
    match entry.iter().position(|b| *b == b'=') {
        Some(eq) => &entry[..eq],
        None => entry,
    }
}

fn invalid(message: &'static str) -> PrepareError {
    PrepareError {
        code: ErrorCode::InvalidRequest,
        message,
    }
}

fn limit() -> PrepareError {
    PrepareError {
        code: ErrorCode::LimitExceeded,
        message: "request exceeds the agent's limits",
    }
}

impl<const A: usize, const E: usize> Prepared<'_, A, E> {
    /// How many environment entries the command will get.
    #[cfg(test)]
    pub fn env_len(&self) -> usize {
        self.envp.len()
    }
}

/// The stage at which the child failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FailedStage {
    /// setsid, dup2 or the signal setup failed.
    Setup = 1,
    /// chdir failed.
    Cwd = 2,
    /// execve failed.
    Exec = 3,
}

/// Where the child, which shares the parent's memory until `execve`, leaves the reason it
/// failed. Nothing written means `execve` succeeded.
pub struct ChildFailure(AtomicU64);

impl ChildFailure {
    pub const fn new() -> Self {
        ChildFailure(AtomicU64::new(0))
    }

    fn set(&self, stage: FailedStage, errno: Errno) {
        let errno = errno.raw_os_error() as u32;
        self.0
            .store((stage as u64) << 32 | u64::from(errno), Ordering::Release);
    }

    /// What the child left, read once it has left our memory.
    pub fn get(&self) -> Option<(FailedStage, Errno)> {
        let word = self.0.load(Ordering::Acquire);
        let stage = match word >> 32 {
            0 => return None,
            1 => FailedStage::Setup,
            2 => FailedStage::Cwd,
            _ => FailedStage::Exec,
        };
        Some((stage, Errno::from_raw_os_error(word as u32 as i32)))
    }
}

/// Maps a child failure to the error a client sees.
pub fn failure_code(stage: FailedStage, errno: Errno) -> (ErrorCode, &'static str) {
    match stage {
        FailedStage::Setup => (
            ErrorCode::SpawnFailed,
            "cannot set up the command's process",
        ),
        FailedStage::Cwd => (ErrorCode::BadCwd, "cannot enter the working directory"),
        FailedStage::Exec => match errno {
            Errno::NOENT | Errno::NOTDIR => (ErrorCode::NotFound, "no such file or directory"),
            Errno::ACCESS | Errno::PERM | Errno::ISDIR => {
                (ErrorCode::PermissionDenied, "permission denied")
            }
            Errno::NOEXEC => (ErrorCode::ExecFormat, "exec format error"),
            Errno::NOMEM | Errno::AGAIN | Errno::MFILE | Errno::NFILE => {
                (ErrorCode::ResourceExhausted, "out of memory or descriptors")
            }
            Errno::TOOBIG => (ErrorCode::LimitExceeded, "argument list too long"),
            _ => (ErrorCode::SpawnFailed, "execve failed"),
        },
    }
}

/// The command's standard descriptors, as the parent prepared them.
pub struct ChildStdio<'a> {
    pub stdin: BorrowedFd<'a>,
    pub stdout: BorrowedFd<'a>,
    pub stderr: BorrowedFd<'a>,
}

/// The child's side of `clone`: a new session, standard descriptors, default signal state, the
/// working directory, then `execve`. Never returns.
///
/// NOTE: this runs between `clone` and `execve` in the parent's memory (see `sys::spawn`):
/// straight-line code, syscalls, and byte copies on its own stack only; its one write to shared
/// memory is `failure`. Every descriptor the agent owns is close-on-exec, so only 0, 1 and 2
/// survive.
// Kept out of line: its large stack frame must not be probed into the caller's.
#[inline(never)]
pub fn exec_child<const A: usize, const E: usize>(
    prepared: &Prepared<'_, A, E>,
    stdio: &ChildStdio<'_>,
    failure: &ChildFailure,
) -> ! {
    let setup = (|| {
        rustix::process::setsid()?;
        rustix::stdio::dup2_stdin(stdio.stdin)?;
        rustix::stdio::dup2_stdout(stdio.stdout)?;
        rustix::stdio::dup2_stderr(stdio.stderr)?;
        // The connection process ignores SIGPIPE (it writes to the stdin pipe); ignored
        // dispositions survive execve, so restore the default the command expects.
        sys::set_signal_ignored(Signal::PIPE, false)?;
        sys::unblock_all_signals()
    })();
    if let Err(errno) = setup {
        fail(failure, FailedStage::Setup, errno);
    }
    if let Some(cwd) = prepared.cwd {
        if let Err(errno) = rustix::process::chdir(cwd) {
            fail(failure, FailedStage::Cwd, errno);
        }
    }
    let program = prepared.program.to_bytes();
    if program.contains(&b'/') {
        let errno = sys::execve(prepared.program, &prepared.argv, &prepared.envp);
        fail(failure, FailedStage::Exec, errno);
    }
    // execvpe's rules: try each PATH entry; remember EACCES; stop at errors other than
    // "not here".
    let mut path = [0u8; 4096 + 1];
    let mut denied = false;
    for dir in prepared.search_path.split(|b| *b == b':') {
        let dir: &[u8] = if dir.is_empty() { b"." } else { dir };
        let total = dir.len() + 1 + program.len() + 1;
        let Some(candidate) = path.get_mut(..total) else {
            continue;
        };
        candidate[..dir.len()].copy_from_slice(dir);
        candidate[dir.len()] = b'/';
        candidate[dir.len() + 1..total - 1].copy_from_slice(program);
        candidate[total - 1] = 0;
        let Ok(candidate) = CStr::from_bytes_with_nul(candidate) else {
            continue;
        };
        match sys::execve(candidate, &prepared.argv, &prepared.envp) {
            Errno::ACCESS | Errno::PERM => denied = true,
            Errno::NOENT | Errno::NOTDIR | Errno::NAMETOOLONG | Errno::LOOP => {}
            errno => fail(failure, FailedStage::Exec, errno),
        }
    }
    let errno = if denied { Errno::ACCESS } else { Errno::NOENT };
    fail(failure, FailedStage::Exec, errno)
}

fn fail(failure: &ChildFailure, stage: FailedStage, errno: Errno) -> ! {
    failure.set(stage, errno);
    sys::exit(127)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_wire::{ExecRequest, StdinMode, StrList};

    fn exec<'a>(argv: &'a [u8], env: &'a [u8], clean: bool) -> ValidExec<'a> {
        ExecRequest {
            argv: StrList::new(argv),
            env: StrList::new(env),
            clean_env: clean,
            cwd: Some(Bytes(b"/tmp")),
            stdin: StdinMode::Null,
        }
        .validate()
        .unwrap()
    }

    #[test]
    fn env_merge_overrides_and_path() {
        let inherited = [c"HOME=/root", c"PATH=/bin", c"TERM=linux"];
        let request = exec(b"ls\0-l\0", b"PATH=/opt/bin\0X=1\0X=2\0", false);
        let mut argv = [core::ptr::null(); 8];
        let mut envp = [core::ptr::null(); 8];
        let mut cwd = [0u8; 16];
        let prepared = prepare(
            &request,
            inherited.iter().copied(),
            &mut argv,
            &mut envp,
            &mut cwd,
        )
        .unwrap();
        assert_eq!(prepared.program, c"ls");
        assert_eq!(prepared.argv.len(), 2);
        // HOME, TERM inherited; PATH replaced; X once (the later value).
        assert_eq!(prepared.env_len(), 4);
        assert_eq!(prepared.search_path, b"/opt/bin");
        assert_eq!(prepared.cwd, Some(c"/tmp"));
    }

    #[test]
    fn clean_env_has_only_overrides_and_default_path() {
        let inherited = [c"HOME=/root", c"PATH=/bin"];
        let request = exec(b"true\0", b"A=b\0", true);
        let mut argv = [core::ptr::null(); 8];
        let mut envp = [core::ptr::null(); 8];
        let mut cwd = [0u8; 16];
        let prepared = prepare(
            &request,
            inherited.iter().copied(),
            &mut argv,
            &mut envp,
            &mut cwd,
        )
        .unwrap();
        assert_eq!(prepared.env_len(), 1);
        assert_eq!(prepared.search_path, DEFAULT_PATH);
    }

    #[test]
    fn storage_limits_are_errors() {
        let request = exec(b"a\0b\0c\0", b"", true);
        let mut argv = [core::ptr::null(); 3];
        let mut envp = [core::ptr::null(); 8];
        let mut cwd = [0u8; 16];
        let err = prepare(&request, [].into_iter(), &mut argv, &mut envp, &mut cwd).err();
        assert_eq!(err.map(|e| e.code), Some(ErrorCode::LimitExceeded));
    }

    #[test]
    fn failures_round_trip() {
        let failure = ChildFailure::new();
        assert_eq!(failure.get(), None);
        failure.set(FailedStage::Cwd, Errno::NOENT);
        assert_eq!(failure.get(), Some((FailedStage::Cwd, Errno::NOENT)));
        failure.set(FailedStage::Setup, Errno::BADF);
        assert_eq!(failure.get(), Some((FailedStage::Setup, Errno::BADF)));
        assert_eq!(
            failure_code(FailedStage::Exec, Errno::NOENT).0,
            ErrorCode::NotFound
        );
        assert_eq!(
            failure_code(FailedStage::Exec, Errno::NOEXEC).0,
            ErrorCode::ExecFormat
        );
        assert_eq!(
            failure_code(FailedStage::Exec, Errno::ACCESS).0,
            ErrorCode::PermissionDenied
        );
    }
}
