//! The commands' cgroup (cgroup v2): every command joins one cgroup shared by all commands,
//! bounded in memory, processes and CPU, with the agent outside it, so a fork bomb or a memory
//! hog meets the cgroup's limits (and its OOM killer) and never the agent.
//!
//! - As PID 1: cgroup2 is mounted at `/sys/fs/cgroup` ([`mount_hierarchy`]), the agent stays in
//!   the root (exempt from the "no internal processes" rule) and the commands' cgroup is
//!   `/sys/fs/cgroup/ferry-commands`.
//! - As a service: only a delegated subtree is used. The agent's own cgroup (from
//!   `/proc/self/cgroup`) gets two leaves: `agent`, where the agent moves itself (a cgroup with
//!   controllers enabled for its children may hold no process), and `commands`. A cgroup that is
//!   not ours to change (the hierarchy's root, no write access, another process beside the
//!   agent) leaves the agent with rlimits only.
//!
//! The listener sets this up once ([`setup`]) and keeps the cgroup's directory and its
//! `cgroup.procs` open for good.
//!
//! **A cgroup per exec.** Each connection process has its own child of the commands' cgroup,
//! `c<its pid>` ([`make_exec`], done while it waits as a spare, off the client's path), and
//! keeps its `cgroup.procs` open; its command's child writes `0` to it before `execve` (see
//! `bounds::enter`), which moves the writer. The commands' `memory.max` and `pids.max` still
//! bound all commands together; `cpu` is enabled for the children, and each gets the kernel's
//! default `cpu.weight` (100), the same for all, so a fork bomb in one exec's cgroup takes no
//! more CPU than any other exec. The exec's cgroup is what `cgroup.kill` ends ([`kill_exec`]):
//! the whole tree, `setsid` and double-fork escapees included. It is removed once empty
//! ([`remove_exec`]): by the connection process at its end, else by the listener later.
//!
//! `memory` is enabled for the exec cgroups too, so each has its own `memory.events` and
//! `memory.peak`: the termination record says whether the OOM killer hit this exec and how
//! much memory its tree used at most ([`exec_memory_facts`]), not what any command did.
//!
//! NOTE: with a controller enabled for its children, the commands' cgroup itself may hold no
//! process: a command whose exec cgroup could not be made is refused at its start (the join
//! fails) rather than run without bounds. A pid the kernel reuses while an earlier `c<pid>`
//! still holds daemons reuses that directory (its daemons then share the new exec's fate).

use core::ffi::CStr;

use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::process::{Pid, Signal};

use crate::policy::Policy;
use crate::sys::SetOnce;
use crate::{cstr, log};

/// What bounds commands beyond their rlimits (reported in the hello and by health checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bounds {
    /// Commands run in the commands' cgroup: memory, processes and CPU are bounded together.
    Cgroup,
    /// No usable cgroup v2: each command has its rlimits only.
    RlimitsOnly,
}

/// Where PID 1 mounts the cgroup2 hierarchy, and where a service looks for it first.
pub const MOUNT_POINT: &CStr = c"/sys/fs/cgroup";
/// Where systemd's hybrid layout puts cgroup2 (cgroup v1 at `/sys/fs/cgroup`).
const HYBRID_MOUNT_POINT: &CStr = c"/sys/fs/cgroup/unified";
/// The commands' cgroup under the root, as PID 1.
const ROOT_COMMANDS: &CStr = c"ferry-commands";
/// The leaves of a delegated subtree, as a service.
const AGENT_LEAF: &CStr = c"agent";
const COMMANDS_LEAF: &CStr = c"commands";

/// The controllers the commands' cgroup uses, when the kernel has them.
const CONTROLLERS: [&[u8]; 3] = [b"memory", b"pids", b"cpu"];

/// `cpu.max`'s period, in microseconds (the kernel's default).
pub const CPU_PERIOD_US: u64 = 100_000;

/// The commands' cgroup, open for the rest of the agent's life (and inherited by every
/// connection process).
pub struct Commands {
    #[allow(dead_code)]
    dir: OwnedFd,
    procs: OwnedFd,
    /// The `memory.max` written (`None`: unlimited, or the kernel refused it).
    memory_max: Option<u64>,
    /// Commands run in exec cgroups of their own (else in this one itself).
    exec_cgroups: bool,
}

static COMMANDS: SetOnce<Commands> = SetOnce::new();

/// What is in use: a cgroup once [`setup`] succeeded, rlimits only before or without.
// The hello and health checks report it next.
#[allow(dead_code)]
pub fn bounds() -> Bounds {
    match COMMANDS.get() {
        Some(_) => Bounds::Cgroup,
        None => Bounds::RlimitsOnly,
    }
}

/// The commands' `memory.max` in effect: the value written at [`setup`], `None` without a
/// cgroup, without the memory controller, or when memory is left unlimited.
pub fn memory_max() -> Option<u64> {
    COMMANDS.get().and_then(|commands| commands.memory_max)
}

/// The `cgroup.procs` a command's child writes `0` to, to join: its exec's cgroup's, or else
/// the commands' (see the module's NOTE).
pub fn commands_procs() -> Option<BorrowedFd<'static>> {
    EXEC.get()
        .map(|exec| &exec.procs)
        .or(COMMANDS.get().map(|commands| &commands.procs))
        .map(AsFd::as_fd)
}

/// This connection process's exec cgroup, once [`make_exec`] made it.
static EXEC: SetOnce<Exec> = SetOnce::new();

/// An exec cgroup's files the connection process keeps open: opened while it waits as a spare,
/// so neither the start nor the end of its command walks a path for them.
struct Exec {
    /// `cgroup.procs`, which the command's child writes `0` to, to join.
    procs: OwnedFd,
    /// `memory.events` (`oom_kill`) and `memory.peak` (Linux ≥ 5.19); `None` without the
    /// memory controller.
    events: Option<OwnedFd>,
    peak: Option<OwnedFd>,
    /// `oom_kill` when the cgroup was made: a reused one (see the module's NOTE) has a past.
    oom_kills_before: u64,
}

/// How a command's tree was killed (or asked to end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeKill {
    /// Through the exec's cgroup (`cgroup.kill`, or each process of `cgroup.procs` for
    /// SIGTERM): every process, escapees included.
    Cgroup,
    /// The command's process group only (no exec cgroup, or no `cgroup.kill`).
    ProcessGroup,
}

/// What the exec cgroup says about its tree's memory, for the termination record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryFacts {
    /// The OOM killer killed a process of this exec (`memory.events`' `oom_kill` grew).
    pub oom_killed: bool,
    /// `memory.peak`, in bytes; 0 when unknown (no exec cgroup, no memory controller, a kernel
    /// before 5.19).
    pub peak_memory: u64,
}

/// This exec's [`MemoryFacts`], read now (at its end).
pub fn exec_memory_facts() -> MemoryFacts {
    let Some(exec) = EXEC.get() else {
        return MemoryFacts::default();
    };
    let mut buf = [0u8; 256];
    let oom_kills = exec
        .events
        .as_ref()
        .and_then(|events| reread(events.as_fd(), &mut buf).ok())
        .and_then(|text| event_count(text, b"oom_kill"));
    let mut buf = [0u8; 32];
    let peak = exec
        .peak
        .as_ref()
        .and_then(|peak| reread(peak.as_fd(), &mut buf).ok())
        .and_then(|text| parse_u64(text.trim_ascii()));
    MemoryFacts {
        oom_killed: oom_kills.is_some_and(|now| now > exec.oom_kills_before),
        peak_memory: peak.unwrap_or(0),
    }
}

/// A `flat-keyed` cgroup file's value for `key` (`memory.events`: `oom_kill 3`).
fn event_count(text: &[u8], key: &[u8]) -> Option<u64> {
    text.split(|b| *b == b'\n').find_map(|line| {
        let value = line.strip_prefix(key)?.strip_prefix(b" ")?;
        parse_u64(value.trim_ascii())
    })
}

/// Reads a cgroup file again through a descriptor kept open: from its start, where the kernel
/// generates it anew.
fn reread<'b>(fd: BorrowedFd<'_>, buf: &'b mut [u8]) -> Result<&'b [u8], Errno> {
    rustix::fs::seek(fd, rustix::fs::SeekFrom::Start(0))?;
    crate::file::read_fd(fd, buf).map(|read| read.text)
}

/// An exec cgroup's name, `c<pid>`, in `buf`, followed by `file` (`/name`) when not empty.
fn exec_path<'b>(buf: &'b mut [u8; 48], pid: u32, file: &[u8]) -> Option<&'b CStr> {
    let mut digits = [0u8; 20];
    let digits = decimal(&mut digits, u64::from(pid));
    cstr::join(buf, &[b"c", digits, file])
}

fn own_pid() -> u32 {
    rustix::process::getpid()
        .as_raw_nonzero()
        .get()
        .unsigned_abs()
}

/// A connection process makes its exec cgroup (see the module's documentation) and keeps its
/// `cgroup.procs` for its command; nothing without the commands' cgroup. A failure is logged:
/// the command is then refused at its start.
pub fn make_exec() {
    let Some(commands) = COMMANDS.get().filter(|commands| commands.exec_cgroups) else {
        return;
    };
    let mut buf = [0u8; 48];
    let pid = own_pid();
    let dir = commands.dir.as_fd();
    let made = exec_path(&mut buf, pid, b"")
        .ok_or(Errno::NAMETOOLONG)
        .and_then(|name| make_dir(dir, name))
        .and_then(|()| {
            let procs = exec_path(&mut buf, pid, b"/cgroup.procs").ok_or(Errno::NAMETOOLONG)?;
            open_at(dir, procs, OFlags::WRONLY)
        });
    let procs = match made {
        Ok(procs) => procs,
        Err(errno) => return log::error(b"cgroup: cannot make the exec's cgroup", errno),
    };
    // Missing without the memory controller (or `memory.peak` before Linux 5.19): the facts
    // are then unknown, nothing else changes.
    let mut open = |file: &[u8]| {
        let path = exec_path(&mut buf, pid, file)?;
        open_at(dir, path, OFlags::RDONLY).ok()
    };
    let events = open(b"/memory.events");
    let peak = open(b"/memory.peak");
    let mut text = [0u8; 256];
    let oom_kills_before = events
        .as_ref()
        .and_then(|events| reread(events.as_fd(), &mut text).ok())
        .and_then(|text| event_count(text, b"oom_kill"))
        .unwrap_or(0);
    let _ = EXEC.set(Exec {
        procs,
        events,
        peak,
        oom_kills_before,
    });
}

/// Kills every process in the exec cgroup of connection process `pid` (`cgroup.kill`).
/// `Err(NOSYS)` without the commands' cgroup; `Err(NOENT)` when there is no such cgroup or the
/// kernel has no `cgroup.kill` (before 5.14).
pub fn kill_exec(pid: u32) -> Result<(), Errno> {
    let commands = COMMANDS.get().ok_or(Errno::NOSYS)?;
    let mut buf = [0u8; 48];
    let kill = exec_path(&mut buf, pid, b"/cgroup.kill").ok_or(Errno::NAMETOOLONG)?;
    write_file(commands.dir.as_fd(), kill, b"1")
}

/// Kills this connection process's command tree: `cgroup.kill` on its exec cgroup, and the
/// process group of `leader` in any case (the fallback, and cheap). Which one held.
pub fn kill_tree(leader: Pid) -> TreeKill {
    let by_cgroup = EXEC.get().is_some() && kill_exec(own_pid()).is_ok();
    let _ = rustix::process::kill_process_group(leader, Signal::KILL);
    if by_cgroup {
        TreeKill::Cgroup
    } else {
        TreeKill::ProcessGroup
    }
}

/// Asks this connection process's command tree to end (a timeout's or a cancel's first step;
/// [`kill_tree`] follows after the grace): SIGTERM to every process in its exec cgroup, and to
/// the process group of `leader` in any case. Which one reached the tree.
///
/// There is no `cgroup.kill` for other signals: each process listed in `cgroup.procs` is
/// signalled in turn (as systemd does). One forked meanwhile is missed, and a pid that exits and
/// is reused between the read and the signal gets a SIGTERM meant for it; the SIGKILL after the
/// grace is exhaustive and race-free.
pub fn terminate_tree(leader: Pid) -> TreeKill {
    let by_cgroup = EXEC.get().is_some() && signal_exec(own_pid(), Signal::TERM).is_ok();
    let _ = rustix::process::kill_process_group(leader, Signal::TERM);
    if by_cgroup {
        TreeKill::Cgroup
    } else {
        TreeKill::ProcessGroup
    }
}

/// Sends `signal` to every process in the exec cgroup of connection process `pid` (a job's
/// `kill --signal`, a cancel's SIGTERM): `cgroup.kill` for SIGKILL where the kernel has it, else
/// each process listed in `cgroup.procs` in turn (see [`terminate_tree`] for that one's race).
/// `Err(NOSYS)` without the commands' cgroup, `Err(NOENT)` without that exec cgroup.
pub fn signal_exec(pid: u32, signal: Signal) -> Result<(), Errno> {
    if signal == Signal::KILL && kill_exec(pid).is_ok() {
        return Ok(());
    }
    let commands = COMMANDS.get().ok_or(Errno::NOSYS)?;
    let mut buf = [0u8; 48];
    let name = exec_path(&mut buf, pid, b"").ok_or(Errno::NAMETOOLONG)?;
    signal_each_in(open_dir(commands.dir.as_fd(), name)?.as_fd(), signal)
}

/// For a request that asked for it (`kill_tree_on_exit`): once the command itself has ended,
/// kills what is left of its tree ([`kill_tree`]); `None` when nothing was left to kill.
pub fn kill_tree_on_exit(leader: Pid) -> Option<TreeKill> {
    tree_remains(leader).then(|| kill_tree(leader))
}

/// Whether this connection's exec cgroup cannot serve another command (protocol 5): processes
/// of the last command's tree `leader` remain, or the OOM killer hit it (a later command's tree
/// kill and memory facts must be its own). Never without an exec cgroup: each command's tree
/// is then its own process group, and no record reads a shared counter.
pub fn exec_cgroup_spent(leader: Pid) -> bool {
    EXEC.get().is_some() && (tree_remains(leader) || exec_memory_facts().oom_killed)
}

/// Whether any process of the command's tree still runs: its exec cgroup is populated, or its
/// process group has a member.
pub fn tree_remains(leader: Pid) -> bool {
    let mut buf = [0u8; 48];
    let mut text = [0u8; 64];
    let populated = COMMANDS
        .get()
        .zip(EXEC.get())
        .and_then(|(commands, _)| {
            let events = exec_path(&mut buf, own_pid(), b"/cgroup.events")?;
            read_file_at(commands.dir.as_fd(), events, &mut text).ok()
        })
        .and_then(|text| event_count(text, b"populated"));
    populated.is_some_and(|n| n > 0) || rustix::process::test_kill_process_group(leader).is_ok()
}

/// Sends `signal` to each process listed in the `cgroup.procs` of the cgroup at `dir`.
fn signal_each_in(dir: BorrowedFd<'_>, signal: Signal) -> Result<(), Errno> {
    let procs = open_at(dir, c"cgroup.procs", OFlags::RDONLY)?;
    let mut chunk = [0u8; 512];
    // One pid per line; a line may span two reads.
    let mut pid: Option<u32> = Some(0);
    loop {
        let n = match rustix::io::read(&procs, &mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(Errno::INTR) => continue,
            Err(errno) => return Err(errno),
        };
        for byte in chunk.get(..n).unwrap_or(&[]) {
            if *byte == b'\n' {
                // Never 0 (not a process) nor -1 (everything): only a parsed pid is signalled.
                let target = pid.and_then(|pid| Pid::from_raw(i32::try_from(pid).ok()?));
                if let Some(target) = target {
                    // Gone already (ESRCH) is what a signal to a dying tree meets.
                    let _ = rustix::process::kill_process(target, signal);
                }
                pid = Some(0);
            } else {
                let digit = byte.wrapping_sub(b'0');
                pid = pid
                    .filter(|_| digit <= 9)
                    .and_then(|pid| pid.checked_mul(10)?.checked_add(u32::from(digit)));
            }
        }
    }
}

/// Removes the exec cgroup of connection process `pid`: `Err(BUSY)` while processes are in it
/// (or are still exiting), `Err(NOENT)` once gone, `Err(NOSYS)` without the commands' cgroup.
pub fn remove_exec(pid: u32) -> Result<(), Errno> {
    let commands = COMMANDS.get().ok_or(Errno::NOSYS)?;
    let mut buf = [0u8; 48];
    let name = exec_path(&mut buf, pid, b"").ok_or(Errno::NAMETOOLONG)?;
    rustix::fs::unlinkat(commands.dir.as_fd(), name, rustix::fs::AtFlags::REMOVEDIR)
}

/// Removes this connection process's exec cgroup if it is empty.
pub fn remove_own_exec() {
    if EXEC.get().is_some() {
        let _ = remove_exec(own_pid());
    }
}

/// Kills every process of every command (`cgroup.kill`, Linux ≥ 5.14), `setsid` escapees and
/// daemons included; returns how many processes the cgroup held just before. The kill is
/// asynchronous: they die (and their connections report their ends) right after.
///
/// `Err(NOSYS)` when commands have no cgroup ([`Bounds::RlimitsOnly`]); `Err(NOENT)` from a
/// kernel without `cgroup.kill`.
// Exposed as a protocol operation next.
#[allow(dead_code)]
pub fn kill_all_commands() -> Result<u32, Errno> {
    let commands = COMMANDS.get().ok_or(Errno::NOSYS)?;
    kill_all_in(commands.dir.as_fd())
}

/// [`kill_all_commands`] for the cgroup at `dir`.
#[allow(dead_code)]
fn kill_all_in(dir: BorrowedFd<'_>) -> Result<u32, Errno> {
    let count = count_processes(dir);
    write_file(dir, c"cgroup.kill", b"1")?;
    Ok(count)
}

/// The processes in the cgroup at `dir`: `pids.current`, or else the lines of `cgroup.procs`.
#[allow(dead_code)]
fn count_processes(dir: BorrowedFd<'_>) -> u32 {
    let mut buf = [0u8; 32];
    if let Some(count) = read_file_at(dir, c"pids.current", &mut buf)
        .ok()
        .and_then(|text| crate::config::parse_u32(text.trim_ascii()))
    {
        return count;
    }
    let Ok(procs) = open_at(dir, c"cgroup.procs", OFlags::RDONLY) else {
        return 0;
    };
    let mut lines = 0u32;
    let mut chunk = [0u8; 512];
    loop {
        match rustix::io::read(&procs, &mut chunk) {
            Ok(0) => return lines,
            Ok(n) => {
                let read = chunk.get(..n).unwrap_or(&[]);
                let newlines = read.iter().filter(|b| **b == b'\n').count();
                lines = lines.saturating_add(u32::try_from(newlines).unwrap_or(u32::MAX));
            }
            Err(Errno::INTR) => {}
            Err(_) => return lines,
        }
    }
}

/// PID 1: mounts cgroup2 at [`MOUNT_POINT`] (unless something is mounted there already).
/// `favordynmods` (Linux ≥ 6.1) makes moving a process between cgroups, which every command
/// does, cheap (no RCU grace period per move); an older kernel mounts without it.
pub fn mount_hierarchy() {
    use rustix::mount::{mount, MountFlags};
    if is_cgroup2(MOUNT_POINT) {
        return;
    }
    let _ = rustix::fs::mkdir(MOUNT_POINT, Mode::from_raw_mode(0o755));
    let flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    let mounted = mount(
        c"cgroup2",
        MOUNT_POINT,
        c"cgroup2",
        flags,
        Some(c"favordynmods"),
    )
    .or_else(|_| mount(c"cgroup2", MOUNT_POINT, c"cgroup2", flags, None));
    if let Err(errno) = mounted {
        log::error(b"mount /sys/fs/cgroup", errno);
    }
}

/// The limits the commands' cgroup gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `memory.max` in bytes; `None` leaves it unlimited.
    pub memory_max: Option<u64>,
    /// `pids.max`; 0 leaves it unlimited.
    pub pids_max: u32,
    /// `cpu.max` in percent of one CPU; 0 leaves it unlimited.
    pub cpu_max_percent: u32,
    /// Each exec gets a cgroup of its own (the policy's `exec_cgroups`).
    pub exec_cgroups: bool,
}

impl Limits {
    /// The policy's limits; `memory_max` 0 means [`default_memory_max`] of the machine's memory
    /// as `/proc/meminfo` describes it at setup.
    pub fn from_policy(policy: &Policy, memory: MemInfo) -> Limits {
        let memory_max = match policy.memory_max {
            0 => default_memory_max(memory),
            max => Some(max),
        };
        Limits {
            memory_max,
            pids_max: policy.pids_max,
            cpu_max_percent: policy.cpu_max_percent,
            exec_cgroups: policy.exec_cgroups,
        }
    }
}

/// Memory kept out of the commands' reach for the agent and the kernel: a twentieth of the
/// machine's memory, at least 16 MiB.
pub fn agent_reserve(mem_total: u64) -> u64 {
    (mem_total / 20).max(16 << 20)
}

/// The commands' default `memory.max`: what is really available at setup (`MemAvailable`)
/// less [`agent_reserve`], and never more than `MemTotal` less it. Bounding by `MemTotal` alone
/// set a limit the machine could not give (the kernel, the initramfs and the agent hold part of
/// it), so a memory hog met the whole machine's OOM killer before its cgroup's. `None` (memory
/// unlimited, rather than a limit that kills everything) when not even the reserve is there or
/// `/proc/meminfo` says nothing usable.
pub fn default_memory_max(memory: MemInfo) -> Option<u64> {
    let reserve = agent_reserve(memory.total?);
    let ceiling = memory.total?.saturating_sub(reserve);
    // A kernel without `MemAvailable` (before 3.14): the ceiling alone.
    let available = memory
        .available
        .map_or(ceiling, |available| available.saturating_sub(reserve));
    Some(available.min(ceiling)).filter(|max| *max > 0)
}

/// What the default memory limit is computed from, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemInfo {
    /// `MemTotal`.
    pub total: Option<u64>,
    /// `MemAvailable`: free memory plus what the kernel can reclaim without swapping.
    pub available: Option<u64>,
}

impl MemInfo {
    /// From `/proc/meminfo`'s contents.
    pub fn parse(meminfo: &[u8]) -> MemInfo {
        MemInfo {
            total: meminfo_field(meminfo, b"MemTotal:"),
            available: meminfo_field(meminfo, b"MemAvailable:"),
        }
    }
}

/// Why the commands' cgroup could not be set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetupError {
    pub what: &'static [u8],
    pub errno: Errno,
}

fn failed(what: &'static [u8]) -> impl FnOnce(Errno) -> SetupError {
    move |errno| SetupError { what, errno }
}

/// Sets up the commands' cgroup (see the module's documentation) and keeps it for every
/// later command; logs once which bounds are in use. Called once, by the listener, before it
/// forks.
pub fn setup(policy: &Policy, is_init: bool) -> Bounds {
    // MemTotal, MemFree and MemAvailable are its first three lines.
    let mut meminfo = [0u8; 256];
    let memory = read_file_at(cwd(), c"/proc/meminfo", &mut meminfo)
        .map_or_else(|_| MemInfo::default(), MemInfo::parse);
    let limits = Limits::from_policy(policy, memory);
    let made = if is_init {
        setup_at_root(MOUNT_POINT, &limits)
    } else {
        setup_delegated(&limits)
    };
    match made {
        Ok(commands) => {
            // Said in every hello (and by `ferry health`), not on the console: under TCG every
            // console line costs PID 1 milliseconds before it listens.
            let _ = COMMANDS.set(commands);
            Bounds::Cgroup
        }
        Err(error) => {
            log::Line::new()
                .push(b"commands are bounded by rlimits only: ")
                .push(error.what)
                .push(b": errno ")
                .num(u64::from(error.errno.raw_os_error().unsigned_abs()))
                .emit();
            Bounds::RlimitsOnly
        }
    }
}

/// PID 1's layout: controllers enabled in the root, `ferry-commands` beside the agent.
fn setup_at_root(root: &CStr, limits: &Limits) -> Result<Commands, SetupError> {
    if !is_cgroup2(root) {
        return Err(SetupError {
            what: b"no cgroup2 hierarchy",
            errno: Errno::NODEV,
        });
    }
    let root = open_dir(cwd(), root).map_err(failed(b"open the cgroup root"))?;
    // The root may hold processes whatever its controllers: a controller the kernel refuses
    // (logged) leaves that resource unbounded, not the commands without a cgroup.
    let _ = enable_controllers(root.as_fd());
    make_commands(root.as_fd(), ROOT_COMMANDS, limits)
}

/// A service's layout in its own (delegated) cgroup.
fn setup_delegated(limits: &Limits) -> Result<Commands, SetupError> {
    let mount = [MOUNT_POINT, HYBRID_MOUNT_POINT]
        .into_iter()
        .find(|dir| is_cgroup2(dir))
        .ok_or(SetupError {
            what: b"no cgroup2 hierarchy",
            errno: Errno::NODEV,
        })?;
    let mut buf = [0u8; 1024];
    let own = read_file_at(cwd(), c"/proc/self/cgroup", &mut buf)
        .map_err(failed(b"read /proc/self/cgroup"))?;
    let own = unified_path(own).ok_or(SetupError {
        what: b"not in a cgroup2 cgroup",
        errno: Errno::NOENT,
    })?;
    let mut path = [0u8; 1024];
    let relative = own.strip_prefix(b"/").unwrap_or(own);
    if relative.is_empty() {
        // The hierarchy's root is the whole machine's, not ours to rearrange.
        return Err(SetupError {
            what: b"the agent's cgroup is the root",
            errno: Errno::PERM,
        });
    }
    let own = cstr::join(&mut path, &[mount.to_bytes(), b"/", relative]).ok_or(SetupError {
        what: b"cgroup path too long",
        errno: Errno::NAMETOOLONG,
    })?;
    let own = open_dir(cwd(), own).map_err(failed(b"open the agent's cgroup"))?;
    setup_in(own.as_fd(), limits, b"0")
}

/// Moves the agent (`agent`: its pid in decimal, or `0` for the caller) into `own/agent` and
/// makes `own/commands`; moves it back when controllers cannot be enabled in `own`.
fn setup_in(own: BorrowedFd<'_>, limits: &Limits, agent: &[u8]) -> Result<Commands, SetupError> {
    make_dir(own, AGENT_LEAF).map_err(failed(b"create the agent's leaf cgroup"))?;
    let moved =
        open_dir(own, AGENT_LEAF).and_then(|leaf| write_file(leaf.as_fd(), c"cgroup.procs", agent));
    if let Err(errno) = moved {
        let _ = rustix::fs::unlinkat(own, AGENT_LEAF, rustix::fs::AtFlags::REMOVEDIR);
        return Err(failed(b"move the agent into its leaf cgroup")(errno));
    }
    if let Err(errno) = enable_controllers(own) {
        // Another process in our cgroup (EBUSY), or no right to: leave things as they were.
        let _ = write_file(own, c"cgroup.procs", agent);
        let _ = rustix::fs::unlinkat(own, AGENT_LEAF, rustix::fs::AtFlags::REMOVEDIR);
        return Err(failed(b"enable controllers in the agent's cgroup")(errno));
    }
    make_commands(own, COMMANDS_LEAF, limits)
}

/// Enables each of [`CONTROLLERS`] that `parent` offers for its children (each on its own, so
/// one the kernel refuses does not keep the others out); the first failure, if any.
fn enable_controllers(parent: BorrowedFd<'_>) -> Result<(), Errno> {
    let mut buf = [0u8; 256];
    let available = read_file_at(parent, c"cgroup.controllers", &mut buf)?;
    let mut result = Ok(());
    for controller in CONTROLLERS {
        if !available
            .split(|b| b.is_ascii_whitespace())
            .any(|name| name == controller)
        {
            continue;
        }
        let mut line = [0u8; 16];
        let Some(enable) = cstr::join(&mut line, &[b"+", controller]) else {
            continue;
        };
        if let Err(errno) = write_file(parent, c"cgroup.subtree_control", enable.to_bytes()) {
            log::Line::new()
                .push(b"cgroup: cannot enable ")
                .push(controller)
                .push(b": errno ")
                .num(u64::from(errno.raw_os_error().unsigned_abs()))
                .emit();
            result = result.and(Err(errno));
        }
    }
    result
}

/// Creates (or reuses) the commands' cgroup `name` under `parent` and applies `limits`.
fn make_commands(
    parent: BorrowedFd<'_>,
    name: &CStr,
    limits: &Limits,
) -> Result<Commands, SetupError> {
    make_dir(parent, name).map_err(failed(b"create the commands' cgroup"))?;
    let dir = open_dir(parent, name).map_err(failed(b"open the commands' cgroup"))?;
    let memory_max = configure(dir.as_fd(), limits);
    // Each exec's cgroup gets its own share of the CPU, and its own memory accounting (its
    // OOM kills and peak for the termination record; the commands' `memory.max` still bounds
    // them all). Each on its own: one the kernel lacks or refuses (a leftover process in a
    // reused cgroup, say) keeps neither the other out, and exec cgroups still hold, and kill,
    // each tree.
    // Without exec cgroups, commands join this cgroup itself, which may then have no
    // controller enabled for children (no internal processes): a reused one gives them back.
    let controllers: [(&[u8], &[u8]); 2] = if limits.exec_cgroups {
        [
            (b"+cpu", b"cgroup: cannot enable cpu for exec cgroups"),
            (b"+memory", b"cgroup: cannot enable memory for exec cgroups"),
        ]
    } else {
        [
            (b"-cpu", b"cgroup: cannot disable cpu for children"),
            (b"-memory", b"cgroup: cannot disable memory for children"),
        ]
    };
    for (enable, what) in controllers {
        match write_file(dir.as_fd(), c"cgroup.subtree_control", enable) {
            // Not offered by the parent: a kernel or a delegation without it.
            Ok(()) | Err(Errno::NOENT) => {}
            Err(errno) => log::error(what, errno),
        }
    }
    let procs = open_at(dir.as_fd(), c"cgroup.procs", OFlags::WRONLY)
        .map_err(failed(b"open the commands' cgroup.procs"))?;
    Ok(Commands {
        dir,
        procs,
        memory_max,
        exec_cgroups: limits.exec_cgroups,
    })
}

/// Writes the limits into the commands' cgroup. A file that is missing belongs to a controller
/// the kernel lacks; any other failure is logged, and the rest still applied. Returns the
/// `memory.max` that was written.
fn configure(dir: BorrowedFd<'_>, limits: &Limits) -> Option<u64> {
    let mut memory_max = None;
    let mut memory = [0u8; 20];
    let mut pids = [0u8; 20];
    let mut cpu = [0u8; 48];
    let settings: [(&CStr, Option<&[u8]>); 5] = [
        (
            c"memory.max",
            limits.memory_max.map(|max| decimal(&mut memory, max)),
        ),
        // Swap would let the commands' memory outgrow memory.max on the machine's disk.
        (c"memory.swap.max", Some(b"0")),
        // An OOM kill in the commands' cgroup takes the one process that grew, not every
        // command of every connection.
        (c"memory.oom.group", Some(b"0")),
        (
            c"pids.max",
            Some(match limits.pids_max {
                0 => b"max".as_slice(),
                max => decimal(&mut pids, u64::from(max)),
            }),
        ),
        (c"cpu.max", Some(cpu_max(&mut cpu, limits.cpu_max_percent))),
    ];
    for (file, value) in settings {
        let Some(value) = value else { continue };
        match write_file(dir, file, value) {
            Ok(()) if file == c"memory.max" => memory_max = limits.memory_max,
            Ok(()) | Err(Errno::NOENT) => {}
            Err(errno) => log::Line::new()
                .push(b"cgroup: cannot set ")
                .push(file.to_bytes())
                .push(b": errno ")
                .num(u64::from(errno.raw_os_error().unsigned_abs()))
                .emit(),
        }
    }
    memory_max
}

/// `cpu.max`'s value, `"QUOTA PERIOD"`: `percent` of one CPU per [`CPU_PERIOD_US`], or
/// `"max PERIOD"` for 0.
pub fn cpu_max(buf: &mut [u8; 48], percent: u32) -> &[u8] {
    let mut quota = [0u8; 20];
    let quota: &[u8] = match percent {
        0 => b"max",
        // At most 4.3e12: no overflow. The kernel refuses a quota under 1 ms (1 %).
        _ => decimal(&mut quota, u64::from(percent) * (CPU_PERIOD_US / 100)),
    };
    let mut period = [0u8; 20];
    let period = decimal(&mut period, CPU_PERIOD_US);
    let mut len = 0;
    for part in [quota, b" ", period] {
        let end = len + part.len();
        if let Some(dest) = buf.get_mut(len..end) {
            dest.copy_from_slice(part);
            len = end;
        }
    }
    let buf: &[u8] = buf;
    buf.get(..len).unwrap_or(&[])
}

/// `value` in decimal, in `buf`.
pub fn decimal(buf: &mut [u8; 20], mut value: u64) -> &[u8] {
    let mut first = buf.len();
    for (at, digit) in buf.iter_mut().enumerate().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
        first = at;
        if value == 0 {
            break;
        }
    }
    let buf: &[u8] = buf;
    buf.get(first..).unwrap_or(&[])
}

/// The field `name` (with its colon, e.g. `MemTotal:`) of `/proc/meminfo`'s contents, in bytes.
pub fn meminfo_field(meminfo: &[u8], name: &[u8]) -> Option<u64> {
    let line = meminfo
        .split(|b| *b == b'\n')
        .find_map(|line| line.strip_prefix(name))?;
    let mut words = line
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty());
    let kib = parse_u64(words.next()?)?;
    match words.next() {
        Some(b"kB") => kib.checked_mul(1024),
        _ => None,
    }
}

/// The agent's cgroup v2 path (`0::/path` in `/proc/self/cgroup`), starting with `/`.
pub fn unified_path(proc_self_cgroup: &[u8]) -> Option<&[u8]> {
    proc_self_cgroup
        .split(|b| *b == b'\n')
        .find_map(|line| line.strip_prefix(b"0::"))
        .filter(|path| path.starts_with(b"/"))
}

fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |value, digit| {
        let digit = digit.checked_sub(b'0').filter(|d| *d <= 9)?;
        value.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

fn cwd() -> BorrowedFd<'static> {
    rustix::fs::CWD
}

/// Whether a cgroup2 hierarchy is mounted at `dir`.
fn is_cgroup2(dir: &CStr) -> bool {
    rustix::fs::statfs(dir)
        .is_ok_and(|fs| fs.f_type as u64 == u64::from(linux_raw_sys::general::CGROUP2_SUPER_MAGIC))
}

fn open_at(dir: BorrowedFd<'_>, path: &CStr, flags: OFlags) -> Result<OwnedFd, Errno> {
    rustix::fs::openat(dir, path, flags | OFlags::CLOEXEC, Mode::empty())
}

fn open_dir(dir: BorrowedFd<'_>, path: &CStr) -> Result<OwnedFd, Errno> {
    open_at(dir, path, OFlags::RDONLY | OFlags::DIRECTORY)
}

fn make_dir(parent: BorrowedFd<'_>, name: &CStr) -> Result<(), Errno> {
    match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o755)) {
        Ok(()) | Err(Errno::EXIST) => Ok(()),
        Err(errno) => Err(errno),
    }
}

/// Writes `value` to the cgroup file `name` in `dir`, in one `write` (as cgroup files want).
fn write_file(dir: BorrowedFd<'_>, name: &CStr, value: &[u8]) -> Result<(), Errno> {
    let file = open_at(dir, name, OFlags::WRONLY)?;
    loop {
        match rustix::io::write(&file, value) {
            Ok(_) => return Ok(()),
            Err(Errno::INTR) => {}
            Err(errno) => return Err(errno),
        }
    }
}

/// Reads the file at `path` (relative to `dir`) into `buf`, as much as fits.
fn read_file_at<'b>(
    dir: BorrowedFd<'_>,
    path: &CStr,
    buf: &'b mut [u8],
) -> Result<&'b [u8], Errno> {
    crate::file::read_at(dir, path, buf).map(|read| read.text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total(meminfo: &[u8]) -> Option<u64> {
        meminfo_field(meminfo, b"MemTotal:")
    }

    #[test]
    fn meminfo_fields() {
        let meminfo = b"MemTotal:         254564 kB\nMemFree:          220000 kB\n";
        assert_eq!(total(meminfo), Some(254_564 * 1024));
        let later = b"MemFree:  1 kB\nMemTotal:\t16 kB\n";
        assert_eq!(total(later), Some(16 * 1024));
        assert_eq!(total(b""), None);
        assert_eq!(total(b"MemTotal:\n"), None);
        assert_eq!(total(b"MemTotal: 12 MB\n"), None, "only kB is known");
        assert_eq!(total(b"MemTotal: 12\n"), None);
        assert_eq!(total(b"MemTotal: -1 kB\n"), None);
        assert_eq!(total(b"MemTotal: 99999999999999999999 kB\n"), None);
        assert_eq!(
            total(b"MemTotal: 18014398509481984 kB\n"),
            None,
            "overflows in bytes"
        );
        // A guest's, cut where the agent's 256-byte buffer cuts it.
        let guest = b"MemTotal:         226508 kB\nMemFree:          180100 kB\n\
            MemAvailable:     171832 kB\nBuffers:               0 kB\nCached:    ";
        assert_eq!(
            MemInfo::parse(guest),
            MemInfo {
                total: Some(226_508 * 1024),
                available: Some(171_832 * 1024),
            }
        );
        assert_eq!(
            MemInfo::parse(b"MemTotal: 8 kB\nMemAvail"),
            MemInfo {
                total: Some(8 * 1024),
                available: None,
            },
            "a field cut short is not there"
        );
        let real = std::fs::read("/proc/meminfo").unwrap();
        let real = MemInfo::parse(&real);
        assert!(real.total.is_some_and(|total| total > 0));
        assert!(real.available.is_some_and(|available| available > 0));
    }

    #[test]
    fn the_agent_keeps_a_twentieth_and_at_least_16_mib() {
        assert_eq!(agent_reserve(0), 16 * MIB);
        assert_eq!(agent_reserve(256 * MIB), 16 * MIB);
        assert_eq!(agent_reserve(320 * MIB), 16 * MIB);
        assert_eq!(agent_reserve(321 * MIB), 321 * MIB / 20);
        assert_eq!(agent_reserve(1000 * MIB), 50 * MIB);
        assert_eq!(agent_reserve(u64::MAX), u64::MAX / 20);
    }

    const MIB: u64 = 1 << 20;

    fn mem(total: u64, available: u64) -> MemInfo {
        MemInfo {
            total: Some(total),
            available: Some(available),
        }
    }

    #[test]
    fn the_default_memory_max_is_what_is_available_less_the_reserve() {
        // A 256 MiB guest: the kernel and the initramfs hold a part MemTotal does not show.
        assert_eq!(
            default_memory_max(mem(226 * MIB, 170 * MIB)),
            Some(154 * MIB)
        );
        // Never above MemTotal less the reserve, whatever MemAvailable says.
        assert_eq!(
            default_memory_max(mem(226 * MIB, 226 * MIB)),
            Some(210 * MIB)
        );
        assert_eq!(
            default_memory_max(mem(226 * MIB, 300 * MIB)),
            Some(210 * MIB)
        );
        // A big machine keeps a twentieth.
        assert_eq!(
            default_memory_max(mem(1000 * MIB, 900 * MIB)),
            Some(850 * MIB)
        );
        // Just above the reserve: one byte; at it or below: unlimited rather than 0 (which
        // kills everything).
        assert_eq!(default_memory_max(mem(226 * MIB, 16 * MIB + 1)), Some(1));
        assert_eq!(default_memory_max(mem(226 * MIB, 16 * MIB)), None);
        assert_eq!(default_memory_max(mem(226 * MIB, 0)), None);
        assert_eq!(default_memory_max(mem(16 * MIB, 16 * MIB)), None);
        assert_eq!(default_memory_max(mem(0, 0)), None);
        // Without MemAvailable: MemTotal less the reserve; without MemTotal: nothing known.
        let old_kernel = MemInfo {
            total: Some(226 * MIB),
            available: None,
        };
        assert_eq!(default_memory_max(old_kernel), Some(210 * MIB));
        let no_total = MemInfo {
            total: None,
            available: Some(200 * MIB),
        };
        assert_eq!(default_memory_max(no_total), None);
        assert_eq!(default_memory_max(MemInfo::default()), None);
        // No overflow at the top.
        assert_eq!(
            default_memory_max(mem(u64::MAX, u64::MAX)),
            Some(u64::MAX - u64::MAX / 20)
        );
    }

    #[test]
    fn an_explicit_policy_value_is_kept_as_is() {
        let mut policy = crate::policy::Policy::defaults();
        let limits = Limits::from_policy(&policy, mem(226 * MIB, 170 * MIB));
        assert_eq!(limits.memory_max, Some(154 * MIB));
        assert_eq!(limits.pids_max, 4096);
        assert_eq!(limits.cpu_max_percent, 0);
        assert!(limits.exec_cgroups);
        policy.exec_cgroups = false;
        assert!(!Limits::from_policy(&policy, MemInfo::default()).exec_cgroups);
        policy.exec_cgroups = true;
        assert_eq!(
            Limits::from_policy(&policy, mem(226 * MIB, 10 * MIB)).memory_max,
            None
        );
        assert_eq!(
            Limits::from_policy(&policy, MemInfo::default()).memory_max,
            None
        );
        // Even beyond what the machine has: the operator asked for it.
        policy.memory_max = 100 * MIB;
        assert_eq!(
            Limits::from_policy(&policy, mem(226 * MIB, 170 * MIB)).memory_max,
            Some(100 * MIB)
        );
        policy.memory_max = 300 * MIB;
        assert_eq!(
            Limits::from_policy(&policy, mem(226 * MIB, 10 * MIB)).memory_max,
            Some(300 * MIB)
        );
        assert_eq!(
            Limits::from_policy(&policy, MemInfo::default()).memory_max,
            Some(300 * MIB)
        );
    }

    #[test]
    fn cpu_max_values() {
        let mut buf = [0u8; 48];
        assert_eq!(cpu_max(&mut buf, 0), b"max 100000");
        assert_eq!(cpu_max(&mut buf, 1), b"1000 100000");
        assert_eq!(cpu_max(&mut buf, 50), b"50000 100000");
        assert_eq!(cpu_max(&mut buf, 100), b"100000 100000");
        assert_eq!(cpu_max(&mut buf, 250), b"250000 100000");
        assert_eq!(cpu_max(&mut buf, u32::MAX), b"4294967295000 100000");
    }

    #[test]
    fn decimals() {
        let mut buf = [0u8; 20];
        assert_eq!(decimal(&mut buf, 0), b"0");
        assert_eq!(decimal(&mut buf, 4096), b"4096");
        assert_eq!(decimal(&mut buf, u64::MAX), b"18446744073709551615");
    }

    #[test]
    fn the_unified_hierarchy_line_of_proc_self_cgroup() {
        assert_eq!(
            unified_path(b"0::/system.slice/ferry.service\n"),
            Some(b"/system.slice/ferry.service".as_slice())
        );
        let hybrid = b"9:name=systemd:/\n4:memory:/x\n0::/\n";
        assert_eq!(unified_path(hybrid), Some(b"/".as_slice()));
        assert_eq!(
            unified_path(b"4:memory:/x\n1:cpu:/\n"),
            None,
            "cgroup v1 only"
        );
        assert_eq!(unified_path(b"0::relative\n"), None);
        assert_eq!(unified_path(b"0::"), None);
        assert_eq!(unified_path(b""), None);
        let real = std::fs::read("/proc/self/cgroup").unwrap();
        if real.starts_with(b"0::") || real.windows(4).any(|w| w == b"\n0::") {
            assert!(unified_path(&real).is_some());
        }
    }

    /// A cgroup2 directory this test may create and remove, if the machine has a writable one.
    fn scratch_cgroup(name: &str) -> Option<std::path::PathBuf> {
        let mount = [MOUNT_POINT, HYBRID_MOUNT_POINT]
            .into_iter()
            .find(|dir| is_cgroup2(dir))?;
        let dir = std::path::Path::new(mount.to_str().ok()?)
            .join(format!("ferry-test-{name}-{}", std::process::id()));
        std::fs::create_dir(&dir).ok()?;
        Some(dir)
    }

    fn cgroup_of(pid: u32) -> String {
        let text = std::fs::read(format!("/proc/{pid}/cgroup")).unwrap();
        String::from_utf8_lossy(unified_path(&text).unwrap()).into_owned()
    }

    /// The service-mode layout in a scratch cgroup of our own, with a `sleep` standing in for
    /// the agent (the test harness itself stays where it is), then `cgroup.kill`.
    #[test]
    fn a_delegated_cgroup_gets_an_agent_leaf_and_a_commands_leaf() {
        use std::os::unix::process::CommandExt;
        let Some(scratch) = scratch_cgroup("delegated") else {
            eprintln!("skipped: no writable cgroup2 hierarchy here");
            return;
        };
        let mut agent = std::process::Command::new("sleep")
            .arg("60")
            .process_group(0)
            .spawn()
            .unwrap();
        let mut command = std::process::Command::new("sleep")
            .arg("60")
            .process_group(0)
            .spawn()
            .unwrap();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            std::fs::write(scratch.join("cgroup.procs"), agent.id().to_string()).unwrap();
            let path = std::ffi::CString::new(scratch.to_str().unwrap()).unwrap();
            let own = open_dir(cwd(), &path).unwrap();
            let limits = Limits {
                memory_max: Some(64 << 20),
                pids_max: 7,
                cpu_max_percent: 50,
                exec_cgroups: true,
            };
            let pid = agent.id().to_string();
            let commands = setup_in(own.as_fd(), &limits, pid.as_bytes()).unwrap();
            let relative = cgroup_of(agent.id());
            assert!(relative.ends_with("/agent"), "{relative}");
            assert!(scratch.join("commands").is_dir());
            // A child joins by writing to the descriptor kept open (here by pid; the child
            // writes "0").
            rustix::io::write(&commands.procs, command.id().to_string().as_bytes()).unwrap();
            assert!(cgroup_of(command.id()).ends_with("/commands"));
            // Controllers this hierarchy lacks leave their files out: nothing else failed.
            if let Ok(pids) = std::fs::read_to_string(scratch.join("commands/pids.max")) {
                assert_eq!(pids.trim(), "7");
            }
            // What was written is what is reported.
            match std::fs::read_to_string(scratch.join("commands/memory.max")) {
                Ok(memory) => {
                    assert_eq!(memory.trim(), (64u64 << 20).to_string());
                    assert_eq!(commands.memory_max, Some(64 << 20));
                }
                Err(_) => assert_eq!(commands.memory_max, None),
            }
            if scratch.join("commands/cgroup.kill").exists() {
                assert_eq!(kill_all_in(commands.dir.as_fd()), Ok(1));
                let status = command.wait().unwrap();
                use std::os::unix::process::ExitStatusExt;
                assert_eq!(status.signal(), Some(9));
            }
        }));
        let _ = command.kill();
        let _ = command.wait();
        let _ = agent.kill();
        let _ = agent.wait();
        for leaf in ["commands", "agent", ""] {
            let dir = scratch.join(leaf);
            // A cgroup whose last process just died may still be busy for a moment.
            for _ in 0..100 {
                if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        assert!(!scratch.exists(), "scratch cgroup left behind");
        result.unwrap();
    }

    #[test]
    fn without_a_cgroup_kill_all_is_not_supported() {
        // Unit tests never run `setup`.
        assert_eq!(kill_all_commands(), Err(Errno::NOSYS));
        assert_eq!(bounds(), Bounds::RlimitsOnly);
        assert!(commands_procs().is_none());
        assert_eq!(memory_max(), None);
        make_exec();
        assert_eq!(kill_exec(own_pid()), Err(Errno::NOSYS));
        assert_eq!(remove_exec(own_pid()), Err(Errno::NOSYS));
        remove_own_exec();
    }

    /// Without an exec cgroup the tree kill falls back to the command's process group, and
    /// says so.
    #[test]
    fn without_a_cgroup_the_tree_kill_is_the_process_group() {
        use std::os::unix::process::{CommandExt, ExitStatusExt};
        let mut leader = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & exec sleep 30"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = rustix::process::Pid::from_raw(leader.id() as i32).unwrap();
        assert_eq!(kill_tree(pid), TreeKill::ProcessGroup);
        assert_eq!(leader.wait().unwrap().signal(), Some(9));
        // The background sleep (same group) is gone too: the group has no member left.
        let started = std::time::Instant::now();
        while rustix::process::test_kill_process_group(pid).is_ok() {
            assert!(started.elapsed() < std::time::Duration::from_secs(5));
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn flat_keyed_counts() {
        let events = b"low 0\nhigh 0\nmax 12\noom 2\noom_kill 3\noom_group_kill 0\n";
        assert_eq!(event_count(events, b"oom_kill"), Some(3));
        assert_eq!(
            event_count(events, b"oom"),
            Some(2),
            "a prefix of another key is not it"
        );
        assert_eq!(event_count(events, b"max"), Some(12));
        assert_eq!(event_count(events, b"missing"), None);
        assert_eq!(
            event_count(b"populated 1\nfrozen 0\n", b"populated"),
            Some(1)
        );
        assert_eq!(event_count(b"oom_kill x\n", b"oom_kill"), None);
        assert_eq!(event_count(b"oom_kill\n", b"oom_kill"), None);
        assert_eq!(event_count(b"", b"oom_kill"), None);
        assert_eq!(
            event_count(b"oom_kill 99999999999999999999999\n", b"oom_kill"),
            None
        );
    }

    #[test]
    fn a_kept_descriptor_reads_the_file_anew() {
        let path = std::env::temp_dir().join(format!("ferry-reread-{}", std::process::id()));
        std::fs::write(&path, b"oom_kill 1\n").unwrap();
        let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        let file = open_at(cwd(), &c_path, OFlags::RDONLY).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(reread(file.as_fd(), &mut buf).unwrap(), b"oom_kill 1\n");
        std::fs::write(&path, b"oom_kill 2\n").unwrap();
        assert_eq!(reread(file.as_fd(), &mut buf).unwrap(), b"oom_kill 2\n");
        std::fs::remove_file(&path).unwrap();
    }

    /// SIGTERM to each process of a scratch cgroup, setsid escapees included.
    #[test]
    fn every_process_of_a_cgroup_gets_the_signal() {
        use std::os::unix::process::{CommandExt, ExitStatusExt};
        let Some(scratch) = scratch_cgroup("term") else {
            eprintln!("skipped: no writable cgroup2 hierarchy here");
            return;
        };
        let spawn = |group: bool| {
            let mut command = std::process::Command::new("sleep");
            command.arg("30");
            if group {
                command.process_group(0);
            }
            command.spawn().unwrap()
        };
        let mut a = spawn(true);
        let mut b = spawn(true);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for child in [&a, &b] {
                std::fs::write(scratch.join("cgroup.procs"), child.id().to_string()).unwrap();
            }
            let path = std::ffi::CString::new(scratch.to_str().unwrap()).unwrap();
            let dir = open_dir(cwd(), &path).unwrap();
            assert_eq!(signal_each_in(dir.as_fd(), Signal::TERM), Ok(()));
            assert_eq!(a.wait().unwrap().signal(), Some(15));
            assert_eq!(b.wait().unwrap().signal(), Some(15));
            // Empty now: nothing to signal, no error.
            assert_eq!(signal_each_in(dir.as_fd(), Signal::TERM), Ok(()));
        }));
        let _ = a.kill();
        let _ = a.wait();
        let _ = b.kill();
        let _ = b.wait();
        for _ in 0..100 {
            if std::fs::remove_dir(&scratch).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!scratch.exists(), "scratch cgroup left behind");
        result.unwrap();
    }

    /// Without an exec cgroup: SIGTERM to the group, no memory facts, and a tree kill on exit
    /// only when something is left.
    #[test]
    fn without_a_cgroup_the_facts_are_unknown_and_the_group_is_the_tree() {
        use std::os::unix::process::{CommandExt, ExitStatusExt};
        assert_eq!(exec_memory_facts(), MemoryFacts::default());
        let mut leader = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & exec sleep 30"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = Pid::from_raw(leader.id() as i32).unwrap();
        assert_eq!(terminate_tree(pid), TreeKill::ProcessGroup);
        assert_eq!(leader.wait().unwrap().signal(), Some(15));
        let started = std::time::Instant::now();
        while rustix::process::test_kill_process_group(pid).is_ok() {
            assert!(started.elapsed() < std::time::Duration::from_secs(5));
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(kill_tree_on_exit(pid), None, "nothing left");
        // The command ended, a background process of its group did not.
        let mut leader = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & exit 0"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = Pid::from_raw(leader.id() as i32).unwrap();
        assert_eq!(leader.wait().unwrap().code(), Some(0));
        assert_eq!(kill_tree_on_exit(pid), Some(TreeKill::ProcessGroup));
        let started = std::time::Instant::now();
        while rustix::process::test_kill_process_group(pid).is_ok() {
            assert!(started.elapsed() < std::time::Duration::from_secs(5));
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn exec_cgroup_names() {
        let mut buf = [0u8; 48];
        assert_eq!(exec_path(&mut buf, 1234, b""), Some(c"c1234"));
        assert_eq!(
            exec_path(&mut buf, u32::MAX, b"/cgroup.procs"),
            Some(c"c4294967295/cgroup.procs")
        );
    }
}
