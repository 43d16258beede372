//! The messages of the operations beyond exec (protocol 4): file transfer, system information,
//! shutdown, the clock and the random pool.
//!
//! NOTE: as in `msg.rs`, field and variant order *is* the wire format: append only.

use serde::{Deserialize, Serialize};

use crate::bytes::{ByteArray, Bytes};
use crate::limits::*;
use crate::msg::{ErrorCode, Limits, RequestError, StrList};

/// Write a file (or, for [`TransferKind::Tree`], unpack a tar stream into a directory). The
/// content follows in [`crate::ClientFrame::Stdin`] frames within the stdin credit, then
/// [`crate::ClientFrame::PutEnd`] carries its SHA-256. A file is written atomically: a temporary
/// file in the destination's directory, checked and synced, renamed over the destination.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutRequest<'a> {
    /// The destination: an absolute path (a file, or for a tree the directory to unpack into).
    #[serde(borrow)]
    pub path: Bytes<'a>,
    /// A file, or a tar stream.
    pub kind: TransferKind,
    /// The file's permission bits (at most `0o7777`); `None`: `0o644`. For a tree, the
    /// directory's when the put creates it (`None`: `0o755`); its entries carry their own.
    pub mode: Option<u32>,
    /// The file's owner, `NAME[:GROUP]` or `UID[:GID]`; `None`: the user the transfer runs as.
    /// Changing it is the policy's to allow, like running as another user.
    pub owner: Option<Bytes<'a>>,
    /// The file's modification time; `None`: when it is written. For a tree, the directory's
    /// when the put creates it.
    pub mtime: Option<Timestamp>,
    /// The content's size when known: checked against the agent's maximum file size and the
    /// free space before a byte is written, and the content must then have exactly this size.
    pub size: Option<u64>,
    /// Create missing parent directories.
    pub create_parents: bool,
    /// Refuse ([`ErrorCode::AlreadyExists`]) if the destination exists.
    pub no_clobber: bool,
    /// Write as this user (`NAME[:GROUP]` or `UID[:GID]`) instead of the agent's default; the
    /// policy decides who may be asked for, as for exec.
    pub user: Option<Bytes<'a>>,
}

/// Read a file (or, for [`TransferKind::Tree`], a directory as a tar stream). Answered with
/// [`crate::AgentFrame::FileReady`], the content in [`crate::AgentFrame::FileData`] frames, and
/// [`crate::AgentFrame::FileDone`] with its SHA-256.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct GetRequest<'a> {
    /// An absolute path.
    #[serde(borrow)]
    pub path: Bytes<'a>,
    /// A regular file, or a directory as a tar stream.
    pub kind: TransferKind,
    /// Read as this user; see [`PutRequest::user`].
    pub user: Option<Bytes<'a>>,
}

/// What a transfer moves.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferKind {
    /// One regular file's bytes.
    File,
    /// A directory tree as a tar stream (ustar with pax headers): regular files, directories and
    /// symbolic links; anything else is skipped ([`crate::AgentFrame::Skipped`]).
    Tree,
}

/// A point in time: seconds and nanoseconds since the Unix epoch (`CLOCK_REALTIME`).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timestamp {
    /// Seconds since 1970-01-01 UTC (negative before it).
    pub secs: i64,
    /// Nanoseconds within the second, below 1 000 000 000.
    pub nanos: u32,
}

/// What the agent knows about a transfer once it has checked it: a get's file, or for a put the
/// destination as it will be written. Content follows (get) or may go on (put).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileHeader {
    /// The content's size in bytes (a tree's stream: 0, not known in advance).
    pub size: u64,
    /// Permission bits and file type, as `st_mode`.
    pub mode: u32,
    /// Its modification time.
    pub mtime: Timestamp,
    /// Its owner.
    pub uid: u32,
    /// Its group.
    pub gid: u32,
}

/// The end of a transfer: what moved, and its SHA-256. The last frame of a put or a get.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileSummary {
    /// Content bytes moved (a tree: the tar stream's bytes).
    pub bytes: u64,
    /// SHA-256 of them.
    pub sha256: ByteArray<DIGEST_LEN>,
}

/// An entry of a tree transfer that was left out.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Skipped<'a> {
    /// Its path within the tree.
    #[serde(borrow)]
    pub path: Bytes<'a>,
    /// Why.
    pub reason: SkipReason,
}

/// Why an entry of a tree was left out.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// A device node, a socket or a fifo: not content.
    Special,
    /// A hard link (its target travels as a file of its own).
    HardLink,
    /// A tar entry type the agent does not write.
    UnknownType,
    /// An entry the user may not read, or one that vanished while the tree was read.
    Unreadable,
}

/// Power the guest off or reboot it: every process gets `SIGTERM`, then `SIGKILL` after the
/// grace; file systems are synced and unmounted (or remounted read-only). Answered with
/// [`crate::AgentFrame::Done`] before any of that starts.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownRequest {
    /// Reboot instead of powering off.
    pub reboot: bool,
    /// Milliseconds between `SIGTERM` and `SIGKILL` (at most [`MAX_SHUTDOWN_GRACE_MS`]).
    pub grace_ms: u32,
}

/// The guest as the agent sees it: the first frame of an info operation, followed by one
/// [`crate::AgentFrame::Mount`] per mounted file system, one [`crate::AgentFrame::Interface`]
/// per network interface, and [`crate::AgentFrame::Done`] counting them.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct SystemInfo<'a> {
    /// `uname -r`.
    pub kernel_release: &'a str,
    /// `uname -v`.
    pub kernel_version: &'a str,
    /// `uname -m`.
    pub machine: &'a str,
    /// `uname -n`.
    pub hostname: &'a str,
    /// Milliseconds since boot (`CLOCK_BOOTTIME`).
    pub uptime_ms: u64,
    /// The guest's realtime clock now: its boot time is this minus the uptime.
    pub now: Timestamp,
    /// CPUs online.
    pub cpus: u32,
    /// The first CPU's model name from `/proc/cpuinfo` (empty when it has none).
    pub cpu_model: &'a str,
    /// Load averages over 1, 5 and 15 minutes, in hundredths.
    pub load: [u32; 3],
    /// `MemTotal` in bytes.
    pub memory_total: u64,
    /// `MemAvailable` in bytes.
    pub memory_available: u64,
    /// Processes (and threads) in the guest.
    pub processes: u32,
    /// The agent's pid (1 as init).
    pub agent_pid: u32,
    /// The agent listener's resident memory in bytes.
    pub agent_rss: u64,
}

/// A mounted file system and its space (`statfs`).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountInfo<'a> {
    /// What is mounted (a device, or the file system's name).
    #[serde(borrow)]
    pub source: Bytes<'a>,
    /// Where.
    pub target: Bytes<'a>,
    /// The file system type.
    pub fstype: &'a str,
    /// Mounted read-only.
    pub read_only: bool,
    /// Size in bytes.
    pub total: u64,
    /// Free bytes.
    pub free: u64,
    /// Free bytes an unprivileged user may use.
    pub available: u64,
}

/// A network interface.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterfaceInfo<'a> {
    /// Its name.
    pub name: &'a str,
    /// Whether it is up.
    pub up: bool,
    /// Its MTU.
    pub mtu: u32,
    /// Its hardware address (empty when it has none).
    #[serde(borrow)]
    pub mac: Bytes<'a>,
    /// Its IPv4 addresses as `ADDRESS/PREFIX` text, NUL-terminated, packed.
    pub addresses: StrList<'a>,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
}

/// The length of a SHA-256 digest.
pub const DIGEST_LEN: usize = 32;

impl PutRequest<'_> {
    /// Checks the request against `limits` (and this crate's).
    pub fn validate_within(&self, limits: &Limits) -> Result<(), RequestError> {
        check_path(self.path.0, limits)?;
        check_user(self.owner, limits)?;
        check_user(self.user, limits)?;
        if self.mode.is_some_and(|mode| mode > 0o7777) {
            return Err(RequestError::invalid("mode has bits beyond 0o7777"));
        }
        if self.mtime.is_some_and(|t| t.nanos >= 1_000_000_000) {
            return Err(RequestError::invalid("mtime nanoseconds out of range"));
        }
        // A tree's mode and time are its directory's (when the put creates it); the entries
        // carry their own sizes, and are the user's.
        if self.kind == TransferKind::Tree && (self.size.is_some() || self.owner.is_some()) {
            return Err(RequestError::invalid(
                "a tree carries its own sizes, and its entries are the user's",
            ));
        }
        Ok(())
    }
}

impl GetRequest<'_> {
    /// Checks the request against `limits` (and this crate's).
    pub fn validate_within(&self, limits: &Limits) -> Result<(), RequestError> {
        check_path(self.path.0, limits)?;
        check_user(self.user, limits)
    }
}

impl ShutdownRequest {
    /// Checks the grace against [`MAX_SHUTDOWN_GRACE_MS`].
    pub fn validate(&self) -> Result<(), RequestError> {
        if self.grace_ms > MAX_SHUTDOWN_GRACE_MS {
            return Err(RequestError {
                code: ErrorCode::LimitExceeded,
                message: "shutdown grace too long",
            });
        }
        Ok(())
    }
}

impl Timestamp {
    /// Whether the nanoseconds are within a second.
    pub fn is_valid(&self) -> bool {
        self.nanos < 1_000_000_000
    }
}

/// A transfer's path: absolute, without NUL, within the path limit.
fn check_path(path: &[u8], limits: &Limits) -> Result<(), RequestError> {
    if path.len() > (limits.max_path as usize).min(MAX_PATH) {
        return Err(RequestError::LIMIT);
    }
    if path.first() != Some(&b'/') || path.contains(&0) {
        return Err(RequestError::invalid(
            "path is not absolute or contains NUL",
        ));
    }
    Ok(())
}

pub(crate) fn check_user(user: Option<Bytes<'_>>, limits: &Limits) -> Result<(), RequestError> {
    let Some(Bytes(user)) = user else {
        return Ok(());
    };
    if user.len() > (limits.max_user as usize).min(MAX_USER) {
        return Err(RequestError::LIMIT);
    }
    if user.is_empty() || user.contains(&0) {
        return Err(RequestError::invalid("user is empty or contains NUL"));
    }
    Ok(())
}
