//! Starting the requested command: the pipes and the child's stack (made ahead of time, while
//! the process waits as a spare), then `clone` and `execve`; and reaping it.

use ferry_wire::session::Refusal;
use ferry_wire::{
    ErrorCode, ExecRequest, ExitStatus, StdinMode, ValidExec, WindowSize, DEFAULT_KILL_GRACE_MS,
};
use rustix::fd::{AsFd, OwnedFd};
use rustix::io::Errno;
use rustix::process::{Pid, Signal, WaitIdStatus};

use crate::cgroup::{self, TreeKill};
use crate::spawn::{self, ChildFailure, ChildStdio, Lists};
use crate::sys::{self, PtrStorage, ARGV_SLOTS, ENVP_SLOTS};
use crate::{bounds, clock, crash, policy, pty, users};

/// Larger pipes mean fewer wake-ups per byte when a command writes fast.
const PIPE_SIZE: usize = 1 << 20;

/// What a connection process sets up before its connection arrives, while it waits as a spare:
/// off the path a client waits on. A pipe that cannot be made now is made (or its failure
/// reported to the client) when the command starts.
pub struct Prepared {
    stdout: Option<(OwnedFd, OwnedFd)>,
    stderr: Option<(OwnedFd, OwnedFd)>,
    null: Option<OwnedFd>,
    stack: Option<sys::ChildStack>,
    oom_score: bounds::OomScore,
    /// The policy's default user, resolved ahead (two file reads off the client's path); a
    /// request for another user resolves its own. As old as the spare's wait, at most.
    default_user: Option<users::Credentials>,
}

/// Prepares a connection process; exits the process if its signals cannot be set up.
pub fn prepare() -> Prepared {
    // Writing to a stdin pipe whose reader is gone must be EPIPE, not death. Our own children
    // are waited for explicitly (the listener leaves SIGCHLD ignored, which would auto-reap).
    if sys::set_signal_ignored(Signal::PIPE, true).is_err()
        || sys::set_signal_ignored(Signal::CHILD, false).is_err()
    {
        sys::exit(71)
    }
    // This connection's own cgroup, for its command's tree.
    crate::cgroup::make_exec();
    Prepared {
        stdout: output_pipe().ok(),
        stderr: output_pipe().ok(),
        null: open_null().ok(),
        stack: sys::ChildStack::new().ok(),
        oom_score: bounds::OomScore::open(),
        default_user: users::authorize(policy::current(), None, is_root()).ok(),
    }
}

/// Prepares the next operation on a kept-alive connection (protocol 5), after the last one
/// released everything it held: fresh pipes, the last command's stack again (its child has
/// left it), the default user resolved for the first.
pub fn prepare_next(
    stack: Option<sys::ChildStack>,
    default_user: Option<users::Credentials>,
) -> Prepared {
    Prepared {
        stdout: output_pipe().ok(),
        stderr: output_pipe().ok(),
        null: open_null().ok(),
        stack,
        oom_score: bounds::OomScore::open(),
        default_user,
    }
}

impl Prepared {
    /// The default user resolved ahead, for the next operation on this connection.
    pub fn default_user(&self) -> Option<users::Credentials> {
        self.default_user.clone()
    }

    /// Who a request that asks for `requested` (or the default) runs as; see [`identity`].
    pub fn identity(self, requested: Option<&[u8]>) -> Result<users::Credentials, Refusal> {
        identity(requested, self.default_user)
    }
}

/// Who a request runs as: the policy's default user, resolved ahead while the process waited
/// as a spare, or the user it asks for, resolved now (with the refusal the client is told: an
/// unknown default user, a user the policy does not allow).
fn identity(
    requested: Option<&[u8]>,
    default_user: Option<users::Credentials>,
) -> Result<users::Credentials, Refusal> {
    match (requested, default_user) {
        (None, Some(credentials)) => Ok(credentials),
        (requested, _) => users::authorize(policy::current(), requested, is_root()),
    }
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Where `execve`'s arguments are built: the connection's static buffers.
pub struct Storage<'b> {
    pub argv: &'b mut PtrStorage<ARGV_SLOTS>,
    pub envp: &'b mut PtrStorage<ENVP_SLOTS>,
    pub cwd: &'b mut [u8],
}

/// A started command and the parent's ends of its pipes.
pub struct Child {
    pub pid: Pid,
    pub pidfd: OwnedFd,
    /// `None` when its stdin is `/dev/null` (or, on a terminal, nobody writes to it).
    pub stdin: Option<OwnedFd>,
    /// A pipe, or the terminal's master (a read gives `EIO` once no process holds the slave).
    pub stdout: OwnedFd,
    /// `None` on a terminal: stdout and stderr arrive merged.
    pub stderr: Option<OwnedFd>,
    /// When spawning began, on the monotonic clock.
    pub started_us: u64,
    /// The stack the child ran on until its `execve`, no longer used. Unmapped after the final
    /// frame, like the retired descriptors: an `munmap` is a syscall the client would wait for.
    pub spent_stack: Option<sys::ChildStack>,
    /// The runtime and output limits, for the pump.
    pub limits: RunLimits,
}

impl Child {
    /// The pid as the wire carries it.
    pub fn wire_pid(&self) -> u32 {
        self.pid.as_raw_nonzero().get().unsigned_abs()
    }
}

/// Starts the command `valid` asks for, with `lists` as its argv and environment (indexed in
/// `env_index`, see `spawn::prepare`) and what `ready` prepared, on a pseudo-terminal of
/// that size if `terminal` says so; `meanwhile` runs while the child starts. The refusal is
/// what the client is told.
#[allow(clippy::too_many_arguments)]
pub fn start(
    valid: &ValidExec<'_>,
    lists: Lists<'_>,
    env_index: &mut [u32],
    terminal: Option<WindowSize>,
    storage: Storage<'_>,
    ready: Prepared,
    meanwhile: impl FnOnce(),
) -> Result<Child, Refusal> {
    let credentials = identity(valid.request().user.map(|user| user.0), ready.default_user)?;
    let mut identity_buffer = [0u8; spawn::IDENTITY_ENV_BUFFER];
    let inherited = sys::environment().take(sys::MAX_INHERITED_ENV);
    let prepared = spawn::prepare(
        valid,
        lists,
        &credentials,
        inherited,
        storage.argv,
        storage.envp,
        storage.cwd,
        &mut identity_buffer,
        env_index,
    )?;
    let stdin_mode = valid.request().stdin;
    let ends = match terminal {
        Some(size) => Ends::terminal(size, stdin_mode)?,
        None => Ends::pipes(ready.stdout, ready.stderr, ready.null, stdin_mode)?,
    };
    let mut stack = match ready.stack {
        Some(stack) => stack,
        None => sys::ChildStack::new().map_err(resource_failure)?,
    };

    let stdio = ends.child_stdio();
    let limits = bounds::CommandLimits::from_policy(policy::current());
    let child_bounds = bounds::ChildBounds::new(&limits);
    let failure = ChildFailure::new();
    let started_us = clock::monotonic_us();
    let child = || spawn::exec_child(&prepared, &stdio, &child_bounds, &failure);
    // SAFETY: the agent is single-threaded and installs no signal handlers. `exec_child` is
    // straight-line, async-signal-safe work (see its NOTE): syscalls, copies into a buffer on
    // its own stack, reads of `prepared`, `stdio` and `child_bounds`, and one store to the
    // atomic `failure`; `meanwhile` touches none of them. `sys::spawn` returns only once the
    // child has left our memory, as `around_spawn` requires.
    #[allow(unsafe_code)]
    let spawned = ready
        .oom_score
        .around_spawn(|| unsafe { sys::spawn(&mut stack, &child, meanwhile) });
    let sys::Spawned { pid, pidfd } = spawned.map_err(resource_failure)?;
    crash::set_current_command(Some(pid));
    // The child has its ends now: ours would hold its pipes (or its terminal) open.
    let Ends { parent, child } = ends;
    drop(child);
    if let Some((stage, errno)) = failure.get() {
        reap(pid);
        return Err(spawn::refusal(stage, errno));
    }
    Ok(Child {
        pid,
        pidfd,
        stdin: parent.stdin,
        stdout: parent.stdout,
        stderr: parent.stderr,
        started_us,
        spent_stack: Some(stack),
        limits: RunLimits::new(&limits, valid.request(), started_us),
    })
}

/// The command's standard descriptors: the parent's ends, and the child's (closed once it has
/// them: a pipe or a terminal held open here would never show its EOF).
struct Ends {
    parent: ParentEnds,
    child: ChildEnds,
}

struct ParentEnds {
    stdin: Option<OwnedFd>,
    stdout: OwnedFd,
    stderr: Option<OwnedFd>,
}

enum ChildEnds {
    Pipes {
        stdin: OwnedFd,
        stdout: OwnedFd,
        stderr: OwnedFd,
    },
    /// The terminal's slave, as stdin, stdout and stderr.
    Terminal(OwnedFd),
}

impl Ends {
    /// Pipes, with those made while waiting (one that could not be made then is made now, and
    /// its errno reported).
    fn pipes(
        stdout: Option<(OwnedFd, OwnedFd)>,
        stderr: Option<(OwnedFd, OwnedFd)>,
        null: Option<OwnedFd>,
        stdin: StdinMode,
    ) -> Result<Ends, Refusal> {
        let output = |pipe: Option<(OwnedFd, OwnedFd)>| match pipe {
            Some(pipe) => Ok(pipe),
            None => output_pipe().map_err(resource_failure),
        };
        let (stdout_r, stdout_w) = output(stdout)?;
        let (stderr_r, stderr_w) = output(stderr)?;
        let (stdin_w, stdin_r) = match stdin {
            StdinMode::Pipe => {
                let (r, w) = new_pipe().map_err(resource_failure)?;
                rustix::io::ioctl_fionbio(&w, true).map_err(resource_failure)?;
                (Some(w), r)
            }
            StdinMode::Null => match null {
                Some(null) => (None, null),
                None => (None, open_null().map_err(resource_failure)?),
            },
        };
        Ok(Ends {
            parent: ParentEnds {
                stdin: stdin_w,
                stdout: stdout_r,
                stderr: Some(stderr_r),
            },
            child: ChildEnds::Pipes {
                stdin: stdin_r,
                stdout: stdout_w,
                stderr: stderr_w,
            },
        })
    }

    /// A pseudo-terminal of `size`. The parent keeps the master as its output source, and a
    /// duplicate of it as its stdin sink when stdin is piped: the client's end of stdin closes
    /// that duplicate only, and the terminal stays up for the command's output (as sshd does).
    fn terminal(size: WindowSize, stdin: StdinMode) -> Result<Ends, Refusal> {
        let pair = pty::open(size).map_err(terminal_failure)?;
        let stdin = match stdin {
            StdinMode::Pipe => {
                Some(rustix::io::fcntl_dupfd_cloexec(&pair.master, 3).map_err(resource_failure)?)
            }
            // The command still reads the terminal; nobody types into it.
            StdinMode::Null => None,
        };
        Ok(Ends {
            parent: ParentEnds {
                stdin,
                stdout: pair.master,
                stderr: None,
            },
            child: ChildEnds::Terminal(pair.slave),
        })
    }

    fn child_stdio(&self) -> ChildStdio<'_> {
        match &self.child {
            ChildEnds::Pipes {
                stdin,
                stdout,
                stderr,
            } => ChildStdio {
                stdin: stdin.as_fd(),
                stdout: stdout.as_fd(),
                stderr: stderr.as_fd(),
                stdin_is_pipe: self.parent.stdin.is_some(),
                terminal: false,
            },
            ChildEnds::Terminal(slave) => ChildStdio {
                stdin: slave.as_fd(),
                stdout: slave.as_fd(),
                stderr: slave.as_fd(),
                stdin_is_pipe: false,
                terminal: true,
            },
        }
    }
}

/// A pseudo-terminal that cannot be opened: out of them (`kernel.pty.max`) or of descriptors
/// is a passing shortage; anything else means this guest has none (no devpts, no /dev/ptmx).
fn terminal_failure(errno: Errno) -> Refusal {
    let (code, message) = match errno {
        Errno::NOSPC | Errno::MFILE | Errno::NFILE | Errno::NOMEM | Errno::AGAIN => (
            ErrorCode::ResourceExhausted,
            "out of pseudo-terminals or descriptors",
        ),
        _ => (ErrorCode::Unsupported, "cannot open a pseudo-terminal"),
    };
    Refusal::os(code, errno.raw_os_error().unsigned_abs(), message)
}

/// What the pump enforces on a running command: the policy's limits and the request's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunLimits {
    /// When (monotonic microseconds) the command's tree is killed if it still runs: the
    /// policy's `max_runtime`.
    pub deadline_us: Option<u64>,
    /// Output bytes (stdout and stderr together) the command may produce before its tree is
    /// killed: the policy's `max_output`; `None`: no limit.
    pub max_output: Option<u64>,
    /// When the request's timeout ends the command's tree (SIGTERM, then SIGKILL after the
    /// grace).
    pub timeout_us: Option<u64>,
    /// From a SIGTERM to the SIGKILL: the request's grace, or the default.
    pub kill_grace_us: u64,
    /// Kill what is left of the tree once the command itself exits.
    pub kill_tree_on_exit: bool,
    /// Bytes kept of each output stream (head and tail, see `cap`): the request's cap within
    /// the policy's `max_output`; `u64::MAX`: no cap.
    pub cap: u64,
    /// The command runs on a terminal (its output is the master's).
    pub terminal: bool,
}

impl RunLimits {
    pub fn new(limits: &bounds::CommandLimits, request: &ExecRequest<'_>, started_us: u64) -> Self {
        let max_output = (limits.max_output > 0).then_some(limits.max_output);
        let after_ms = |ms: u64| started_us.saturating_add(ms.saturating_mul(1000));
        RunLimits {
            deadline_us: (limits.max_runtime_s > 0)
                .then(|| after_ms(limits.max_runtime_s.saturating_mul(1000))),
            max_output,
            timeout_us: (request.timeout_ms > 0).then(|| after_ms(request.timeout_ms)),
            kill_grace_us: u64::from(request.kill_grace_ms.unwrap_or(DEFAULT_KILL_GRACE_MS))
                .saturating_mul(1000),
            kill_tree_on_exit: request.kill_tree_on_exit,
            // 0 asks for the agent's own maximum.
            cap: match (request.max_output, max_output) {
                (0, None) => u64::MAX,
                (0, Some(max)) => max,
                (asked, max) => asked.min(max.unwrap_or(u64::MAX)),
            },
            terminal: request.pty.is_some(),
        }
    }
}

/// Kills the command's whole tree ([`cgroup::kill_tree`]: its exec cgroup, and its process
/// group), leaving the command to be reaped as usual (its pidfd reports the end, and the
/// termination record its signal). Which mechanism held.
pub fn kill_tree(pid: Pid) -> TreeKill {
    cgroup::kill_tree(pid)
}

/// Kills the command's whole tree and, unless `reaped` already, waits for the command itself;
/// the rest of the tree is reaped by the listener (a subreaper, or PID 1).
pub fn kill(pid: Pid, reaped: bool) -> TreeKill {
    let how = kill_tree(pid);
    if !reaped {
        reap(pid);
    }
    crash::set_current_command(None);
    how
}

/// Sends signal `number` (1..=64) to the command's process group, as a client's `Signal`
/// asks. A group that is gone (ESRCH: the command and its group ended, the signal raced its
/// end) is not an error: the signal had nothing left to reach. Any other number is `EINVAL`.
pub fn signal(pid: Pid, number: u8) -> Result<(), Errno> {
    match sys::kill_process_group_raw(pid, number) {
        Ok(()) | Err(Errno::SRCH) => Ok(()),
        Err(errno) => Err(errno),
    }
}

/// Waits for `pid` to end (it has been killed or has failed before exec).
pub fn reap(pid: Pid) {
    while let Err(Errno::INTR) =
        rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty())
    {}
    crash::set_current_command(None);
}

/// How the kernel's status of an ended child reads on the wire.
pub fn exit_status(status: &WaitIdStatus) -> ExitStatus {
    to_exit_status(
        status.exit_status(),
        status.terminating_signal(),
        status.dumped(),
    )
}

fn to_exit_status(code: Option<i32>, signal: Option<i32>, core_dumped: bool) -> ExitStatus {
    match code {
        // The kernel reports the low 8 bits of the code, as `exit` takes it.
        Some(code) => ExitStatus::Code(code as u8),
        None => ExitStatus::Signal {
            number: signal.unwrap_or(0) as u8,
            core_dumped,
        },
    }
}

fn resource_failure(errno: Errno) -> Refusal {
    Refusal::os(
        ErrorCode::ResourceExhausted,
        errno.raw_os_error().unsigned_abs(),
        "cannot create pipes or process",
    )
}

fn new_pipe() -> Result<(OwnedFd, OwnedFd), Errno> {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
}

/// A pipe for the command's output: large, with our (read) end non-blocking.
fn output_pipe() -> Result<(OwnedFd, OwnedFd), Errno> {
    let (read, write) = new_pipe()?;
    let _ = rustix::pipe::fcntl_setpipe_size(&write, PIPE_SIZE);
    rustix::io::ioctl_fionbio(&read, true)?;
    Ok((read, write))
}

fn open_null() -> Result<OwnedFd, Errno> {
    use rustix::fs::{open, Mode, OFlags};
    match open(
        c"/dev/null",
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => Ok(fd),
        // No /dev/null (an empty rootfs before devtmpfs): a pipe whose writer is gone reads
        // as EOF just the same.
        Err(_) => new_pipe().map(|(r, _)| r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses() {
        assert_eq!(to_exit_status(Some(0), None, false), ExitStatus::Code(0));
        assert_eq!(
            to_exit_status(Some(255), None, false),
            ExitStatus::Code(255)
        );
        assert_eq!(
            to_exit_status(Some(256 + 3), None, false),
            ExitStatus::Code(3)
        );
        assert_eq!(
            to_exit_status(None, Some(9), false),
            ExitStatus::Signal {
                number: 9,
                core_dumped: false
            }
        );
        assert_eq!(
            to_exit_status(None, Some(11), true),
            ExitStatus::Signal {
                number: 11,
                core_dumped: true
            }
        );
        // Neither (cannot happen for an exited child): signal 0 rather than a panic.
        assert_eq!(
            to_exit_status(None, None, false),
            ExitStatus::Signal {
                number: 0,
                core_dumped: false
            }
        );
    }

    #[test]
    fn run_limits_from_the_policy_and_the_request() {
        let request = ExecRequest {
            argv: ferry_wire::StrList::new(b"true\0"),
            env: ferry_wire::StrList::default(),
            clean_env: false,
            cwd: None,
            stdin: StdinMode::Null,
            user: None,
            pty: None,
            timeout_ms: 0,
            kill_grace_ms: None,
            kill_tree_on_exit: false,
            max_output: 0,
        };
        let none = bounds::CommandLimits::NONE;
        let limits = RunLimits::new(&none, &request, 1_000);
        assert_eq!(
            limits,
            RunLimits {
                deadline_us: None,
                max_output: None,
                timeout_us: None,
                kill_grace_us: 2_000_000,
                kill_tree_on_exit: false,
                cap: u64::MAX,
                terminal: false,
            }
        );
        let asked = ExecRequest {
            pty: Some(WindowSize { rows: 1, cols: 1 }),
            timeout_ms: 1_500,
            kill_grace_ms: Some(0),
            kill_tree_on_exit: true,
            max_output: 100,
            ..request
        };
        let limits = RunLimits::new(&none, &asked, 1_000);
        assert_eq!(limits.timeout_us, Some(1_501_000));
        assert_eq!((limits.kill_grace_us, limits.cap), (0, 100));
        assert!(limits.kill_tree_on_exit && limits.terminal);
        // The policy's maximum bounds the cap, and is the cap when the request names none.
        let mut policy = crate::policy::Policy::defaults();
        policy.max_output = 50;
        policy.max_runtime_s = 2;
        let bounded = bounds::CommandLimits::from_policy(&policy);
        let limits = RunLimits::new(&bounded, &asked, 1_000);
        assert_eq!((limits.cap, limits.max_output), (50, Some(50)));
        assert_eq!(limits.deadline_us, Some(2_001_000));
        assert_eq!(RunLimits::new(&bounded, &request, 0).cap, 50);
        // Nothing overflows.
        let huge = ExecRequest {
            timeout_ms: u64::MAX,
            max_output: u64::MAX,
            kill_grace_ms: Some(u32::MAX),
            ..request
        };
        let limits = RunLimits::new(&none, &huge, u64::MAX);
        assert_eq!(limits.timeout_us, Some(u64::MAX));
        assert_eq!(limits.cap, u64::MAX);
    }

    #[test]
    fn a_terminals_stdin_is_a_duplicate_of_its_master() {
        let size = WindowSize { rows: 2, cols: 3 };
        let ends = Ends::terminal(size, StdinMode::Pipe).unwrap();
        let stdio = ends.child_stdio();
        assert!(stdio.terminal && !stdio.stdin_is_pipe);
        let Ends { parent, child } = ends;
        let ChildEnds::Terminal(slave) = child else {
            panic!("not a terminal")
        };
        assert!(parent.stderr.is_none(), "stdout and stderr are merged");
        let stdin = parent.stdin.unwrap();
        rustix::io::write(&stdin, b"typed\n").unwrap();
        // The client's end of stdin closes the duplicate only: the terminal stays up.
        drop(stdin);
        let mut buf = [0u8; 16];
        let n = rustix::io::read(&slave, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"typed\n");
        rustix::io::write(&slave, b"still up\n").unwrap();
        drop(slave);
        let out = pty::tests::read_all(&parent.stdout);
        assert!(out.ends_with(b"still up\r\n"), "{out:?}");
        // Without piped stdin nobody writes to it.
        let ends = Ends::terminal(size, StdinMode::Null).unwrap();
        assert!(ends.parent.stdin.is_none());
    }

    #[test]
    fn terminal_failures() {
        assert_eq!(
            terminal_failure(Errno::NOSPC).code,
            ErrorCode::ResourceExhausted
        );
        assert_eq!(terminal_failure(Errno::NOENT).code, ErrorCode::Unsupported);
    }

    #[test]
    fn signals_reach_the_group_and_a_gone_group_is_no_error() {
        use std::os::unix::process::{CommandExt, ExitStatusExt};
        let group = |script: &str| {
            let child = std::process::Command::new("/bin/sh")
                .args(["-c", script])
                .process_group(0)
                .spawn()
                .unwrap();
            let pid = Pid::from_raw(child.id() as i32).unwrap();
            (child, pid)
        };
        // A standard signal reaches the background child too (same group).
        let (mut child, pid) = group("sleep 30 & wait");
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(signal(pid, 15), Ok(()));
        assert_eq!(child.wait().unwrap().signal(), Some(15));
        // A real-time signal (its default action ends the process), up to the last one.
        for number in [40, 64] {
            let (mut child, pid) = group("exec sleep 30");
            assert_eq!(signal(pid, number), Ok(()));
            assert_eq!(child.wait().unwrap().signal(), Some(i32::from(number)));
        }
        // Ended and reaped: ESRCH, which is fine.
        assert_eq!(signal(pid, 15), Ok(()));
        // Not signals.
        assert_eq!(signal(pid, 0), Err(Errno::INVAL));
        assert_eq!(signal(pid, 65), Err(Errno::INVAL));
        assert_eq!(signal(pid, 255), Err(Errno::INVAL));
    }

    #[test]
    fn exit_status_of_real_processes() {
        use rustix::process::{WaitId, WaitIdOptions};
        let status_of = |script: &str| {
            let mut child = std::process::Command::new("/bin/sh")
                .args(["-c", script])
                .spawn()
                .unwrap();
            let pid = Pid::from_raw(child.id() as i32).unwrap();
            // Read the status without reaping; std reaps it next.
            let options = WaitIdOptions::EXITED | WaitIdOptions::NOWAIT;
            let status = rustix::process::waitid(WaitId::Pid(pid), options)
                .unwrap()
                .unwrap();
            child.wait().unwrap();
            exit_status(&status)
        };
        assert_eq!(status_of("exit 42"), ExitStatus::Code(42));
        assert_eq!(
            status_of("kill -KILL $$"),
            ExitStatus::Signal {
                number: 9,
                core_dumped: false
            }
        );
    }
}
