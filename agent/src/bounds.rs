//! What bounds a command, so the control plane survives its commands: per-exec rlimits and the
//! commands' cgroup (`cgroup`), applied in the child before `execve`; the OOM killer's choice
//! (the agent's processes at `oom_score_adj` -1000, commands at 0); and the runtime and output
//! limits the connection's pump enforces.
//!
//! The listener decides once ([`configure`]), before it forks; every connection process
//! inherits the result. The limits come from the policy (`policy::current`).

use core::sync::atomic::{AtomicBool, Ordering};

use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::process::{Resource, Rlimit};

use crate::cgroup::{self, Bounds};
use crate::log;
use crate::policy::Policy;
use crate::sys;

/// Where a process's OOM score adjustment is set.
const OOM_SCORE_ADJ: &core::ffi::CStr = c"/proc/self/oom_score_adj";
/// The agent's own: the OOM killer never picks it.
const AGENT_OOM_SCORE_ADJ: &[u8] = b"-1000";
/// A command's: the kernel's default.
const COMMAND_OOM_SCORE_ADJ: &[u8] = b"0";

/// The per-command limits, from the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLimits {
    /// Set as both the soft and the hard limit, so the command cannot raise them again.
    rlimits: heapless::Vec<(Resource, u64), 6>,
    /// Seconds the command may run before its process group is killed; 0: no limit.
    pub max_runtime_s: u64,
    /// Output bytes (stdout and stderr together) forwarded before the command is killed;
    /// 0: no limit.
    pub max_output: u64,
}

impl CommandLimits {
    /// No limits: the command inherits the agent's rlimits.
    #[cfg(test)]
    pub const NONE: CommandLimits = CommandLimits {
        rlimits: heapless::Vec::new(),
        max_runtime_s: 0,
        max_output: 0,
    };

    pub fn from_policy(policy: &Policy) -> CommandLimits {
        let file_size = (policy.max_file_size > 0).then_some(policy.max_file_size);
        let wanted = [
            (Resource::Nofile, policy.rlimit_nofile),
            (Resource::Nproc, policy.rlimit_nproc),
            (Resource::Cpu, policy.rlimit_cpu),
            (Resource::Fsize, file_size),
            (Resource::As, policy.rlimit_as),
            (Resource::Core, policy.rlimit_core),
        ];
        let mut rlimits = heapless::Vec::new();
        for (resource, limit) in wanted {
            if let Some(limit) = limit {
                // Room for all six.
                let _ = rlimits.push((resource, limit));
            }
        }
        CommandLimits {
            rlimits,
            max_runtime_s: policy.max_runtime_s,
            max_output: policy.max_output,
        }
    }
}

/// Whether the agent's processes run at -1000, so each command's score must be put back to 0.
static OOM_PROTECTED: AtomicBool = AtomicBool::new(false);

/// Protects the agent from the OOM killer and sets up the commands' cgroup; logs which bounds
/// are in use. Called once, by the listener, before it
/// forks its first spare.
pub fn configure(policy: &Policy, is_init: bool) -> Bounds {
    let oom_protected = match write_own_oom_score_adj(AGENT_OOM_SCORE_ADJ) {
        Ok(()) => true,
        Err(errno) => {
            // Unprivileged (no CAP_SYS_RESOURCE): the agent is as killable as its commands.
            log::error(b"cannot protect the agent from the OOM killer", errno);
            false
        }
    };
    OOM_PROTECTED.store(oom_protected, Ordering::Relaxed);
    cgroup::setup(policy, is_init)
}

/// What a command's child applies to itself before `execve`.
pub struct ChildBounds<'a> {
    pub limits: &'a CommandLimits,
    /// The exec's `cgroup.procs` (see `cgroup::commands_procs`), when commands have a cgroup.
    pub cgroup_procs: Option<BorrowedFd<'a>>,
    /// The connection process: the child dies with it ([`die_with_parent`]).
    pub parent: rustix::process::Pid,
}

impl<'a> ChildBounds<'a> {
    /// `limits`, and the commands' cgroup the listener set up (if any).
    pub fn new(limits: &'a CommandLimits) -> Self {
        ChildBounds {
            limits,
            cgroup_procs: cgroup::commands_procs(),
            parent: rustix::process::getpid(),
        }
    }
}

/// The child's step: joins the commands' cgroup (so it never runs unbounded while cgroups are
/// in use), then sets its rlimits.
///
/// NOTE: runs in the child between `clone` and `execve` (see `spawn::exec_child`): syscalls
/// and reads of what it borrows only.
pub fn enter(bounds: &ChildBounds<'_>) -> Result<(), Errno> {
    if let Some(procs) = bounds.cgroup_procs {
        // "0": the writer itself. The kernel moves only this process (not the connection
        // process whose memory it still shares: that is a separate thread group).
        rustix::io::write(procs, b"0")?;
    }
    for &(resource, limit) in &bounds.limits.rlimits {
        let limit = Rlimit {
            current: Some(limit),
            maximum: Some(limit),
        };
        rustix::process::setrlimit(resource, limit)?;
    }
    Ok(())
}

/// The child's last step before `execve`, after its credentials (a change of uid clears the
/// death signal): it gets SIGKILL when the connection process dies, a crash or a `kill -9
/// $PPID` included. That covers the command's direct child even without a cgroup; its exec
/// cgroup, killed by the listener, covers the rest of the tree. `Err(SRCH)` when the
/// connection process is already gone (the signal was armed too late to come).
///
/// NOTE: runs in the child between `clone` and `execve`, like [`enter`]. A setuid program the
/// command execs clears the signal again; the exec cgroup still holds it.
pub fn die_with_parent(bounds: &ChildBounds<'_>) -> Result<(), Errno> {
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
    if rustix::process::getppid() != Some(bounds.parent) {
        return Err(Errno::SRCH);
    }
    Ok(())
}

/// A connection process's `/proc/self/oom_score_adj`, opened ahead of time (while it waits
/// as a spare) when the agent protects itself from the OOM killer.
///
/// NOTE: the command's child shares our memory until `execve` (`CLONE_VM` without
/// `CLONE_VFORK`), and the kernel keeps one `oom_score_adj` for all processes sharing a memory
/// map: a write in the child would change ours too, and ours the child's. So the connection
/// process lowers its own protection to the command's score around the spawn
/// ([`OomScore::around_spawn`]): the child inherits 0, and ours is restored once the child has
/// its own memory. `spawn` returns when the child released ours (its tid is cleared), a moment
/// *before* `execve` switches it to the new program's: restoring then would give the command
/// -1000 too (it did, in a guest). So the restore waits until `kcmp` says the address spaces
/// differ; if `kcmp` is unavailable, the connection process stays at 0 rather than risk it.
pub struct OomScore {
    /// Our own `oom_score_adj`, when the agent is protected.
    file: Option<OwnedFd>,
    /// Ours, restored after the spawn.
    agent_score: &'static [u8],
}

impl OomScore {
    /// Opens our own `oom_score_adj` (nothing to do when the agent is not protected).
    pub fn open() -> OomScore {
        let protected = OOM_PROTECTED.load(Ordering::Relaxed);
        OomScore {
            file: protected.then(open_own_oom_score_adj).and_then(Result::ok),
            agent_score: AGENT_OOM_SCORE_ADJ,
        }
    }

    /// Runs `spawn` with our OOM score at the command's; restores ours once the child has an
    /// address space of its own.
    pub fn around_spawn(
        &self,
        spawn: impl FnOnce() -> Result<sys::Spawned, Errno>,
    ) -> Result<sys::Spawned, Errno> {
        let Some(file) = self.file.as_ref() else {
            return spawn();
        };
        let _ = rustix::io::write(file, COMMAND_OOM_SCORE_ADJ);
        let spawned = spawn()?;
        let us = rustix::process::getpid();
        loop {
            match sys::shares_address_space(us, spawned.pid) {
                // Between releasing our memory and switching to its own: a few microseconds.
                Ok(true) => rustix::thread::sched_yield(),
                Ok(false) => {
                    if let Err(errno) = rustix::io::write(file, self.agent_score) {
                        log::error(b"cannot restore the OOM protection", errno);
                    }
                    break;
                }
                Err(_) => break,
            }
        }
        Ok(spawned)
    }
}

fn open_own_oom_score_adj() -> Result<OwnedFd, Errno> {
    rustix::fs::open(
        OOM_SCORE_ADJ,
        OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

fn write_own_oom_score_adj(value: &[u8]) -> Result<(), Errno> {
    let file = open_own_oom_score_adj()?;
    rustix::io::write(file.as_fd(), value).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_score() -> String {
        std::fs::read_to_string("/proc/self/oom_score_adj").unwrap()
    }

    /// The score a program started by `sys::spawn` (sharing our memory until its `execve`)
    /// sees once it runs.
    fn score_seen_by_a_spawned_program(oom: &OomScore) -> String {
        let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        let mut argv_storage = sys::PtrStorage::<3>::new();
        let mut argv = sys::PtrArray::new(&mut argv_storage);
        assert!(argv.push(c"cat") && argv.push(OOM_SCORE_ADJ));
        let mut envp_storage = sys::PtrStorage::<1>::new();
        let envp = sys::PtrArray::new(&mut envp_storage);
        let child = || {
            let _ = rustix::stdio::dup2_stdout(&write);
            sys::execve(c"/bin/cat", &argv, &envp);
            sys::exit(127)
        };
        let mut stack = sys::ChildStack::new().unwrap();
        // SAFETY: the child makes syscalls and reads the arrays it borrows; the harness's
        // other threads touch none of it.
        #[allow(unsafe_code)]
        let spawned = oom.around_spawn(|| unsafe { sys::spawn(&mut stack, &child, || {}) });
        let spawned = spawned.unwrap();
        drop(write);
        let mut out = [0u8; 16];
        let n = rustix::io::read(&read, &mut out).unwrap();
        rustix::process::waitid(
            rustix::process::WaitId::PidFd(spawned.pidfd.as_fd()),
            rustix::process::WaitIdOptions::EXITED,
        )
        .unwrap();
        String::from_utf8_lossy(&out[..n]).into_owned()
    }

    /// The command starts at 0 while the agent stays protected. Run with a score this
    /// process may set without CAP_SYS_RESOURCE (raising is always allowed, and lowering back
    /// to where it started); the agent uses -1000 in the same way.
    #[test]
    fn a_command_starts_at_score_0_and_the_agent_keeps_its_own() {
        let original = own_score();
        std::fs::write("/proc/self/oom_score_adj", "300").unwrap();
        let oom = OomScore {
            file: Some(open_own_oom_score_adj().unwrap()),
            agent_score: b"300",
        };
        let seen = score_seen_by_a_spawned_program(&oom);
        let after = own_score();
        // Unprotected: nothing is written; the child inherits ours.
        let unprotected = OomScore {
            file: None,
            agent_score: b"300",
        };
        let inherited = score_seen_by_a_spawned_program(&unprotected);
        std::fs::write("/proc/self/oom_score_adj", original.trim()).unwrap();
        assert_eq!(seen, "0\n");
        assert_eq!(after, "300\n");
        assert_eq!(inherited, "300\n");
    }

    #[test]
    fn limits_from_the_policy() {
        let mut policy = Policy::defaults();
        assert_eq!(CommandLimits::from_policy(&policy), CommandLimits::NONE);
        policy.rlimit_nproc = Some(10);
        policy.rlimit_as = Some(1 << 30);
        policy.max_file_size = 4096;
        policy.max_runtime_s = 5;
        policy.max_output = 100;
        let limits = CommandLimits::from_policy(&policy);
        assert_eq!(
            limits.rlimits.as_slice(),
            &[
                (Resource::Nproc, 10),
                (Resource::Fsize, 4096),
                (Resource::As, 1 << 30)
            ]
        );
        assert_eq!((limits.max_runtime_s, limits.max_output), (5, 100));
    }
}
