//! Starting a command: argv/envp prepared before the child is made, and the child's
//! straight-line path from `clone` to `execve`.

use core::ffi::CStr;
use core::sync::atomic::{AtomicU64, Ordering};

use ferry_wire::session::Refusal;
use ferry_wire::{Bytes, ErrorCode, ValidExec};
use rustix::fd::BorrowedFd;
use rustix::fs::Mode;
use rustix::io::Errno;
use rustix::process::Signal;

use crate::bounds::{self, ChildBounds};
use crate::cstr;
use crate::sys::{self, PtrArray, PtrStorage};
use crate::users::{Credentials, MAX_FIELD_PATH, MAX_NAME};

/// The `PATH` searched when the command's environment has none.
pub const DEFAULT_PATH: &[u8] = b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The `PATH` a command gets when neither the agent's environment nor the request has one:
/// [`DEFAULT_PATH`].
pub const DEFAULT_PATH_ENV: &CStr =
    c"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The variables set for the command's user, unless the request sets them.
const IDENTITY_KEYS: [&[u8]; 4] = [b"HOME", b"USER", b"LOGNAME", b"SHELL"];
/// Room for the [`IDENTITY_KEYS`] entries of any [`Credentials`].
pub const IDENTITY_ENV_BUFFER: usize = 2 * (MAX_FIELD_PATH + 8) + 2 * (MAX_NAME + 10);

/// Pointer arrays and paths for `execve`, ready before `clone` so the child only copies bytes.
pub struct Prepared<'a, const A: usize, const E: usize> {
    program: &'a CStr,
    argv: PtrArray<'a, A>,
    envp: PtrArray<'a, E>,
    cwd: Option<&'a CStr>,
    search_path: &'a [u8],
    credentials: &'a Credentials,
}

/// A request's argv and environment overrides, packed (NUL-terminated entries): the request's
/// own, or put back together from its pieces.
#[derive(Debug, Clone, Copy)]
pub struct Lists<'a> {
    pub argv: &'a [u8],
    pub env: &'a [u8],
}

impl<'a> Lists<'a> {
    /// The request's own lists.
    pub fn of(exec: &ValidExec<'a>) -> Self {
        Lists {
            argv: exec.request().argv.as_bytes(),
            env: exec.request().env.as_bytes(),
        }
    }
}

/// Builds argv, the effective environment and the cwd. The environment: the inherited one
/// minus the keys the request overrides; then `HOME`, `USER`, `LOGNAME` and `SHELL` for
/// `credentials` (built in `identity_buffer`) unless the request sets them, replacing inherited
/// ones when the command changes user and filling in missing ones otherwise; then the
/// overrides; then [`DEFAULT_PATH_ENV`] if there is still no `PATH`. A clean environment is
/// the overrides alone, exactly as asked (the command still searches [`DEFAULT_PATH`]).
/// `env_index` is where the overrides' keys are indexed: at least twice their number of
/// slots, rounded up to a power of two ([`index_slots`]).
#[allow(clippy::too_many_arguments)]
pub fn prepare<'a, 'e: 'a, const A: usize, const E: usize>(
    exec: &ValidExec<'a>,
    lists: Lists<'a>,
    credentials: &'a Credentials,
    inherited: impl Iterator<Item = &'e CStr>,
    argv_storage: &'a mut PtrStorage<A>,
    envp_storage: &'a mut PtrStorage<E>,
    cwd_storage: &'a mut [u8],
    identity_buffer: &'a mut [u8],
    env_index: &mut [u32],
) -> Result<Prepared<'a, A, E>, Refusal> {
    let request = exec.request();
    let mut argv = PtrArray::new(argv_storage);
    let mut program = None;
    for entry in lists.argv.split_inclusive(|b| *b == 0) {
        let arg = crate::sys::cstr_with_nul(entry).ok_or_else(|| invalid("argv entry"))?;
        program.get_or_insert(arg);
        if !argv.push(arg) {
            return Err(LIMIT);
        }
    }
    let program = program.ok_or(invalid("argv is empty"))?;

    let overrides = lists.env;
    let keys = Keys::new(overrides, env_index).ok_or(LIMIT)?;
    let overridden = |entry: &[u8]| keys.last(key(entry)).is_some();
    let mut envp = PtrArray::new(envp_storage);
    let mut search_path = None;
    let identity = identity_entries(credentials, identity_buffer);
    let identity_slot = |entry: &[u8]| IDENTITY_KEYS.iter().position(|k| *k == key(entry));
    // Which identity keys the inherited environment already has (kept when not switching).
    let mut inherited_identity = [false; IDENTITY_KEYS.len()];
    if !request.clean_env {
        for entry in inherited {
            let bytes = entry.to_bytes();
            if overridden(bytes) {
                continue;
            }
            if let Some(slot) = identity_slot(bytes) {
                if credentials.switch {
                    continue; // the agent's, not the command's user's
                }
                if let Some(seen) = inherited_identity.get_mut(slot) {
                    *seen = true;
                }
            }
            if !envp.push(entry) {
                break; // the inherited environment is ours, not the caller's: cap it silently
            }
            search_path = path_value(bytes).or(search_path);
        }
    }
    for (entry, seen) in identity.iter().zip(inherited_identity) {
        let Some(entry) = entry else { continue };
        if request.clean_env || seen || overridden(entry.to_bytes()) {
            continue;
        }
        if !envp.push(entry) {
            return Err(LIMIT);
        }
    }
    let mut offset = 0usize;
    for entry in overrides.split_inclusive(|b| *b == 0) {
        let at = offset;
        offset = offset.saturating_add(entry.len());
        // A later override of the same key wins; earlier ones are skipped.
        if keys.last(key(entry)) != Some(at) {
            continue;
        }
        let var = crate::sys::cstr_with_nul(entry).ok_or_else(|| invalid("env entry"))?;
        if !envp.push(var) {
            return Err(LIMIT);
        }
        search_path = path_value(var.to_bytes()).or(search_path);
    }
    if !request.clean_env && search_path.is_none() && !envp.push(DEFAULT_PATH_ENV) {
        return Err(LIMIT);
    }

    let cwd = match request.cwd {
        None => None,
        Some(Bytes(dir)) => Some(cstr::join(cwd_storage, &[dir]).ok_or(LIMIT)?),
    };
    Ok(Prepared {
        program,
        argv,
        envp,
        cwd,
        search_path: search_path.unwrap_or(DEFAULT_PATH),
        credentials,
    })
}

/// The slots [`prepare`]'s `env_index` needs for the overrides `env`: twice their entries (a
/// trailing one without its NUL included), a power of two, at least 16. The protocol's most
/// overrides need exactly `2 * MAX_ENV_VARS`.
pub fn index_slots(env: &[u8]) -> usize {
    let entries = env.split_inclusive(|b| *b == 0).count();
    entries.saturating_mul(2).max(16).next_power_of_two()
}

/// The environment overrides' keys, indexed: with tens of thousands of overrides, comparing
/// each with all the others (as the inherited entries and the overrides themselves must be)
/// took seconds. An open-addressing table (linear probing) holds, for each key, the offset + 1
/// of its last override (0: an empty slot).
///
/// NOTE: the hash is not keyed: a client that crafts colliding keys makes its own request as
/// slow as the comparisons this replaces, and no one else's.
struct Keys<'t> {
    list: &'t [u8],
    table: &'t mut [u32],
}

impl<'t> Keys<'t> {
    /// Indexes `list` in `table` (at least [`index_slots`] of it); `None` when it is smaller.
    fn new(list: &'t [u8], table: &'t mut [u32]) -> Option<Self> {
        let table = table.get_mut(..index_slots(list))?;
        table.fill(0);
        let keys = Keys { list, table };
        let mut offset = 0usize;
        for entry in list.split_inclusive(|b| *b == 0) {
            let (slot, _) = keys.find(key(entry));
            if let Some(slot) = keys.table.get_mut(slot) {
                *slot = u32::try_from(offset).ok()?.checked_add(1)?;
            }
            offset = offset.saturating_add(entry.len());
        }
        Some(keys)
    }

    /// The offset of the last override of `key`.
    fn last(&self, key: &[u8]) -> Option<usize> {
        let (slot, found) = self.find(key);
        let stored = *self.table.get(slot)?;
        found.then(|| (stored as usize).saturating_sub(1))
    }

    /// `key`'s slot and whether it holds `key` (else it is the empty slot where it would go).
    fn find(&self, key: &[u8]) -> (usize, bool) {
        // FNV-1a.
        let hash = key.iter().fold(0x811c_9dc5u32, |hash, byte| {
            (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193)
        });
        let mask = self.table.len().saturating_sub(1);
        let mut slot = hash as usize & mask;
        // At most half full: an empty slot is always found; the bound only keeps a broken
        // table from looping.
        for _ in 0..self.table.len() {
            match self.table.get(slot).copied() {
                None | Some(0) => return (slot, false),
                Some(stored) => {
                    let at = (stored as usize).saturating_sub(1);
                    if key_at(self.list, at) == key {
                        return (slot, true);
                    }
                }
            }
            slot = slot.wrapping_add(1) & mask;
        }
        (slot, false)
    }
}

/// The key of the entry at `offset` in a packed list.
fn key_at(list: &[u8], offset: usize) -> &[u8] {
    let rest = list.get(offset..).unwrap_or(&[]);
    let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    key(rest.get(..end).unwrap_or(rest))
}

/// `HOME=`, `USER=`, `LOGNAME=` and `SHELL=` for `credentials` (in [`IDENTITY_KEYS`] order),
/// built in `buf`; `None` for one that does not fit or holds a NUL (from a broken passwd
/// line): the command then gets none rather than a wrong one.
fn identity_entries<'a>(credentials: &Credentials, buf: &'a mut [u8]) -> [Option<&'a CStr>; 4] {
    let values: [&[u8]; 4] = [
        &credentials.home,
        &credentials.name,
        &credentials.name,
        &credentials.shell,
    ];
    let mut entries = [None; 4];
    let mut rest = buf;
    for ((entry, key), value) in entries.iter_mut().zip(IDENTITY_KEYS).zip(values) {
        let len = key.len().saturating_add(value.len()).saturating_add(2);
        let Some((head, tail)) = core::mem::take(&mut rest).split_at_mut_checked(len) else {
            break;
        };
        rest = tail;
        *entry = cstr::join(head, &[key, b"=", value]);
    }
    entries
}

/// An environment entry's key: what precedes its first `=`, or all of it (an inherited entry
/// need not have one).
fn key(entry: &[u8]) -> &[u8] {
    let entry = entry.strip_suffix(&[0]).unwrap_or(entry);
    entry.split(|b| *b == b'=').next().unwrap_or(entry)
}

/// The value of a `PATH=…` entry; `None` for any other entry, `PATH` without `=` included.
fn path_value(entry: &[u8]) -> Option<&[u8]> {
    entry.strip_prefix(b"PATH=")
}

fn invalid(message: &'static str) -> Refusal {
    Refusal::new(ErrorCode::InvalidRequest, message)
}

const LIMIT: Refusal = Refusal::new(
    ErrorCode::LimitExceeded,
    "request exceeds the agent's limits",
);

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
    /// setgroups, setgid, setuid or `PR_SET_NO_NEW_PRIVS` failed.
    Credentials = 4,
    /// Joining the commands' cgroup or setting an rlimit failed (see `bounds::enter`).
    Bounds = 5,
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
            4 => FailedStage::Credentials,
            5 => FailedStage::Bounds,
            _ => FailedStage::Exec,
        };
        Some((stage, Errno::from_raw_os_error(word as u32 as i32)))
    }
}

/// Maps a child failure to the error a client sees.
pub fn refusal(stage: FailedStage, errno: Errno) -> Refusal {
    let (code, message) = match stage {
        FailedStage::Setup => (
            ErrorCode::SpawnFailed,
            "cannot set up the command's process",
        ),
        FailedStage::Cwd => (ErrorCode::BadCwd, "cannot enter the working directory"),
        // A bound the kernel refuses (an rlimit above the agent's hard limit, a cgroup that
        // cannot be joined) is the configuration's problem, not a passing shortage: retrying
        // would not help, so not `ResourceExhausted`. The command never runs unbounded.
        FailedStage::Bounds => (
            ErrorCode::SpawnFailed,
            "cannot apply the command's resource bounds",
        ),
        FailedStage::Credentials => (
            ErrorCode::PermissionDenied,
            "cannot run the command as its user",
        ),
        FailedStage::Exec => match errno {
            Errno::NOENT | Errno::NOTDIR => (ErrorCode::NotFound, "no such file or directory"),
            Errno::ACCESS | Errno::PERM | Errno::ISDIR => {
                (ErrorCode::PermissionDenied, "permission denied")
            }
            Errno::NOEXEC => (ErrorCode::ExecFormat, "exec format error"),
            Errno::NOMEM | Errno::AGAIN | Errno::MFILE | Errno::NFILE => {
                (ErrorCode::ResourceExhausted, "out of memory or descriptors")
            }
            // The kernel's own limit (argv and envp past a quarter of the stack limit): the
            // request was within the protocol's.
            Errno::TOOBIG => (ErrorCode::ArgumentsTooLong, "argument list too long"),
            _ => (ErrorCode::SpawnFailed, "execve failed"),
        },
    };
    Refusal::os(code, errno.raw_os_error().unsigned_abs(), message)
}

/// The command's standard descriptors, as the parent prepared them.
pub struct ChildStdio<'a> {
    pub stdin: BorrowedFd<'a>,
    pub stdout: BorrowedFd<'a>,
    pub stderr: BorrowedFd<'a>,
    /// Whether `stdin` is a pipe of this exec's own (else a shared file such as /dev/null).
    pub stdin_is_pipe: bool,
    /// Whether all three are the slave of this exec's own pseudo-terminal, which becomes the
    /// command's controlling terminal.
    pub terminal: bool,
}

/// The child's side of `clone`: a new session, standard descriptors, default signal state, the
/// working directory, then `execve`. Never returns.
///
/// NOTE: this runs between `clone` and `execve` in the parent's memory (see `sys::spawn`):
/// straight-line code, syscalls, and byte copies on its own stack only; its one write to shared
/// memory is `failure`. Nothing here may panic: the handler would run in this child, on memory
/// the parent is using. Every descriptor the agent owns is close-on-exec, so only 0, 1 and 2
/// survive.
// Kept out of line: its large stack frame must not be probed into the caller's.
#[inline(never)]
pub fn exec_child<const A: usize, const E: usize>(
    prepared: &Prepared<'_, A, E>,
    stdio: &ChildStdio<'_>,
    bounds: &ChildBounds<'_>,
    failure: &ChildFailure,
) -> ! {
    let setup = (|| {
        rustix::process::setsid()?;
        if stdio.terminal {
            // The new session's controlling terminal: job control, ^C as SIGINT, SIGHUP to
            // the foreground group when the command (its controlling process) ends.
            rustix::process::ioctl_tiocsctty(stdio.stdin)?;
        }
        rustix::stdio::dup2_stdin(stdio.stdin)?;
        rustix::stdio::dup2_stdout(stdio.stdout)?;
        rustix::stdio::dup2_stderr(stdio.stderr)?;
        // The connection process ignores SIGPIPE (it writes to the stdin pipe); ignored
        // dispositions survive execve, so restore the default the command expects.
        sys::set_signal_ignored(Signal::PIPE, false)?;
        sys::reset_inherited_ignored_signals()?;
        sys::unblock_all_signals()
    })();
    if let Err(errno) = setup {
        fail(failure, FailedStage::Setup, errno);
    }
    // Before the credentials: joining the cgroup and raising a hard limit need the agent's
    // privileges.
    if let Err(errno) = bounds::enter(bounds) {
        fail(failure, FailedStage::Bounds, errno);
    }
    if let Err(errno) = hand_over_pipes(prepared.credentials, stdio) {
        fail(failure, FailedStage::Credentials, errno);
    }
    if let Err(errno) = assume_identity(prepared.credentials) {
        fail(failure, FailedStage::Credentials, errno);
    }
    if let Err(errno) = bounds::die_with_parent(bounds) {
        fail(failure, FailedStage::Bounds, errno);
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
        // Too long for a path, or not a string: not a candidate.
        let Some(candidate) = cstr::join(&mut path, &[dir, b"/", program]) else {
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

/// The child's identity: supplementary groups, gid, uid (in that order: each needs the
/// privilege the next drops), unless the command keeps the agent's; then
/// `PR_SET_NO_NEW_PRIVS` unless the policy allows setuid. After this the command has no more
/// privileges than its user, so `chdir` and `execve` are checked as that user.
///
/// NOTE: runs in the child between `clone` and `execve` (see [`exec_child`]): syscalls and a
/// copy onto its own stack only. rustix's `set_thread_*` are the raw syscalls, which change
/// the calling thread's credentials; the child is a process of its own (no `CLONE_THREAD`),
/// so they are the whole command's, and the agent's stay as they were.
/// Gives the command's own pipes to the user it runs as: a pipe belongs to its creator (the
/// agent) with mode 0600, so without this `tee /dev/stderr` (a reopen through /proc/self/fd)
/// fails for an unprivileged command. Shared files (/dev/null) are never touched. A terminal
/// goes to the user and the `tty` group, mode 0620 (what `login` does): a program that reopens
/// its tty (`ssh`'s password prompt, `sudo`, `less`) needs it, and `mesg`/`write` expect it.
fn hand_over_pipes(credentials: &Credentials, stdio: &ChildStdio<'_>) -> Result<(), Errno> {
    use rustix::process::{Gid, Uid};
    if !credentials.switch {
        return Ok(());
    }
    let uid = Some(Uid::from_raw_unchecked(credentials.uid));
    if stdio.terminal {
        // Without a `tty` group the terminal keeps devpts' group.
        let tty = credentials.tty_gid.map(Gid::from_raw_unchecked);
        rustix::fs::fchown(stdio.stdin, uid, tty)?;
        return rustix::fs::fchmod(stdio.stdin, Mode::from_raw_mode(0o620));
    }
    let gid = Some(Gid::from_raw_unchecked(credentials.gid));
    let stdin = stdio.stdin_is_pipe.then_some(stdio.stdin);
    for fd in [Some(stdio.stdout), Some(stdio.stderr), stdin]
        .into_iter()
        .flatten()
    {
        // NOTE: only a pipe: a descriptor on a shared file must never change owner.
        let stat = rustix::fs::fstat(fd)?;
        if rustix::fs::FileType::from_raw_mode(stat.st_mode) == rustix::fs::FileType::Fifo {
            rustix::fs::fchown(fd, uid, gid)?;
        }
    }
    Ok(())
}

/// Becomes `credentials`' user: groups, gid, uid (when it switches), and `no_new_privs`. For a
/// command's child before `execve`, and for a connection process that transfers files.
pub fn assume_identity(credentials: &Credentials) -> Result<(), Errno> {
    use rustix::process::{Gid, Uid};
    if credentials.switch {
        let mut groups = [Gid::ROOT; crate::users::MAX_GROUPS];
        let mut len = 0usize;
        for (slot, gid) in groups.iter_mut().zip(&credentials.groups) {
            *slot = Gid::from_raw_unchecked(*gid);
            len = len.saturating_add(1);
        }
        rustix::thread::set_thread_groups(groups.get(..len).unwrap_or(&[]))?;
        rustix::thread::set_thread_gid(Gid::from_raw_unchecked(credentials.gid))?;
        rustix::thread::set_thread_uid(Uid::from_raw_unchecked(credentials.uid))?;
    }
    if credentials.no_new_privs {
        rustix::thread::set_no_new_privs(true)?;
    }
    Ok(())
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
            user: None,
            pty: None,
            timeout_ms: 0,
            kill_grace_ms: None,
            kill_tree_on_exit: false,
            max_output: 0,
        }
        .validate()
        .unwrap()
    }

    /// Credentials that keep the agent's own: no user switch, no `no_new_privs`.
    fn agent_itself() -> Credentials {
        let mut credentials = crate::users::numeric_credentials(1000, 1000);
        credentials.switch = false;
        credentials.no_new_privs = false;
        credentials
    }

    /// The buffers [`prepare`] fills: `A` argv slots, sixteen envp slots and `C` bytes of cwd,
    /// and the credentials it is given.
    struct Storage<const A: usize, const C: usize> {
        argv: PtrStorage<A>,
        envp: PtrStorage<16>,
        cwd: [u8; C],
        identity: [u8; IDENTITY_ENV_BUFFER],
        credentials: Credentials,
    }

    impl<const A: usize, const C: usize> Storage<A, C> {
        fn new() -> Self {
            Self::with_credentials(agent_itself())
        }

        fn with_credentials(credentials: Credentials) -> Self {
            Storage {
                argv: PtrStorage::new(),
                envp: PtrStorage::new(),
                cwd: [0; C],
                identity: [0; IDENTITY_ENV_BUFFER],
                credentials,
            }
        }

        /// [`prepare`]s `request` in these buffers, with `inherited` as the agent's environment.
        fn prepare<'a>(
            &'a mut self,
            request: &ValidExec<'a>,
            inherited: &[&'a CStr],
        ) -> Result<Prepared<'a, A, 16>, Refusal> {
            let Storage {
                argv,
                envp,
                cwd,
                identity,
                credentials,
            } = self;
            let inherited = inherited.iter().copied();
            let lists = Lists::of(request);
            let mut index = vec![0u32; index_slots(lists.env)];
            prepare(
                request,
                lists,
                credentials,
                inherited,
                argv,
                envp,
                cwd,
                identity,
                &mut index,
            )
        }
    }

    /// The environment `prepared` will pass, as strings.
    fn env_of(prepared: &Prepared<'_, 8, 16>) -> Vec<String> {
        prepared
            .envp
            .entries()
            .map(|e| e.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn env_merge_overrides_and_path() {
        let inherited = [c"HOME=/root", c"PATH=/bin", c"TERM=linux"];
        let request = exec(b"ls\0-l\0", b"PATH=/opt/bin\0X=1\0X=2\0", false);
        let mut storage = Storage::<8, 16>::new();
        let prepared = storage.prepare(&request, &inherited).unwrap();
        assert_eq!(prepared.program, c"ls");
        assert_eq!(prepared.argv.len(), 2);
        // HOME, TERM inherited; USER, LOGNAME, SHELL added; PATH replaced; X once (the later
        // value).
        assert_eq!(
            env_of(&prepared),
            [
                "HOME=/root",
                "TERM=linux",
                "USER=1000",
                "LOGNAME=1000",
                "SHELL=/bin/sh",
                "PATH=/opt/bin",
                "X=2"
            ]
        );
        assert_eq!(prepared.search_path, b"/opt/bin");
        assert_eq!(prepared.cwd, Some(c"/tmp"));
    }

    #[test]
    fn the_environment_index_keeps_the_last_override_of_each_key() {
        // The order and the choice the pairwise comparisons made, on many keys.
        let mut env = Vec::new();
        let mut expected = Vec::new();
        for i in 0..20_000u32 {
            env.extend_from_slice(format!("K{}={i}\0", i % 7_000).as_bytes());
        }
        for i in 13_000..20_000u32 {
            expected.push(format!("K{}={i}", i % 7_000));
        }
        expected.sort_by_key(|e| e.split('=').nth(1).unwrap().parse::<u32>().unwrap());
        let keys_table_len = index_slots(&env);
        assert_eq!(keys_table_len, 65_536);
        let mut index = vec![0u32; keys_table_len];
        let keys = Keys::new(&env, &mut index).unwrap();
        let mut offset = 0;
        let mut last_k0 = None;
        for entry in env.split_inclusive(|b| *b == 0) {
            if entry.starts_with(b"K0=") {
                last_k0 = Some(offset);
            }
            offset += entry.len();
        }
        assert_eq!(keys.last(b"K0"), last_k0);
        assert_eq!(keys.last(b"K7000"), None);
        assert_eq!(keys.last(b""), None);
        // Through `prepare` (a clean environment: the overrides alone).
        let mut argv = PtrStorage::<2>::new();
        let mut envp = Box::new(PtrStorage::<{ 8 * 1024 }>::new());
        let mut cwd = [0u8; 16];
        let mut identity = [0u8; IDENTITY_ENV_BUFFER];
        let credentials = agent_itself();
        let request = exec(b"true\0", b"", true);
        let lists = Lists {
            argv: b"true\0",
            env: &env,
        };
        let started = std::time::Instant::now();
        let prepared = prepare(
            &request,
            lists,
            &credentials,
            [c"K5=inherited", c"OTHER=1"].into_iter(),
            &mut argv,
            &mut envp,
            &mut cwd,
            &mut identity,
            &mut index,
        )
        .unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let got: Vec<String> = prepared
            .envp
            .entries()
            .map(|e| e.to_string_lossy().into_owned())
            .collect();
        assert_eq!(got, expected);
        // Too small an index is a limit, not a wrong answer.
        let mut small = [0u32; 8];
        let err = prepare(
            &request,
            lists,
            &credentials,
            [].into_iter(),
            &mut PtrStorage::<2>::new(),
            &mut PtrStorage::<8>::new(),
            &mut cwd,
            &mut identity,
            &mut small,
        )
        .err();
        assert_eq!(err.map(|e| e.code), Some(ErrorCode::LimitExceeded));
    }

    #[test]
    fn keys_of_packed_entries() {
        assert_eq!(key_at(b"A=1\0BB=2\0C\0", 0), b"A");
        assert_eq!(key_at(b"A=1\0BB=2\0C\0", 4), b"BB");
        assert_eq!(key_at(b"A=1\0BB=2\0C\0", 9), b"C");
        assert_eq!(key_at(b"A=1\0", 99), b"");
        assert_eq!(index_slots(b""), 16);
        assert_eq!(index_slots(&[0u8; 8]), 16);
        assert_eq!(index_slots(&[0u8; 9]), 32);
        assert_eq!(index_slots(b"A=1\0B=2"), 16, "a trailing entry counts");
        // The protocol's most overrides fit the mapped index exactly (a refusal at the limit
        // was found by the host's hostile tests).
        let most: Vec<u8> = (0..ferry_wire::limits::MAX_ENV_VARS)
            .flat_map(|i| format!("K{i}=\0").into_bytes())
            .collect();
        assert_eq!(index_slots(&most), 2 * ferry_wire::limits::MAX_ENV_VARS);
        let mut index = vec![0u32; 2 * ferry_wire::limits::MAX_ENV_VARS];
        let keys = Keys::new(&most, &mut index).unwrap();
        assert_eq!(keys.last(b"K32767"), Some(most.len() - "K32767=\0".len()));
    }

    #[test]
    fn clean_env_has_only_overrides_and_default_path() {
        let inherited = [c"HOME=/root", c"PATH=/bin"];
        let request = exec(b"true\0", b"A=b\0", true);
        let mut storage = Storage::<8, 16>::new();
        let prepared = storage.prepare(&request, &inherited).unwrap();
        // Exactly what was asked for: no identity variables, no PATH.
        assert_eq!(env_of(&prepared), ["A=b"]);
        assert_eq!(prepared.search_path, DEFAULT_PATH);
        let request = exec(b"true\0", b"", false);
        let prepared = storage.prepare(&request, &[]).unwrap();
        assert_eq!(
            env_of(&prepared),
            [
                "HOME=/",
                "USER=1000",
                "LOGNAME=1000",
                "SHELL=/bin/sh",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
            ]
        );
        assert_eq!(
            DEFAULT_PATH_ENV.to_bytes(),
            [b"PATH=".as_slice(), DEFAULT_PATH].concat()
        );
    }

    #[test]
    fn storage_limits_are_errors() {
        let request = exec(b"a\0b\0c\0", b"", true);
        let mut storage = Storage::<3, 16>::new();
        let err = storage.prepare(&request, &[]).err();
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
    }

    #[test]
    fn child_failures_map_to_error_codes() {
        let cases = [
            (FailedStage::Exec, Errno::NOENT, ErrorCode::NotFound),
            (FailedStage::Exec, Errno::NOTDIR, ErrorCode::NotFound),
            (FailedStage::Exec, Errno::NOEXEC, ErrorCode::ExecFormat),
            (
                FailedStage::Exec,
                Errno::ACCESS,
                ErrorCode::PermissionDenied,
            ),
            (FailedStage::Exec, Errno::ISDIR, ErrorCode::PermissionDenied),
            (
                FailedStage::Exec,
                Errno::NOMEM,
                ErrorCode::ResourceExhausted,
            ),
            (
                FailedStage::Exec,
                Errno::TOOBIG,
                ErrorCode::ArgumentsTooLong,
            ),
            (FailedStage::Exec, Errno::IO, ErrorCode::SpawnFailed),
            (FailedStage::Cwd, Errno::NOENT, ErrorCode::BadCwd),
            (FailedStage::Setup, Errno::BADF, ErrorCode::SpawnFailed),
        ];
        for (stage, errno, code) in cases {
            let refusal = refusal(stage, errno);
            assert_eq!(refusal.code, code, "{stage:?} {errno:?}");
            assert_eq!(refusal.errno, errno.raw_os_error() as u32);
        }
    }

    #[test]
    fn keys_and_path_values_are_total() {
        assert_eq!(key(b"A=b=c"), b"A");
        assert_eq!(key(b"A=b\0"), b"A");
        assert_eq!(key(b"PATH"), b"PATH");
        assert_eq!(key(b"PATH\0"), b"PATH");
        assert_eq!(key(b"=x"), b"");
        assert_eq!(key(b""), b"");
        assert_eq!(
            path_value(b"PATH=/bin:/usr/bin"),
            Some(b"/bin:/usr/bin".as_slice())
        );
        assert_eq!(path_value(b"PATH="), Some(b"".as_slice()));
        assert_eq!(path_value(b"PATH"), None);
        assert_eq!(path_value(b"PATHX=/bin"), None);
        assert_eq!(path_value(b"PAT"), None);
    }

    #[test]
    fn an_inherited_path_without_a_value_is_not_a_search_path() {
        // Used to slice `&entry[5..]` of a 4-byte entry: a panic on any exec.
        let inherited = [c"PATH", c"HOME=/root"];
        let request = exec(b"true\0", b"", false);
        let mut storage = Storage::<8, 16>::new();
        let prepared = storage.prepare(&request, &inherited).unwrap();
        assert_eq!(prepared.search_path, DEFAULT_PATH);
        // Passed on as it came, and the default added.
        assert_eq!(prepared.env_len(), 6);

        let inherited = [c"PATH=", c"PATH"];
        let prepared = storage.prepare(&request, &inherited).unwrap();
        assert_eq!(prepared.search_path, b"");
        assert_eq!(
            prepared.env_len(),
            6,
            "PATH=, PATH and the four identity entries"
        );
    }

    #[test]
    fn a_command_that_changes_user_gets_its_users_variables() {
        let mut app = crate::users::numeric_credentials(1000, 1000);
        app.home = heapless::Vec::from_slice(b"/home/app").unwrap();
        app.name = heapless::Vec::from_slice(b"app").unwrap();
        let inherited = [c"HOME=/root", c"USER=root", c"TERM=linux", c"PATH=/sbin"];
        let request = exec(b"true\0", b"SHELL=/bin/zsh\0", false);
        let mut storage = Storage::<8, 16>::with_credentials(app);
        let prepared = storage.prepare(&request, &inherited).unwrap();
        // The agent's HOME and USER are replaced; the request's SHELL wins.
        assert_eq!(
            env_of(&prepared),
            [
                "TERM=linux",
                "PATH=/sbin",
                "HOME=/home/app",
                "USER=app",
                "LOGNAME=app",
                "SHELL=/bin/zsh"
            ]
        );
        assert_eq!(prepared.credentials.uid, 1000);
    }

    #[test]
    fn identity_entries_are_bounded_and_total() {
        let mut longest = crate::users::numeric_credentials(1, 1);
        longest.home = heapless::Vec::from_slice(&[b'h'; MAX_FIELD_PATH]).unwrap();
        longest.shell = heapless::Vec::from_slice(&[b's'; MAX_FIELD_PATH]).unwrap();
        longest.name = heapless::Vec::from_slice(&[b'n'; MAX_NAME]).unwrap();
        let mut buf = [0u8; IDENTITY_ENV_BUFFER];
        let entries = identity_entries(&longest, &mut buf);
        assert!(entries.iter().all(Option::is_some), "the largest fit");
        // A NUL (a broken passwd line) leaves that variable out; a small buffer, the rest.
        let mut broken = crate::users::numeric_credentials(1, 1);
        broken.home = heapless::Vec::from_slice(b"/a\0b").unwrap();
        broken.home[2] = 0;
        let entries = identity_entries(&broken, &mut buf);
        assert_eq!(
            entries,
            [
                None,
                Some(c"USER=1"),
                Some(c"LOGNAME=1"),
                Some(c"SHELL=/bin/sh")
            ]
        );
        // HOME=/a\0b takes 10 bytes (and fails), USER=1 7, then no room.
        let mut small = [0u8; 17];
        let entries = identity_entries(&broken, &mut small);
        assert_eq!(entries, [None, Some(c"USER=1"), None, None]);
    }

    #[test]
    fn a_cwd_too_long_for_its_buffer_is_a_limit() {
        let request = exec(b"true\0", b"", true);
        let mut storage = Storage::<8, 4>::new();
        let err = storage.prepare(&request, &[]).err();
        assert_eq!(err.map(|e| e.code), Some(ErrorCode::LimitExceeded));
    }

    /// Runs `exec_child` for real through `sys::spawn`; the command's exit code, or the failure
    /// it left.
    fn run(argv: &[u8], inherited: &[&CStr]) -> Result<Option<i32>, (FailedStage, Errno)> {
        let unbounded = ChildBounds {
            limits: &bounds::CommandLimits::NONE,
            cgroup_procs: None,
            parent: rustix::process::getpid(),
        };
        run_with(argv, inherited, &unbounded, None)
    }

    /// [`run`] with `bounds`, and stdout to `stdout` (else `/dev/null`).
    fn run_with(
        argv: &[u8],
        inherited: &[&CStr],
        bounds: &ChildBounds<'_>,
        stdout: Option<rustix::fd::BorrowedFd<'_>>,
    ) -> Result<Option<i32>, (FailedStage, Errno)> {
        use rustix::fd::AsFd;
        let request = ExecRequest {
            argv: StrList::new(argv),
            env: StrList::default(),
            clean_env: false,
            cwd: None,
            stdin: StdinMode::Null,
            user: None,
            pty: None,
            timeout_ms: 0,
            kill_grace_ms: None,
            kill_tree_on_exit: false,
            max_output: 0,
        }
        .validate()
        .unwrap();
        let mut storage = Storage::<8, 16>::new();
        let prepared = storage.prepare(&request, inherited).unwrap();
        let null = rustix::fs::open(
            c"/dev/null",
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        let stdio = ChildStdio {
            stdin: null.as_fd(),
            stdout: stdout.unwrap_or(null.as_fd()),
            stderr: null.as_fd(),
            stdin_is_pipe: false,
            terminal: false,
        };
        let failure = ChildFailure::new();
        let child = || exec_child(&prepared, &stdio, bounds, &failure);
        let mut stack = sys::ChildStack::new().unwrap();
        // SAFETY: `exec_child` is straight-line syscalls and copies on its own stack, reading
        // what it borrows; the harness's threads do not touch any of it.
        #[allow(unsafe_code)]
        let spawned = unsafe { sys::spawn(&mut stack, &child, || {}) }.unwrap();
        let status = rustix::process::waitid(
            rustix::process::WaitId::PidFd(spawned.pidfd.as_fd()),
            rustix::process::WaitIdOptions::EXITED,
        )
        .unwrap()
        .unwrap();
        match failure.get() {
            Some(failed) => Err(failed),
            None => Ok(status.exit_status()),
        }
    }

    /// What `sh -c script` prints when run as `credentials` through the spawn path.
    fn output_as(script: &[u8], credentials: Credentials) -> Result<Vec<u8>, (FailedStage, Errno)> {
        use rustix::fd::AsFd;
        let argv = [b"sh\0-c\0".as_slice(), script, b"\0"].concat();
        let request = ExecRequest {
            argv: StrList::new(&argv),
            env: StrList::default(),
            clean_env: false,
            cwd: Some(Bytes(b"/")),
            stdin: StdinMode::Null,
            user: None,
            pty: None,
            timeout_ms: 0,
            kill_grace_ms: None,
            kill_tree_on_exit: false,
            max_output: 0,
        }
        .validate()
        .unwrap();
        let mut storage = Storage::<8, 16>::with_credentials(credentials);
        let prepared = storage.prepare(&request, &[]).unwrap();
        let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        let null = rustix::fs::open(
            c"/dev/null",
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        let stdio = ChildStdio {
            stdin: null.as_fd(),
            stdout: write.as_fd(),
            stderr: null.as_fd(),
            stdin_is_pipe: false,
            terminal: false,
        };
        let bounds = ChildBounds {
            limits: &bounds::CommandLimits::NONE,
            cgroup_procs: None,
            parent: rustix::process::getpid(),
        };
        let failure = ChildFailure::new();
        let child = || exec_child(&prepared, &stdio, &bounds, &failure);
        let mut stack = sys::ChildStack::new().unwrap();
        // SAFETY: as in `run_with`.
        #[allow(unsafe_code)]
        let spawned = unsafe { sys::spawn(&mut stack, &child, || {}) }.unwrap();
        drop(write);
        let mut out = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = rustix::io::read(&read, &mut chunk) {
            out.extend_from_slice(&chunk[..n]);
        }
        rustix::process::waitid(
            rustix::process::WaitId::PidFd(spawned.pidfd.as_fd()),
            rustix::process::WaitIdOptions::EXITED,
        )
        .unwrap();
        match failure.get() {
            Some(failed) => Err(failed),
            None => Ok(out),
        }
    }

    /// What `sh -c script` prints on a terminal of 24×80, run as `credentials` through the
    /// spawn path, with `\r\n` as `\n`.
    fn output_on_terminal(script: &[u8], credentials: Credentials) -> String {
        use rustix::fd::AsFd;
        let argv = [b"sh\0-c\0".as_slice(), script, b"\0"].concat();
        let request = ExecRequest {
            argv: StrList::new(&argv),
            env: StrList::default(),
            clean_env: false,
            cwd: None,
            stdin: StdinMode::Null,
            user: None,
            pty: None,
            timeout_ms: 0,
            kill_grace_ms: None,
            kill_tree_on_exit: false,
            max_output: 0,
        }
        .validate()
        .unwrap();
        let mut storage = Storage::<8, 16>::with_credentials(credentials);
        let prepared = storage.prepare(&request, &[c"PATH=/bin:/usr/bin"]).unwrap();
        let pair = crate::pty::open(ferry_wire::WindowSize { rows: 24, cols: 80 }).unwrap();
        let stdio = ChildStdio {
            stdin: pair.slave.as_fd(),
            stdout: pair.slave.as_fd(),
            stderr: pair.slave.as_fd(),
            stdin_is_pipe: false,
            terminal: true,
        };
        let bounds = ChildBounds {
            limits: &bounds::CommandLimits::NONE,
            cgroup_procs: None,
            parent: rustix::process::getpid(),
        };
        let failure = ChildFailure::new();
        let child = || exec_child(&prepared, &stdio, &bounds, &failure);
        let mut stack = sys::ChildStack::new().unwrap();
        // SAFETY: as in `run_with`.
        #[allow(unsafe_code)]
        let spawned = unsafe { sys::spawn(&mut stack, &child, || {}) }.unwrap();
        drop(pair.slave);
        let out = crate::pty::tests::read_all(&pair.master);
        rustix::process::waitid(
            rustix::process::WaitId::PidFd(spawned.pidfd.as_fd()),
            rustix::process::WaitIdOptions::EXITED,
        )
        .unwrap();
        assert_eq!(failure.get(), None);
        String::from_utf8_lossy(&out).replace("\r\n", "\n")
    }

    #[test]
    fn a_command_on_a_terminal_has_it_as_its_controlling_terminal() {
        let script = b"tty; stty size; test -t 0 && test -t 1 && test -t 2 && echo all three; \
            echo via /dev/tty > /dev/tty; echo to stderr >&2";
        let out = output_on_terminal(script, agent_itself());
        let mut lines = out.lines();
        let tty = lines.next().unwrap();
        assert!(tty.starts_with("/dev/pts/"), "{out}");
        assert_eq!(
            lines.collect::<Vec<_>>(),
            ["24 80", "all three", "via /dev/tty", "to stderr"]
        );
        if !rustix::process::geteuid().is_root() {
            return;
        }
        // Another user owns its terminal, with the tty group, mode 0620; without a tty group
        // the group stays devpts'.
        let mut nobody = crate::users::numeric_credentials(65534, 65534);
        nobody.tty_gid = Some(5);
        let out = output_on_terminal(b"id -u; stat -c '%u %g %a' $(tty)", nobody);
        assert_eq!(out, "65534\n65534 5 620\n");
        let nobody = crate::users::numeric_credentials(65534, 65534);
        let out = output_on_terminal(b"stat -c '%u %a' $(tty)", nobody);
        assert_eq!(out, "65534 620\n");
    }

    #[test]
    fn the_child_runs_as_its_user_without_new_privileges() {
        // Changing user needs root; the test machines run tests as root. Elsewhere only the
        // part that needs no privilege is checked.
        let script = b"id -u; id -g; id -G; grep NoNewPrivs /proc/self/status; \
            echo $HOME $USER $LOGNAME $SHELL";
        if rustix::process::geteuid().is_root() {
            let mut nobody = crate::users::numeric_credentials(65534, 65534);
            let _ = nobody.groups.push(65533);
            let out = output_as(script, nobody).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&out),
                "65534\n65534\n65534 65533\nNoNewPrivs:\t1\n/ 65534 65534 /bin/sh\n"
            );
        }
        // Keeping the agent's identity, with setuid allowed: no change, no NoNewPrivs.
        let mut itself = crate::users::numeric_credentials(0, 0);
        itself.switch = false;
        itself.no_new_privs = false;
        let out = output_as(b"id -u; grep NoNewPrivs /proc/self/status", itself).unwrap();
        let uid = rustix::process::geteuid().as_raw();
        assert_eq!(
            String::from_utf8_lossy(&out),
            format!("{uid}\nNoNewPrivs:\t0\n")
        );
    }

    #[test]
    fn a_user_the_kernel_refuses_fails_the_credentials_stage() {
        if !rustix::process::geteuid().is_root() {
            // Not root: setgroups is refused, which is the point; as root an invalid uid is.
            let out = output_as(b"true", crate::users::numeric_credentials(65534, 65534));
            assert_eq!(out, Err((FailedStage::Credentials, Errno::PERM)));
            return;
        }
        // -1 is "unchanged" to setresuid but invalid to setuid; `users` never produces it.
        let out = output_as(b"true", crate::users::numeric_credentials(u32::MAX, 0));
        assert_eq!(out, Err((FailedStage::Credentials, Errno::INVAL)));
        let refusal = refusal(FailedStage::Credentials, Errno::INVAL);
        assert_eq!(refusal.code, ErrorCode::PermissionDenied);
    }

    #[test]
    fn the_child_searches_path_like_execvpe() {
        let code = run(b"sh\0-c\0exit 7\0", &[c"PATH=/nonexistent::/bin:/usr/bin"]);
        assert_eq!(code, Ok(Some(7)));
        // No usable PATH at all: the default one.
        let code = run(b"sh\0-c\0exit 8\0", &[c"PATH"]);
        assert_eq!(code, Ok(Some(8)));
        let code = run(b"no-such-command-here\0", &[c"PATH=/bin"]);
        assert_eq!(code, Err((FailedStage::Exec, Errno::NOENT)));
        let code = run(b"/no/such/program\0", &[]);
        assert_eq!(code, Err((FailedStage::Exec, Errno::NOENT)));
        // A directory entry longer than any path is skipped, not a failure.
        let long = [b"PATH=/".as_slice(), &[b'x'; 5000], b":/bin\0"].concat();
        let long = CStr::from_bytes_with_nul(&long).unwrap();
        let code = run(b"sh\0-c\0exit 9\0", &[long]);
        assert_eq!(code, Ok(Some(9)));
    }

    /// What `sh -c script` prints with `limits` applied by the child.
    fn output_with_limits(script: &[u8], limits: &bounds::CommandLimits) -> Vec<u8> {
        use rustix::fd::AsFd;
        let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        let bounds = ChildBounds {
            limits,
            cgroup_procs: None,
            parent: rustix::process::getpid(),
        };
        let argv = [b"sh\0-c\0".as_slice(), script, b"\0"].concat();
        let code = run_with(
            &argv,
            &[c"PATH=/bin:/usr/bin"],
            &bounds,
            Some(write.as_fd()),
        );
        assert_eq!(code, Ok(Some(0)));
        drop(write);
        let mut out = vec![0u8; 4096];
        let n = rustix::io::read(&read, &mut out[..]).unwrap();
        out.truncate(n);
        out
    }

    #[test]
    fn the_child_applies_the_policys_rlimits() {
        let mut policy = crate::policy::Policy::defaults();
        policy.rlimit_nofile = Some(77);
        policy.rlimit_core = Some(0);
        policy.max_file_size = 12345 * 1024;
        let limits = bounds::CommandLimits::from_policy(&policy);
        // (Shells count `ulimit -f` in blocks of different sizes: the kernel's table says bytes.)
        let script = b"ulimit -n; ulimit -H -n; ulimit -c; grep 'Max file size' /proc/self/limits";
        let out = String::from_utf8(output_with_limits(script, &limits)).unwrap();
        let size = (12345 * 1024).to_string();
        let expected_size = format!("Max file size             {size:<21}{size:<21}bytes     \n");
        assert_eq!(out, format!("77\n77\n0\n{expected_size}"));
        // Unset: inherited as they are.
        let ours = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        let out = output_with_limits(b"ulimit -n", &bounds::CommandLimits::NONE);
        let expected = ours.current.map_or("unlimited".into(), |n| n.to_string()) + "\n";
        assert_eq!(out, expected.as_bytes());
    }

    #[test]
    fn an_rlimit_the_kernel_refuses_fails_the_bounds_stage() {
        let mut policy = crate::policy::Policy::defaults();
        // Above the kernel's ceiling (fs.nr_open): refused even for root.
        policy.rlimit_nofile = Some(u64::MAX - 1);
        let limits = bounds::CommandLimits::from_policy(&policy);
        let bounds = ChildBounds {
            limits: &limits,
            cgroup_procs: None,
            parent: rustix::process::getpid(),
        };
        let code = run_with(b"true\0", &[c"PATH=/bin:/usr/bin"], &bounds, None);
        assert_eq!(code, Err((FailedStage::Bounds, Errno::PERM)));
        let refusal = refusal(FailedStage::Bounds, Errno::PERM);
        assert_eq!(refusal.code, ErrorCode::SpawnFailed);
    }
}
