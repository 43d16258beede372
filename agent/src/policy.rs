//! The agent's policy: who may connect, as whom commands run, and every hard limit. One
//! documented source (docs/policy.md): `/etc/ferry/policy` (`key = value` lines), then
//! `ferry.KEY=VALUE` on the kernel command line (PID 1), then the agent's own flags; a later
//! source wins. An unknown key or a bad value stops the agent at start.

/// The longest user specification (`NAME[:GROUP]` or `UID[:GID]`).
pub const MAX_USER_SPEC: usize = 64;
/// The longest `allow_users` list.
pub const MAX_ALLOW_USERS: usize = 256;
/// The most vsock CIDs `allow_cid` may name.
pub const MAX_ALLOW_CIDS: usize = 16;
/// The longest secret file path.
pub const MAX_POLICY_PATH: usize = 255;

use crate::sys::SetOnce;

/// A user specification as given: `NAME[:GROUP]` or `UID[:GID]`, resolved when a command
/// starts (the guest's /etc/passwd may change).
pub type UserSpec = heapless::Vec<u8, MAX_USER_SPEC>;

/// A per-exec resource limit: `None` leaves the agent's own (inherited) limit in place.
pub type Rlimit = Option<u64>;

/// Everything the policy decides. Plain data, fixed size: the listener holds one, every
/// connection process inherits it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    // --- Who may connect.
    /// `secret_file`: the per-VM secret; `None` only together with `insecure`.
    pub secret_file: Option<heapless::Vec<u8, MAX_POLICY_PATH>>,
    /// `insecure`: serve without authentication (logged, and reported in every hello).
    pub insecure: bool,
    /// `allow_cid`: vsock CIDs allowed besides the host (2). Never the guest's own or 1.
    pub allow_cids: heapless::Vec<u32, MAX_ALLOW_CIDS>,
    /// `socket_mode`: the Unix socket's mode (default 0600).
    pub socket_mode: u32,
    /// `socket_group`: the Unix socket's group (default: the agent's).
    pub socket_group: Option<u32>,

    // --- As whom commands run.
    /// `user`: the default user of every command (default `65534:65534`). When the agent is
    /// not root, commands run as the agent's user and no other may be asked for.
    pub user: UserSpec,
    /// `allow_users`: users a request may ask for besides the default, comma-separated names
    /// or numbers, `*` for any (root included only by name `root`, uid `0` or `*`).
    pub allow_users: heapless::Vec<u8, MAX_ALLOW_USERS>,
    /// `allow_setuid`: let commands gain privileges through setuid binaries (no
    /// `PR_SET_NO_NEW_PRIVS`). Default false.
    pub allow_setuid: bool,
    /// `run_as_agent_user` (inverted): when true (the default), a request that names no user
    /// runs as `user`; `run_as_agent_user = true` (or the `--run-as-agent-user` flag) makes it
    /// run as the agent's own user instead, unchanged (for tests and per-user service agents).
    pub unprivileged_default: bool,

    // --- Limits on connections.
    /// `max_connections`: connections served at once; beyond it, `Busy` at once (default 64).
    pub max_connections: u32,
    /// `handshake_timeout`: milliseconds a client has for its hello, proof and request
    /// (default 5000).
    pub handshake_timeout_ms: u32,
    /// `idle_timeout`: milliseconds a connection may idle after an operation before the agent
    /// closes it (protocol 5 keep-alive; 0: one operation per connection; default 30000).
    pub idle_timeout_ms: u32,

    // --- Limits on each request (0: none).
    /// `max_runtime`: seconds a command may run before its group is killed (written as a
    /// duration in whole seconds: `90s`, `2m`, `1h`, or `0`).
    pub max_runtime_s: u64,
    /// `max_output`: stdout + stderr bytes a command may produce before it is killed.
    pub max_output: u64,
    /// `max_file_size`: the largest file a command (RLIMIT_FSIZE) or a transfer may write.
    pub max_file_size: u64,

    // --- Per-exec rlimits (`rlimit_nofile`, …): `Some(RLIM_INFINITY)` (`u64::MAX`) for
    // `unlimited`.
    pub rlimit_nofile: Rlimit,
    pub rlimit_nproc: Rlimit,
    pub rlimit_cpu: Rlimit,
    pub rlimit_as: Rlimit,
    pub rlimit_core: Rlimit,

    // --- The commands' cgroup (cgroup v2), shared by every exec; the agent stays outside it.
    /// `memory_max`: bytes, 0 = the default (the guest's memory less a reserve for the agent).
    pub memory_max: u64,
    /// `pids_max`: processes and threads all commands together may have (default 4096).
    pub pids_max: u32,
    /// `cpu_max`: percent of one CPU (`cpu.max`), 0 = no limit.
    pub cpu_max_percent: u32,
    /// `exec_cgroups`: each exec in a cgroup of its own under the commands' (default true): a
    /// tree kill nothing escapes, its own CPU share, its OOM kills and peak memory in its
    /// record. False: commands join the commands' cgroup itself (still bounded by it), a tree
    /// kill is the process group's, no memory facts (what the exec costs without one).
    pub exec_cgroups: bool,

    // --- The guest itself.
    /// `allow_shutdown`: clients may power the guest off or reboot it, set its clock and feed
    /// its entropy pool. `None`: the default, allowed unless the agent is `insecure`.
    pub allow_shutdown: Option<bool>,
    /// `power_command`: in service mode, the program a shutdown runs as `PROGRAM poweroff` or
    /// `PROGRAM reboot` (nothing else is tried when it fails); `None`: `poweroff` or `reboot`
    /// from the system's directories, else a signal to PID 1 (systemd's convention).
    pub power_command: Option<heapless::Vec<u8, MAX_POLICY_PATH>>,

    // --- Detached jobs (`ferry exec --detach`).
    /// `max_jobs`: jobs the registry keeps, running or finished (default 64, at most
    /// [`MAX_JOBS`]); a new job evicts the oldest finished one, and is refused `Busy` when all
    /// run.
    pub max_jobs: u32,
    /// `job_spool_head`: the first bytes of each stream a job keeps (default 64 KiB).
    pub job_spool_head: u64,
    /// `job_spool_ring`: the most recent bytes of each stream a job keeps (default 256 KiB).
    pub job_spool_ring: u64,
    /// `jobs_any_user`: any user's request may see, attach, wait, kill and remove every job
    /// (default false: only its own, unless it resolves to root).
    pub jobs_any_user: bool,
}

impl Policy {
    /// ferry's defaults: authenticated, unprivileged, bounded.
    // Out of line: `load` and `current` both build it.
    #[inline(never)]
    pub const fn defaults() -> Policy {
        let user = UserSpec::from_array(*b"65534:65534");
        Policy {
            secret_file: None,
            insecure: false,
            allow_cids: heapless::Vec::new(),
            socket_mode: 0o600,
            socket_group: None,
            user,
            allow_users: heapless::Vec::new(),
            allow_setuid: false,
            unprivileged_default: true,
            max_connections: 64,
            handshake_timeout_ms: 5_000,
            idle_timeout_ms: ferry_wire::limits::DEFAULT_IDLE_MS,
            max_runtime_s: 0,
            max_output: 0,
            max_file_size: 0,
            rlimit_nofile: None,
            rlimit_nproc: None,
            rlimit_cpu: None,
            rlimit_as: None,
            rlimit_core: None,
            memory_max: 0,
            pids_max: 4096,
            cpu_max_percent: 0,
            exec_cgroups: true,
            allow_shutdown: None,
            power_command: None,
            max_jobs: 64,
            job_spool_head: 64 * 1024,
            job_spool_ring: 256 * 1024,
            jobs_any_user: false,
        }
    }
}

/// The policy in force, set once by `run()` before the listener forks (every process after that
/// holds a copy). Read it through [`current`].
static INSTALLED: SetOnce<Policy> = SetOnce::new();

/// Makes `policy` the one in force for the rest of the process and its forks; the first call
/// wins (or a read before it: see [`current`]). Returns the policy in force.
pub fn install(policy: Policy) -> &'static Policy {
    let _ = INSTALLED.set(policy);
    current()
}

/// The policy in force: the one [`install`]ed, or the defaults (unit tests), which a read before
/// any [`install`] installs. `run()` installs the policy before anything reads it, so the agent
/// never takes that path; it is code rather than an 824-byte constant in the binary.
pub fn current() -> &'static Policy {
    loop {
        if let Some(policy) = INSTALLED.get() {
            return policy;
        }
        // Another thread may be installing one: then this fails and the next look finds it.
        let _ = INSTALLED.set(Policy::defaults());
    }
}

/// The longest line of a policy file, and the longest value anywhere.
pub const MAX_LINE: usize = 512;
/// The most connections `max_connections` may allow.
pub const MAX_CONNECTIONS: u32 = 1024;
/// The most jobs `max_jobs` may allow: the registry's capacity.
pub const MAX_JOBS: u32 = ferry_wire::limits::MAX_JOBS as u32;
/// The largest `job_spool_head` or `job_spool_ring`: 64 MiB per stream.
pub const MAX_JOB_SPOOL: u64 = 64 << 20;
/// The largest `cpu_max`: 1024 CPUs, fully.
pub const MAX_CPU_PERCENT: u32 = 100 * 1024;
/// What an `rlimit_*` of `unlimited` is stored as (the kernel's `RLIM_INFINITY`).
pub const RLIM_INFINITY: u64 = u64::MAX;

/// Why a policy setting was refused; the caller names the key (or line) it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyError {
    /// No such key.
    UnknownKey,
    /// The value does not parse for its key.
    BadValue,
    /// The value parses but is outside the key's range.
    OutOfRange,
    /// A value, list, line or file longer than the agent's bound.
    TooLong,
    /// A line or parameter without `=`.
    MissingEquals,
    /// Both `secret_file` and `insecure`.
    Conflict,
    /// Neither `secret_file` nor `insecure`.
    NoAuthentication,
}

impl PolicyError {
    /// For people, in one line.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyError::UnknownKey => "unknown key",
            PolicyError::BadValue => "bad value",
            PolicyError::OutOfRange => "value out of range",
            PolicyError::TooLong => "too long",
            PolicyError::MissingEquals => "expected key = value",
            PolicyError::Conflict => "secret_file and insecure exclude each other",
            PolicyError::NoAuthentication => "neither secret_file nor insecure is set",
        }
    }
}

impl core::fmt::Display for PolicyError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A policy key, as [`KEYS`] names it.
#[derive(Clone, Copy)]
enum Key {
    SecretFile,
    Insecure,
    AllowCid,
    SocketMode,
    SocketGroup,
    User,
    AllowUsers,
    AllowSetuid,
    RunAsAgentUser,
    MaxConnections,
    HandshakeTimeout,
    IdleTimeout,
    MaxRuntime,
    MaxOutput,
    MaxFileSize,
    MemoryMax,
    PidsMax,
    CpuMax,
    ExecCgroups,
    RlimitNofile,
    RlimitNproc,
    RlimitCpu,
    RlimitAs,
    RlimitCore,
    AllowShutdown,
    PowerCommand,
    MaxJobs,
    JobSpoolHead,
    JobSpoolRing,
    JobsAnyUser,
}

/// Every key of docs/policy.md. [`Policy::apply`] looks keys up in this table: a `match` on the
/// strings compiles to byte-by-byte comparisons, about 2 KB of code.
const KEYS: [(&[u8], Key); 30] = [
    (b"secret_file", Key::SecretFile),
    (b"insecure", Key::Insecure),
    (b"allow_cid", Key::AllowCid),
    (b"socket_mode", Key::SocketMode),
    (b"socket_group", Key::SocketGroup),
    (b"user", Key::User),
    (b"allow_users", Key::AllowUsers),
    (b"allow_setuid", Key::AllowSetuid),
    (b"run_as_agent_user", Key::RunAsAgentUser),
    (b"max_connections", Key::MaxConnections),
    (b"handshake_timeout", Key::HandshakeTimeout),
    (b"idle_timeout", Key::IdleTimeout),
    (b"max_runtime", Key::MaxRuntime),
    (b"max_output", Key::MaxOutput),
    (b"max_file_size", Key::MaxFileSize),
    (b"memory_max", Key::MemoryMax),
    (b"pids_max", Key::PidsMax),
    (b"cpu_max", Key::CpuMax),
    (b"exec_cgroups", Key::ExecCgroups),
    (b"rlimit_nofile", Key::RlimitNofile),
    (b"rlimit_nproc", Key::RlimitNproc),
    (b"rlimit_cpu", Key::RlimitCpu),
    (b"rlimit_as", Key::RlimitAs),
    (b"rlimit_core", Key::RlimitCore),
    (b"allow_shutdown", Key::AllowShutdown),
    (b"power_command", Key::PowerCommand),
    (b"max_jobs", Key::MaxJobs),
    (b"job_spool_head", Key::JobSpoolHead),
    (b"job_spool_ring", Key::JobSpoolRing),
    (b"jobs_any_user", Key::JobsAnyUser),
];

/// Kernel command-line parameters under `ferry.` that are not policy keys (see `config`).
const BOOT_PARAMS: [&[u8]; 4] = [b"listen", b"ready", b"modules", b"hostname"];

impl Policy {
    /// Sets the policy key `key` from its textual `value` (already trimmed).
    pub fn apply(&mut self, key: &[u8], value: &[u8]) -> Result<(), PolicyError> {
        if value.len() > MAX_LINE {
            return Err(PolicyError::TooLong);
        }
        let (_, which) = KEYS
            .iter()
            .find(|(name, _)| *name == key)
            .ok_or(PolicyError::UnknownKey)?;
        match which {
            Key::SecretFile => self.secret_file = Some(parse_path(value)?),
            Key::Insecure => self.insecure = parse_bool(value)?,
            Key::AllowCid => self.allow_cids = parse_cids(value)?,
            Key::SocketMode => self.socket_mode = parse_mode(value)?,
            Key::SocketGroup => self.socket_group = Some(number(value)?),
            Key::User => self.user = parse_user_spec(value)?,
            Key::AllowUsers => self.allow_users = parse_user_list(value)?,
            Key::AllowSetuid => self.allow_setuid = parse_bool(value)?,
            Key::RunAsAgentUser => self.unprivileged_default = !parse_bool(value)?,
            Key::MaxConnections => {
                self.max_connections = in_range(number(value)?, 1, MAX_CONNECTIONS)?
            }
            Key::HandshakeTimeout => {
                let ms = parse_duration_ms(value)?;
                let ms = u32::try_from(ms).map_err(|_| PolicyError::OutOfRange)?;
                self.handshake_timeout_ms = in_range(ms, 1, u32::MAX)?;
            }
            Key::IdleTimeout => {
                let ms = parse_duration_ms(value)?;
                self.idle_timeout_ms = u32::try_from(ms).map_err(|_| PolicyError::OutOfRange)?;
            }
            Key::MaxRuntime => self.max_runtime_s = parse_runtime_s(value)?,
            Key::MaxOutput => self.max_output = parse_bytes(value)?,
            Key::MaxFileSize => self.max_file_size = parse_bytes(value)?,
            Key::MemoryMax => self.memory_max = parse_bytes(value)?,
            Key::PidsMax => self.pids_max = number(value)?,
            Key::CpuMax => self.cpu_max_percent = in_range(number(value)?, 0, MAX_CPU_PERCENT)?,
            Key::ExecCgroups => self.exec_cgroups = parse_bool(value)?,
            Key::RlimitNofile => self.rlimit_nofile = Some(parse_rlimit(value, false)?),
            Key::RlimitNproc => self.rlimit_nproc = Some(parse_rlimit(value, false)?),
            Key::RlimitCpu => self.rlimit_cpu = Some(parse_rlimit(value, false)?),
            Key::RlimitAs => self.rlimit_as = Some(parse_rlimit(value, true)?),
            Key::RlimitCore => self.rlimit_core = Some(parse_rlimit(value, true)?),
            Key::AllowShutdown => self.allow_shutdown = Some(parse_bool(value)?),
            Key::PowerCommand => self.power_command = Some(parse_path(value)?),
            Key::MaxJobs => self.max_jobs = in_range(number(value)?, 1, MAX_JOBS)?,
            Key::JobSpoolHead => {
                self.job_spool_head = in_range(parse_bytes(value)?, 0, MAX_JOB_SPOOL)?
            }
            Key::JobSpoolRing => {
                self.job_spool_ring = in_range(parse_bytes(value)?, 1, MAX_JOB_SPOOL)?
            }
            Key::JobsAnyUser => self.jobs_any_user = parse_bool(value)?,
        }
        Ok(())
    }

    /// Applies a policy file's text: `key = value` lines; blank lines and lines starting with
    /// `#` are skipped; whitespace around keys and values and a CR before the LF are ignored.
    /// The error carries the 1-based line number. Settings before a bad line stay applied (the
    /// agent refuses to start anyway).
    pub fn parse_file(&mut self, text: &[u8]) -> Result<(), (u32, PolicyError)> {
        let mut number = 0u32;
        for line in text.split(|b| *b == b'\n') {
            number = number.saturating_add(1);
            if line.len() > MAX_LINE {
                return Err((number, PolicyError::TooLong));
            }
            let line = line.trim_ascii();
            if line.is_empty() || line.starts_with(b"#") {
                continue;
            }
            let (key, value) = split_setting(line).ok_or((number, PolicyError::MissingEquals))?;
            self.apply(key.trim_ascii(), value.trim_ascii())
                .map_err(|error| (number, error))?;
        }
        Ok(())
    }

    /// Applies every `ferry.KEY=VALUE` of a kernel command line whose key is a policy key;
    /// `ferry.listen=`, `ferry.ready=` and `ferry.modules=` are left to [`crate::config`]. Any
    /// other `ferry.` parameter is an error, which names it (`ferry.` stripped).
    pub fn apply_kernel_cmdline<'c>(
        &mut self,
        cmdline: &'c [u8],
    ) -> Result<(), (&'c [u8], PolicyError)> {
        for param in cmdline.split(|b| b.is_ascii_whitespace()) {
            let Some(setting) = param.strip_prefix(b"ferry.") else {
                continue;
            };
            let Some((key, value)) = split_setting(setting) else {
                return Err((setting, PolicyError::MissingEquals));
            };
            if BOOT_PARAMS.contains(&key) {
                continue;
            }
            self.apply(key, value).map_err(|error| (key, error))?;
        }
        Ok(())
    }

    /// Checks what no single key can: enforced at start.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.secret_file.is_some() && self.insecure {
            return Err(PolicyError::Conflict);
        }
        Ok(())
    }

    /// Checks that exactly one of `secret_file` and `insecure` is set. Not enforced at start
    /// until the protocol authenticates clients.
    // TODO(auth): called at start once clients authenticate.
    #[allow(dead_code)]
    pub fn check_auth(&self) -> Result<(), PolicyError> {
        self.validate()?;
        if self.secret_file.is_none() && !self.insecure {
            return Err(PolicyError::NoAuthentication);
        }
        Ok(())
    }

    /// Whether clients may shut the guest down, set its clock and reseed it: `allow_shutdown`,
    /// by default unless the agent serves without authentication.
    pub fn allows_shutdown(&self) -> bool {
        self.allow_shutdown.unwrap_or(!self.insecure)
    }

    /// Whether `allow_users` names `*`.
    pub fn allows_any_user(&self) -> bool {
        self.allowed_users().any(|entry| entry == b"*")
    }

    /// The entries of `allow_users`.
    pub fn allowed_users(&self) -> impl Iterator<Item = &[u8]> {
        self.allow_users
            .split(|b| *b == b',')
            .filter(|entry| !entry.is_empty())
    }
}

/// The policy file read when `--policy` names none; its absence is fine.
pub const DEFAULT_POLICY_FILE: &[u8] = b"/etc/ferry/policy";
/// The largest policy file.
pub const MAX_POLICY_FILE: usize = 8 * 1024;

/// The policy from its three sources, a later one winning: the policy file (`file`, or
/// [`DEFAULT_POLICY_FILE`] if it exists), the kernel command line's `ferry.KEY=VALUE` (when
/// `kernel_cmdline`, i.e. as PID 1), then `flags` (key, value) in order; checked with
/// [`Policy::validate`]. `None` after logging what is wrong, in one line naming the source
/// and the key or line.
// Kept out of line: its large stack frame (the file, the command line) must not be probed
// into the caller's.
#[inline(never)]
pub fn load(file: Option<&[u8]>, kernel_cmdline: bool, flags: &[(&[u8], &[u8])]) -> Option<Policy> {
    use crate::log::Line;
    let mut policy = Policy::defaults();
    let path = file.unwrap_or(DEFAULT_POLICY_FILE);
    let mut path_buf = [0u8; MAX_POLICY_PATH + 1];
    let Some(path_c) = crate::cstr::join(&mut path_buf, &[path]) else {
        Line::new().push(b"policy file: bad path").emit();
        return None;
    };
    let mut text = [0u8; MAX_POLICY_FILE];
    match crate::file::read(path_c, &mut text) {
        Ok(crate::file::FileText {
            truncated: true, ..
        }) => {
            Line::new().push(path).push(b": ").push(b"too long").emit();
            return None;
        }
        Ok(crate::file::FileText { text, .. }) => {
            if let Err((line, error)) = policy.parse_file(text) {
                Line::new()
                    .push(path)
                    .push(b" line ")
                    .num(u64::from(line))
                    .push(b": ")
                    .push(error.as_str().as_bytes())
                    .emit();
                return None;
            }
        }
        // The default file is optional; one named by `--policy` is not.
        Err(rustix::io::Errno::NOENT) if file.is_none() => {}
        Err(errno) => {
            Line::new()
                .push(path)
                .push(b": cannot read: errno ")
                .num(u64::from(errno.raw_os_error().unsigned_abs()))
                .emit();
            return None;
        }
    }
    if kernel_cmdline {
        // x86's and arm64's COMMAND_LINE_SIZE is 2048.
        let mut cmdline = [0u8; 4096];
        let text = crate::file::read(c"/proc/cmdline", &mut cmdline)
            .map(|file| file.text)
            .unwrap_or(&[]);
        if let Err((key, error)) = policy.apply_kernel_cmdline(text) {
            Line::new()
                .push(b"kernel command line: ferry.")
                .push(key)
                .push(b": ")
                .push(error.as_str().as_bytes())
                .emit();
            return None;
        }
    }
    for (key, value) in flags {
        if let Err(error) = policy.apply(key, value) {
            Line::new()
                .push(b"policy flag ")
                .push(key)
                .push(b": ")
                .push(error.as_str().as_bytes())
                .emit();
            return None;
        }
    }
    if let Err(error) = policy.validate() {
        Line::new()
            .push(b"policy: ")
            .push(error.as_str().as_bytes())
            .emit();
        return None;
    }
    Some(policy)
}

/// Splits `key=value` at its first `=`.
pub fn split_setting(setting: &[u8]) -> Option<(&[u8], &[u8])> {
    let at = setting.iter().position(|b| *b == b'=')?;
    Some((setting.get(..at)?, setting.get(at.checked_add(1)?..)?))
}

fn number(value: &[u8]) -> Result<u32, PolicyError> {
    crate::config::parse_u32(value).ok_or(PolicyError::BadValue)
}

fn in_range<T: PartialOrd>(value: T, min: T, max: T) -> Result<T, PolicyError> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(PolicyError::OutOfRange)
    }
}

/// Decimal digits into a `u64`; `None` on anything else or overflow.
fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |value, d| {
        let digit = d
            .is_ascii_digit()
            .then(|| u64::from(d.wrapping_sub(b'0')))?;
        value.checked_mul(10)?.checked_add(digit)
    })
}

fn parse_bool(value: &[u8]) -> Result<bool, PolicyError> {
    match value {
        b"true" | b"1" | b"yes" => Ok(true),
        b"false" | b"0" | b"no" => Ok(false),
        _ => Err(PolicyError::BadValue),
    }
}

/// An absolute path without NUL, at most [`MAX_POLICY_PATH`] bytes.
fn parse_path(value: &[u8]) -> Result<heapless::Vec<u8, MAX_POLICY_PATH>, PolicyError> {
    if !value.starts_with(b"/") || value.contains(&0) {
        return Err(PolicyError::BadValue);
    }
    heapless::Vec::from_slice(value).map_err(|_| PolicyError::TooLong)
}

/// Comma-separated CIDs, none of them reserved: 0 (the hypervisor), 1 (local) or
/// `VMADDR_CID_ANY`. An empty value clears the list.
fn parse_cids(value: &[u8]) -> Result<heapless::Vec<u32, MAX_ALLOW_CIDS>, PolicyError> {
    let mut cids = heapless::Vec::new();
    if value.is_empty() {
        return Ok(cids);
    }
    for entry in value.split(|b| *b == b',') {
        let cid = number(entry.trim_ascii())?;
        if cid <= 1 || cid == u32::MAX {
            return Err(PolicyError::OutOfRange);
        }
        cids.push(cid).map_err(|_| PolicyError::TooLong)?;
    }
    Ok(cids)
}

/// Octal permission bits, at most `0777` (`0660`, `660`).
fn parse_mode(value: &[u8]) -> Result<u32, PolicyError> {
    if value.is_empty() || value.len() > 4 {
        return Err(PolicyError::BadValue);
    }
    let mode = value.iter().try_fold(0u32, |mode, d| match d {
        b'0'..=b'7' => Ok(mode * 8 + u32::from(d - b'0')),
        _ => Err(PolicyError::BadValue),
    })?;
    in_range(mode, 0, 0o777)
}

/// Whether `name` may be a user or group name, or a number: not empty, and none of `:`, `,`,
/// whitespace, NUL or other control bytes.
fn is_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name
            .iter()
            .all(|b| !b.is_ascii_control() && !b.is_ascii_whitespace() && !b":,".contains(b))
}

/// `NAME[:GROUP]` or `UID[:GID]`.
pub fn parse_user_spec(value: &[u8]) -> Result<UserSpec, PolicyError> {
    let mut parts = value.splitn(2, |b| *b == b':');
    let user = parts.next().unwrap_or(&[]);
    let group_ok = parts.next().is_none_or(is_name);
    if !is_name(user) || !group_ok {
        return Err(PolicyError::BadValue);
    }
    UserSpec::from_slice(value).map_err(|_| PolicyError::TooLong)
}

/// Comma-separated names or numbers, or `*`; an empty value allows no other user.
fn parse_user_list(value: &[u8]) -> Result<heapless::Vec<u8, MAX_ALLOW_USERS>, PolicyError> {
    if !value.is_empty() {
        for entry in value.split(|b| *b == b',') {
            let entry = entry.trim_ascii();
            if !is_name(entry) {
                return Err(PolicyError::BadValue);
            }
        }
    }
    // Stored without the spaces around entries.
    let mut list = heapless::Vec::new();
    for (index, entry) in value.split(|b| *b == b',').enumerate() {
        if index > 0 {
            list.push(b',').map_err(|_| PolicyError::TooLong)?;
        }
        list.extend_from_slice(entry.trim_ascii())
            .map_err(|_| PolicyError::TooLong)?;
    }
    Ok(list)
}

/// A number followed by its unit, `ms`, `s`, `m` or `h`: milliseconds.
fn parse_duration_ms(value: &[u8]) -> Result<u64, PolicyError> {
    let digits_end = value
        .iter()
        .position(|b| !b.is_ascii_digit())
        .ok_or(PolicyError::BadValue)?;
    let (digits, unit) = value
        .split_at_checked(digits_end)
        .ok_or(PolicyError::BadValue)?;
    let scale: u64 = match unit {
        b"ms" => 1,
        b"s" => 1_000,
        b"m" => 60_000,
        b"h" => 3_600_000,
        _ => return Err(PolicyError::BadValue),
    };
    let count = parse_u64(digits).ok_or(PolicyError::BadValue)?;
    count.checked_mul(scale).ok_or(PolicyError::OutOfRange)
}

/// `0`, or a duration in whole seconds: seconds.
fn parse_runtime_s(value: &[u8]) -> Result<u64, PolicyError> {
    if value == b"0" {
        return Ok(0);
    }
    let ms = parse_duration_ms(value)?;
    if ms % 1_000 != 0 {
        return Err(PolicyError::BadValue);
    }
    Ok(ms / 1_000)
}

/// A byte count with an optional binary suffix `K`, `M`, `G` or `T` (either case).
fn parse_bytes(value: &[u8]) -> Result<u64, PolicyError> {
    let (digits, shift) = match value.split_last() {
        Some((b'k' | b'K', digits)) => (digits, 10),
        Some((b'm' | b'M', digits)) => (digits, 20),
        Some((b'g' | b'G', digits)) => (digits, 30),
        Some((b't' | b'T', digits)) => (digits, 40),
        _ => (value, 0),
    };
    let count = parse_u64(digits).ok_or(PolicyError::BadValue)?;
    count
        .checked_mul(1u64 << shift)
        .ok_or(PolicyError::OutOfRange)
}

/// `unlimited`, or a number (a byte count with a suffix when `bytes`).
fn parse_rlimit(value: &[u8], bytes: bool) -> Result<u64, PolicyError> {
    if value == b"unlimited" {
        return Ok(RLIM_INFINITY);
    }
    let limit = if bytes {
        parse_bytes(value)?
    } else {
        parse_u64(value).ok_or(PolicyError::BadValue)?
    };
    // RLIM_INFINITY is spelled `unlimited`.
    if limit == RLIM_INFINITY {
        return Err(PolicyError::OutOfRange);
    }
    Ok(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(key: &str, value: &str) -> Result<Policy, PolicyError> {
        let mut policy = Policy::defaults();
        policy.apply(key.as_bytes(), value.as_bytes())?;
        Ok(policy)
    }

    fn refused(key: &str, value: &str) -> PolicyError {
        applied(key, value).expect_err(value)
    }

    #[test]
    fn defaults_are_secure_and_consistent() {
        let policy = Policy::defaults();
        assert_eq!(policy.user.as_slice(), b"65534:65534");
        assert!(policy.unprivileged_default);
        assert!(!policy.allow_setuid);
        assert_eq!(policy.socket_mode, 0o600);
        assert_eq!(policy.validate(), Ok(()));
        assert_eq!(policy.check_auth(), Err(PolicyError::NoAuthentication));
        assert_eq!(current(), &policy, "nothing installed in unit tests");
    }

    #[test]
    fn authentication_needs_exactly_one_of_secret_and_insecure() {
        let secret = applied("secret_file", "/etc/ferry/secret").unwrap();
        assert_eq!(secret.check_auth(), Ok(()));
        let insecure = applied("insecure", "yes").unwrap();
        assert_eq!(insecure.check_auth(), Ok(()));
        let mut both = secret.clone();
        both.apply(b"insecure", b"1").unwrap();
        assert_eq!(both.validate(), Err(PolicyError::Conflict));
        assert_eq!(both.check_auth(), Err(PolicyError::Conflict));
    }

    #[test]
    fn booleans() {
        for (text, value) in [("true", true), ("1", true), ("yes", true)] {
            assert_eq!(applied("allow_setuid", text).unwrap().allow_setuid, value);
        }
        for text in ["false", "0", "no"] {
            assert!(!applied("insecure", text).unwrap().insecure);
        }
        for text in ["", "TRUE", "on", "2", "yes "] {
            assert_eq!(refused("insecure", text), PolicyError::BadValue, "{text:?}");
        }
        assert!(
            !applied("run_as_agent_user", "true")
                .unwrap()
                .unprivileged_default
        );
        assert!(Policy::defaults().exec_cgroups);
        assert!(!applied("exec_cgroups", "false").unwrap().exec_cgroups);
        assert!(applied("exec_cgroups", "1").unwrap().exec_cgroups);
        assert_eq!(refused("exec_cgroups", "off"), PolicyError::BadValue);
    }

    #[test]
    fn secret_files() {
        let longest = format!("/{}", "a".repeat(MAX_POLICY_PATH - 1));
        assert_eq!(
            applied("secret_file", &longest)
                .unwrap()
                .secret_file
                .unwrap()
                .len(),
            MAX_POLICY_PATH
        );
        assert_eq!(
            refused("secret_file", &format!("{longest}a")),
            PolicyError::TooLong
        );
        assert_eq!(refused("secret_file", "relative"), PolicyError::BadValue);
        assert_eq!(refused("secret_file", ""), PolicyError::BadValue);
        assert_eq!(refused("secret_file", "/a\0b"), PolicyError::BadValue);
    }

    #[test]
    fn cids() {
        assert_eq!(
            applied("allow_cid", "3").unwrap().allow_cids.as_slice(),
            &[3]
        );
        assert_eq!(
            applied("allow_cid", "2, 7,4294967294")
                .unwrap()
                .allow_cids
                .as_slice(),
            &[2, 7, u32::MAX - 1]
        );
        assert!(applied("allow_cid", "").unwrap().allow_cids.is_empty());
        for reserved in ["0", "1", "4294967295", "3,1"] {
            assert_eq!(refused("allow_cid", reserved), PolicyError::OutOfRange);
        }
        for bad in ["x", "3,", ",3", "4294967296", "-3", "3;4"] {
            assert_eq!(refused("allow_cid", bad), PolicyError::BadValue, "{bad:?}");
        }
        let most = vec!["5"; MAX_ALLOW_CIDS].join(",");
        assert_eq!(
            applied("allow_cid", &most).unwrap().allow_cids.len(),
            MAX_ALLOW_CIDS
        );
        assert_eq!(
            refused("allow_cid", &format!("{most},5")),
            PolicyError::TooLong
        );
    }

    #[test]
    fn socket_modes_and_groups() {
        assert_eq!(applied("socket_mode", "0660").unwrap().socket_mode, 0o660);
        assert_eq!(applied("socket_mode", "660").unwrap().socket_mode, 0o660);
        assert_eq!(applied("socket_mode", "0777").unwrap().socket_mode, 0o777);
        assert_eq!(applied("socket_mode", "0").unwrap().socket_mode, 0);
        assert_eq!(refused("socket_mode", "1000"), PolicyError::OutOfRange);
        assert_eq!(refused("socket_mode", "01000"), PolicyError::BadValue);
        assert_eq!(refused("socket_mode", "0680"), PolicyError::BadValue);
        assert_eq!(refused("socket_mode", ""), PolicyError::BadValue);
        assert_eq!(refused("socket_mode", "0o660"), PolicyError::BadValue);
        assert_eq!(
            applied("socket_group", "4294967295").unwrap().socket_group,
            Some(u32::MAX)
        );
        assert_eq!(refused("socket_group", "wheel"), PolicyError::BadValue);
        assert_eq!(refused("socket_group", "4294967296"), PolicyError::BadValue);
    }

    #[test]
    fn users() {
        for spec in ["nobody", "1000", "1000:1000", "app:staff", "a"] {
            assert_eq!(
                applied("user", spec).unwrap().user.as_slice(),
                spec.as_bytes()
            );
        }
        for bad in ["", ":", "a:", ":b", "a:b:c", "a b", "a,b", "a\0"] {
            assert_eq!(refused("user", bad), PolicyError::BadValue, "{bad:?}");
        }
        let longest = "u".repeat(MAX_USER_SPEC);
        assert!(applied("user", &longest).is_ok());
        assert_eq!(
            refused("user", &format!("{longest}u")),
            PolicyError::TooLong
        );

        let policy = applied("allow_users", "root, app ,1000").unwrap();
        assert_eq!(policy.allow_users.as_slice(), b"root,app,1000");
        assert_eq!(policy.allowed_users().count(), 3);
        assert!(!policy.allows_any_user());
        assert!(applied("allow_users", "*").unwrap().allows_any_user());
        assert_eq!(
            applied("allow_users", "").unwrap().allowed_users().count(),
            0
        );
        for bad in [",", "a,", "a,,b", "a:b", "a b"] {
            assert_eq!(
                refused("allow_users", bad),
                PolicyError::BadValue,
                "{bad:?}"
            );
        }
        let longest = vec!["abc"; MAX_ALLOW_USERS / 4].join(",");
        assert_eq!(longest.len(), MAX_ALLOW_USERS - 1);
        assert!(applied("allow_users", &longest).is_ok());
        assert!(applied("allow_users", &format!("{longest}d")).is_ok());
        assert_eq!(
            refused("allow_users", &format!("{longest}de")),
            PolicyError::TooLong
        );
    }

    #[test]
    fn connections_and_durations() {
        assert_eq!(applied("max_connections", "1").unwrap().max_connections, 1);
        assert_eq!(
            applied("max_connections", "1024").unwrap().max_connections,
            1024
        );
        assert_eq!(refused("max_connections", "0"), PolicyError::OutOfRange);
        assert_eq!(refused("max_connections", "1025"), PolicyError::OutOfRange);
        assert_eq!(Policy::defaults().max_jobs, 64);
        assert_eq!(applied("max_jobs", "256").unwrap().max_jobs, MAX_JOBS);
        assert_eq!(refused("max_jobs", "0"), PolicyError::OutOfRange);
        assert_eq!(refused("max_jobs", "257"), PolicyError::OutOfRange);
        let defaults = Policy::defaults();
        assert_eq!(
            (defaults.job_spool_head, defaults.job_spool_ring),
            (65536, 262144)
        );
        assert_eq!(applied("job_spool_head", "0").unwrap().job_spool_head, 0);
        assert_eq!(
            applied("job_spool_ring", "1k").unwrap().job_spool_ring,
            1024
        );
        assert_eq!(refused("job_spool_ring", "0"), PolicyError::OutOfRange);
        assert_eq!(refused("job_spool_head", "65M"), PolicyError::OutOfRange);
        assert!(!defaults.jobs_any_user);
        assert!(applied("jobs_any_user", "true").unwrap().jobs_any_user);

        let ms = |text: &str| applied("handshake_timeout", text).map(|p| p.handshake_timeout_ms);
        assert_eq!(ms("500ms"), Ok(500));
        assert_eq!(ms("5s"), Ok(5_000));
        assert_eq!(ms("2m"), Ok(120_000));
        assert_eq!(ms("1h"), Ok(3_600_000));
        assert_eq!(ms("4294967295ms"), Ok(u32::MAX));
        assert_eq!(ms("4294967296ms"), Err(PolicyError::OutOfRange));
        assert_eq!(ms("0s"), Err(PolicyError::OutOfRange));
        let idle = |text: &str| applied("idle_timeout", text).map(|p| p.idle_timeout_ms);
        assert_eq!(Policy::defaults().idle_timeout_ms, 30_000);
        assert_eq!(idle("1s"), Ok(1_000));
        assert_eq!(idle("0s"), Ok(0), "0 turns keep-alive off");
        assert_eq!(idle("4294967296ms"), Err(PolicyError::OutOfRange));
        assert_eq!(idle("5"), Err(PolicyError::BadValue));
        assert_eq!(ms("99999999999999999999s"), Err(PolicyError::BadValue));
        assert_eq!(ms("9999999999999999999h"), Err(PolicyError::OutOfRange));
        for bad in ["5", "s", "5 s", "5S", "5sec", "-5s", "1.5s", ""] {
            assert_eq!(ms(bad), Err(PolicyError::BadValue), "{bad:?}");
        }

        let s = |text: &str| applied("max_runtime", text).map(|p| p.max_runtime_s);
        assert_eq!(s("0"), Ok(0));
        assert_eq!(s("90s"), Ok(90));
        assert_eq!(s("2m"), Ok(120));
        assert_eq!(s("2000ms"), Ok(2));
        assert_eq!(s("1500ms"), Err(PolicyError::BadValue));
        assert_eq!(s("90"), Err(PolicyError::BadValue));
    }

    #[test]
    fn bytes_and_counts() {
        let bytes = |text: &str| applied("max_output", text).map(|p| p.max_output);
        assert_eq!(bytes("0"), Ok(0));
        assert_eq!(bytes("100"), Ok(100));
        assert_eq!(bytes("4K"), Ok(4096));
        assert_eq!(bytes("4k"), Ok(4096));
        assert_eq!(bytes("3M"), Ok(3 << 20));
        assert_eq!(bytes("2G"), Ok(2 << 30));
        assert_eq!(bytes("1T"), Ok(1 << 40));
        assert_eq!(bytes("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(bytes("18446744073709551616"), Err(PolicyError::BadValue));
        assert_eq!(bytes("16777216T"), Err(PolicyError::OutOfRange));
        assert_eq!(bytes("16777215T"), Ok(16_777_215 << 40));
        for bad in ["", "K", "4KB", "4 K", "x", "-1"] {
            assert_eq!(bytes(bad), Err(PolicyError::BadValue), "{bad:?}");
        }
        assert_eq!(
            applied("max_file_size", "1M").unwrap().max_file_size,
            1 << 20
        );
        assert_eq!(applied("memory_max", "512M").unwrap().memory_max, 512 << 20);
        assert_eq!(
            applied("pids_max", "4294967295").unwrap().pids_max,
            u32::MAX
        );
        assert_eq!(refused("pids_max", "4294967296"), PolicyError::BadValue);
        assert_eq!(
            applied("cpu_max", "102400").unwrap().cpu_max_percent,
            MAX_CPU_PERCENT
        );
        assert_eq!(refused("cpu_max", "102401"), PolicyError::OutOfRange);
        assert_eq!(refused("cpu_max", "50%"), PolicyError::BadValue);
    }

    #[test]
    fn rlimits() {
        let policy = applied("rlimit_nofile", "1024").unwrap();
        assert_eq!(policy.rlimit_nofile, Some(1024));
        assert_eq!(
            applied("rlimit_nproc", "unlimited").unwrap().rlimit_nproc,
            Some(RLIM_INFINITY)
        );
        assert_eq!(applied("rlimit_cpu", "0").unwrap().rlimit_cpu, Some(0));
        assert_eq!(applied("rlimit_as", "1G").unwrap().rlimit_as, Some(1 << 30));
        assert_eq!(applied("rlimit_core", "0").unwrap().rlimit_core, Some(0));
        assert_eq!(
            applied("rlimit_cpu", "18446744073709551614")
                .unwrap()
                .rlimit_cpu,
            Some(u64::MAX - 1)
        );
        assert_eq!(
            refused("rlimit_cpu", "18446744073709551615"),
            PolicyError::OutOfRange
        );
        assert_eq!(
            refused("rlimit_nofile", "1K"),
            PolicyError::BadValue,
            "a count, not bytes"
        );
        assert_eq!(refused("rlimit_core", "Unlimited"), PolicyError::BadValue);
        assert_eq!(refused("rlimit_as", ""), PolicyError::BadValue);
    }

    #[test]
    fn unknown_keys_and_long_values() {
        assert_eq!(refused("secret", "hunter2"), PolicyError::UnknownKey);
        assert_eq!(refused("", "x"), PolicyError::UnknownKey);
        assert_eq!(refused("User", "x"), PolicyError::UnknownKey);
        assert_eq!(
            refused("user", &"a".repeat(MAX_LINE + 1)),
            PolicyError::TooLong
        );
    }

    #[test]
    fn policy_files() {
        let mut policy = Policy::defaults();
        let text = b"# ferry's policy\r\n\
            \n\
            secret_file = /etc/ferry/secret\r\n\
            \t user=app:app  \n\
            allow_users = root,*\n\
               # indented comment\n\
            socket_mode=0660";
        assert_eq!(policy.parse_file(text), Ok(()));
        assert_eq!(
            policy.secret_file.as_deref(),
            Some(b"/etc/ferry/secret".as_slice())
        );
        assert_eq!(policy.user.as_slice(), b"app:app");
        assert!(policy.allows_any_user());
        assert_eq!(policy.socket_mode, 0o660);

        let error = |text: &[u8]| Policy::defaults().parse_file(text).unwrap_err();
        assert_eq!(
            error(b"user = a\nbogus = 1\n"),
            (2, PolicyError::UnknownKey)
        );
        assert_eq!(error(b"\n\ninsecure\n"), (3, PolicyError::MissingEquals));
        assert_eq!(error(b"insecure = maybe"), (1, PolicyError::BadValue));
        assert_eq!(error(b"= 1"), (1, PolicyError::UnknownKey));
        assert_eq!(error(b"user = a # comment"), (1, PolicyError::BadValue));
        let long = [b"user = ".as_slice(), &[b'a'; MAX_LINE]].concat();
        assert_eq!(error(&long), (1, PolicyError::TooLong));
        // An '=' in a value is part of it.
        let mut policy = Policy::defaults();
        assert_eq!(policy.parse_file(b"user = a=b"), Ok(()));
        assert_eq!(policy.user.as_slice(), b"a=b");
        assert_eq!(Policy::defaults().parse_file(b""), Ok(()));
        assert_eq!(Policy::defaults().parse_file(b"\r\n\r\n# x"), Ok(()));
        // Whatever the bytes: no panic.
        let _ = Policy::defaults().parse_file(&[0xff; 3000]);
        let _ = Policy::defaults().parse_file(&[b'='; 600]);
    }

    #[test]
    fn kernel_command_lines() {
        let mut policy = Policy::defaults();
        let cmdline = b"console=ttyS0 ferry.listen=vsock:7 ferry.ready=9 ferry.modules=a \
            ferry.insecure=1 ferry.user=app ferry.max_connections=8 quiet\n";
        assert_eq!(policy.apply_kernel_cmdline(cmdline), Ok(()));
        assert!(policy.insecure);
        assert_eq!(policy.user.as_slice(), b"app");
        assert_eq!(policy.max_connections, 8);

        let error = |cmdline: &'static [u8]| Policy::defaults().apply_kernel_cmdline(cmdline);
        assert_eq!(
            error(b"ferry.foo=1"),
            Err((b"foo".as_slice(), PolicyError::UnknownKey))
        );
        assert_eq!(
            error(b"ferry.secret=hunter2"),
            Err((b"secret".as_slice(), PolicyError::UnknownKey)),
            "the secret itself is never taken from the command line"
        );
        assert_eq!(
            error(b"ferry.insecure"),
            Err((b"insecure".as_slice(), PolicyError::MissingEquals))
        );
        assert_eq!(
            error(b"ferry.max_connections=0"),
            Err((b"max_connections".as_slice(), PolicyError::OutOfRange))
        );
        assert_eq!(error(b"ferryx.foo=1 xferry.foo=1 ferry"), Ok(()));
        assert_eq!(error(b""), Ok(()));
    }

    #[test]
    fn shutdown_is_allowed_to_authenticated_clients_only_by_default() {
        let mut policy = Policy::defaults();
        assert!(
            policy.allows_shutdown(),
            "with a secret (or before one is set)"
        );
        policy.insecure = true;
        assert!(
            !policy.allows_shutdown(),
            "insecure: refused unless the key says so"
        );
        policy.apply(b"allow_shutdown", b"yes").unwrap();
        assert!(policy.allows_shutdown());
        let mut policy = Policy::defaults();
        policy.apply(b"allow_shutdown", b"false").unwrap();
        assert!(!policy.allows_shutdown());
        assert_eq!(
            policy.apply(b"allow_shutdown", b"maybe"),
            Err(PolicyError::BadValue)
        );
        // The power command is an absolute path.
        policy.apply(b"power_command", b"/bin/true").unwrap();
        assert_eq!(
            policy.power_command.as_deref(),
            Some(b"/bin/true".as_slice())
        );
        assert_eq!(
            policy.apply(b"power_command", b"poweroff"),
            Err(PolicyError::BadValue)
        );
        // `ferry.hostname=` is PID 1's, not a policy key.
        assert_eq!(policy.apply_kernel_cmdline(b"ferry.hostname=vm1"), Ok(()));
        assert_eq!(
            policy.apply(b"hostname", b"vm1"),
            Err(PolicyError::UnknownKey)
        );
    }

    #[test]
    fn a_later_source_wins() {
        let mut policy = Policy::defaults();
        policy
            .parse_file(b"user = a\nmax_connections = 2\n")
            .unwrap();
        policy.apply_kernel_cmdline(b"ferry.user=b").unwrap();
        policy.apply(b"max_connections", b"3").unwrap();
        assert_eq!(policy.user.as_slice(), b"b");
        assert_eq!(policy.max_connections, 3);
    }

    #[test]
    fn loading_from_files_and_flags() {
        let dir = std::env::temp_dir().join(format!("ferry-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("policy");
        std::fs::write(&file, "user = 1000\nmax_connections = 5\n").unwrap();
        let path = file.to_str().unwrap().as_bytes();
        let flags: [(&[u8], &[u8]); 1] = [(b"max_connections", b"6")];
        let policy = load(Some(path), false, &flags).unwrap();
        assert_eq!(policy.user.as_slice(), b"1000");
        assert_eq!(policy.max_connections, 6);
        // A missing file named explicitly is an error; so are bad contents and bad flags.
        let missing = dir.join("missing");
        assert!(load(Some(missing.to_str().unwrap().as_bytes()), false, &[]).is_none());
        std::fs::write(&file, "bogus = 1\n").unwrap();
        assert!(load(Some(path), false, &[]).is_none());
        std::fs::write(&file, "x".repeat(MAX_POLICY_FILE + 1)).unwrap();
        assert!(load(Some(path), false, &[]).is_none(), "too long");
        std::fs::write(&file, "insecure = true\n").unwrap();
        assert!(
            load(Some(path), false, &[(b"secret_file", b"/s")]).is_none(),
            "conflict"
        );
        assert!(load(Some(path), false, &[(b"nope", b"1")]).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
