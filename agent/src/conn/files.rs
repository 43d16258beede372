//! File transfer (protocol 4's put and get of a file or a tree), in the connection process, as
//! the request's user: the process drops its privileges to that user before it touches a file
//! (it serves only this connection), so the kernel's permission checks are the user's own.
//!
//! A put is atomic: the content goes to a temporary file in the destination's directory, and
//! only content that matches its declared size and its SHA-256 replaces the destination (by
//! `rename`, after `fsync`; the directory is synced after). The temporary file is anonymous
//! (`O_TMPFILE`, linked at the commit through `/proc/self/fd`), so nothing is left behind
//! whatever ends the process; where the file system or `/proc` cannot do that, it is a named
//! `.NAME.ferry-XXXXXXXX` (mode 0600), removed on every way out short of the process being
//! killed. Everything that can be checked is checked before a byte is written: the size against
//! the policy's `max_file_size` and the free space, the destination's type, `no_clobber`, the
//! owner.
//!
//! A get streams a regular file in data frames, one frame buffer whatever its size, until EOF:
//! the header's size is what `fstat` said, the summary counts and hashes what was sent (a file
//! that grows or shrinks meanwhile is sent as read; the client checks the digest of what it
//! received). A client that takes nothing for the final-send timeout ends the connection.
//!
//! Trees travel as tar streams ([`crate::tar`]), through the same loops. A tree put into a new
//! destination is unpacked into a temporary directory beside it (`.NAME.ferry-XXXXXXXX`, 0700)
//! that takes the destination's name (`RENAME_NOREPLACE`) only once the stream's SHA-256 and
//! size matched and the directories got their modes: atomic, and a failed or abandoned put
//! removes what it had unpacked (a killed process leaves the temporary directory). Into an
//! existing directory (not with `no_clobber`: [`ErrorCode::AlreadyExists`]) it merges, NOT
//! atomically: entries land as they arrive, and a failure leaves what was unpacked so far.
//! The destination's mode (default 0755) and time are the request's when the put creates it;
//! an existing one keeps its own. `max_file_size` applies to each file of the tree, checked at
//! its header. An owner is refused for a tree (its entries are the user's). Skipped entries
//! go to the client as `Skipped` frames in the stream's order.

use core::cell::Cell;
use core::ffi::CStr;
use core::mem::MaybeUninit;

use ferry_wire::session::{AgentEvent, AgentSession, Micros, Refusal};
use ferry_wire::{
    ByteArray, ErrorCode, FileHeader, FileSummary, GetRequest, PutRequest, Timestamp, TransferKind,
};
use rustix::event::PollFlags;
use rustix::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, RawDir, RenameFlags, Timespec, Timestamps, CWD};
use rustix::io::Errno;

use super::io::{Link, Outbox, Received};
use super::start::{is_root, Prepared};
use super::End;
use crate::sha::Sha256;
use crate::tar::{Extractor, Skipped, TarError, TreeWriter};
use crate::users::{self, Credentials};
use crate::{clock, policy, spawn, sys};

/// A file's permission bits when the put names none.
pub const DEFAULT_MODE: u32 = 0o644;
/// Missing parents are made with these permission bits, whatever the umask.
const PARENT_MODE: u32 = 0o755;

/// A transfer asked for, copied out of the receive buffer (the content reuses it) and checked
/// against the policy: who it runs as, and where.
pub struct Transfer<'b> {
    kind: Kind,
    tree: bool,
    /// The path and its NUL, at the front of the connection's path buffer.
    path: &'b mut [u8],
    credentials: Credentials,
}

enum Kind {
    Put(PutOptions),
    Get,
}

struct PutOptions {
    tree: bool,
    mode: u32,
    mtime: Option<Timestamp>,
    size: Option<u64>,
    create_parents: bool,
    no_clobber: bool,
    /// The owner asked for, resolved (and allowed by the policy, like a user to run as).
    owner: Option<(u32, u32)>,
}

impl<'b> Transfer<'b> {
    /// A put: `buf` takes its path.
    pub fn put(
        request: &PutRequest<'_>,
        buf: &'b mut [u8],
        prepared: Prepared,
    ) -> Result<Self, Refusal> {
        let tree = request.kind == TransferKind::Tree;
        // The session refused an owner for a tree: its entries are the user's.
        let owner = match request.owner {
            Some(owner) => {
                let owner = users::authorize(policy::current(), Some(owner.0), is_root())?;
                Some((owner.uid, owner.gid))
            }
            None => None,
        };
        let default_mode = if tree { PARENT_MODE } else { DEFAULT_MODE };
        let options = PutOptions {
            tree,
            mode: request.mode.unwrap_or(default_mode),
            mtime: request.mtime,
            size: request.size,
            create_parents: request.create_parents,
            no_clobber: request.no_clobber,
            owner,
        };
        let user = request.user.map(|user| user.0);
        Transfer::new(
            Kind::Put(options),
            request.kind,
            request.path.0,
            user,
            buf,
            prepared,
        )
    }

    /// A get: `buf` takes its path.
    pub fn get(
        request: &GetRequest<'_>,
        buf: &'b mut [u8],
        prepared: Prepared,
    ) -> Result<Self, Refusal> {
        let user = request.user.map(|user| user.0);
        Transfer::new(Kind::Get, request.kind, request.path.0, user, buf, prepared)
    }

    fn new(
        kind: Kind,
        transfer: TransferKind,
        path: &[u8],
        user: Option<&[u8]>,
        buf: &'b mut [u8],
        prepared: Prepared,
    ) -> Result<Self, Refusal> {
        // The session checked it: absolute, no NUL, within MAX_PATH (the buffer's size less
        // its NUL).
        let too_long = Refusal::new(ErrorCode::LimitExceeded, "path too long");
        let path_buf = buf.get_mut(..=path.len()).ok_or(too_long)?;
        let (text, nul) = path_buf.split_at_mut(path.len());
        text.copy_from_slice(path);
        nul.fill(0);
        Ok(Transfer {
            kind,
            tree: transfer == TransferKind::Tree,
            path: path_buf,
            credentials: prepared.identity(user)?,
        })
    }
}

/// Runs the transfer to its end: the session then has its last frame queued ([`End::Closing`])
/// or the client is gone. Also returns the content bytes moved, for the audit line.
#[inline(never)]
pub fn run(
    transfer: Transfer<'_>,
    link: &mut Link<'_, '_>,
    session: &mut AgentSession,
    stall_timeout: Micros,
) -> (End, u64) {
    // The exec cgroup made while this process waited is not needed, and only root may remove
    // it. A file larger than an inherited RLIMIT_FSIZE is EFBIG, not death.
    crate::cgroup::remove_own_exec();
    let _ = sys::set_signal_ignored(rustix::process::Signal::XFSZ, true);
    let mut moved = 0;
    let result = spawn::assume_identity(&transfer.credentials)
        .map_err(|errno| failure(errno, "cannot assume the user's identity"))
        .and_then(|()| {
            // Modes are exactly those asked for (or documented), whatever the agent's umask.
            rustix::process::umask(Mode::empty());
            match transfer.kind {
                Kind::Put(options) => put(
                    link,
                    session,
                    transfer.path,
                    &options,
                    stall_timeout,
                    &mut moved,
                ),
                Kind::Get => get(
                    link,
                    session,
                    transfer.path,
                    transfer.tree,
                    stall_timeout,
                    &mut moved,
                ),
            }
        });
    let end = match result {
        Ok(end) => end,
        Err(refusal) => match session.refuse(refusal, clock::monotonic_us()) {
            Ok(()) => End::Closing,
            Err(_) => End::ClientGone,
        },
    };
    (end, moved)
}

/// An OS error as the client is told it.
fn failure(errno: Errno, message: &'static str) -> Refusal {
    let code = match errno {
        Errno::NOENT => ErrorCode::NotFound,
        Errno::ACCESS | Errno::PERM | Errno::ROFS => ErrorCode::PermissionDenied,
        Errno::NOSPC | Errno::DQUOT => ErrorCode::NoSpace,
        Errno::FBIG => ErrorCode::FileTooLarge,
        Errno::EXIST => ErrorCode::AlreadyExists,
        Errno::ISDIR | Errno::NOTDIR => ErrorCode::WrongFileType,
        _ => ErrorCode::Io,
    };
    Refusal::os(code, errno.raw_os_error().unsigned_abs(), message)
}

const NOT_A_FILE: Refusal = Refusal::new(ErrorCode::WrongFileType, "not a regular file");
const NOT_A_DIR: Refusal = Refusal::new(ErrorCode::WrongFileType, "not a directory");

/// A tar stream's failure as the client is told it.
fn tar_failure(err: TarError) -> Refusal {
    let code = match err {
        TarError::Io(errno) => return failure(errno, err.as_str()),
        TarError::PathEscape | TarError::SymlinkInPath => ErrorCode::PathEscape,
        TarError::PathTooLong | TarError::TooDeep | TarError::ExtensionTooLarge => {
            ErrorCode::LimitExceeded
        }
        _ => ErrorCode::BadArchive,
    };
    Refusal::new(code, err.as_str())
}

/// Sends a tree's note about an entry it left out, behind what the outbox holds; `false` when
/// the client does not take it within the stall timeout.
fn send_note(
    sock: BorrowedFd<'_>,
    outbox: &mut Outbox<'_>,
    session: &mut AgentSession,
    note: Option<Skipped<'_>>,
    stall_timeout: Micros,
) -> bool {
    let Some(note) = note else { return true };
    let deadline = clock::monotonic_us().saturating_add(stall_timeout);
    outbox.put_when_sent(sock, deadline, |out| {
        session.encode_skipped(note.path, note.reason, out)
    })
}

// ---------------------------------------------------------------------------------------------
// Put.

/// A file put is synced every this many bytes: the commit's `fsync`, during which the client
/// hears no keepalive, then has at most this much to write (3 keepalive intervals of silence
/// would make the client give up).
const SYNC_EVERY: u64 = 64 << 20;

#[inline(never)]
fn put(
    link: &mut Link<'_, '_>,
    session: &mut AgentSession,
    path: &mut [u8],
    options: &PutOptions,
    stall_timeout: Micros,
    moved: &mut u64,
) -> Result<End, Refusal> {
    // `/DIR.../NAME\0`: the directory is opened, NAME is written through it.
    let slash = path.iter().rposition(|b| *b == b'/').unwrap_or(0);
    let (dir_path, name) = path.split_at_mut(slash.saturating_add(1));
    let name = sys::cstr_with_nul(name).ok_or(NOT_A_FILE)?;
    if matches!(name.to_bytes(), b"" | b"." | b"..") {
        return Err(Refusal::new(ErrorCode::WrongFileType, "not a file name"));
    }
    let dir = open_dir(dir_path, options.create_parents)?;
    let dir = dir.as_fd();
    let tree = options.tree;
    let mut exists = true;
    match rustix::fs::statat(dir, name, AtFlags::empty()) {
        Ok(stat) if tree && !is_dir(stat.st_mode) => return Err(NOT_A_DIR),
        Ok(stat) if !tree && is_dir(stat.st_mode) => {
            return Err(Refusal::new(
                ErrorCode::WrongFileType,
                "the destination is a directory",
            ))
        }
        Ok(stat) if !tree && !is_regular(stat.st_mode) => return Err(NOT_A_FILE),
        Ok(_) if options.no_clobber => {
            return Err(Refusal::new(
                ErrorCode::AlreadyExists,
                "the destination exists",
            ))
        }
        Ok(_) => {}
        Err(Errno::NOENT) => exists = false,
        Err(errno) => return Err(failure(errno, "cannot reach the destination")),
    }
    let max = policy::current().max_file_size;
    let too_large = Refusal::new(
        ErrorCode::FileTooLarge,
        "larger than the agent's max_file_size",
    );
    if let Some(size) = options.size {
        if !tree && max > 0 && size > max {
            return Err(too_large);
        }
        if let Ok(space) = rustix::fs::fstatvfs(dir) {
            if size > space.f_bavail.saturating_mul(space.f_frsize) {
                return Err(Refusal::new(ErrorCode::NoSpace, "not enough free space"));
            }
        }
    }
    // A tree merged into an existing directory has no temporary.
    let temp = match exists && tree {
        true => None,
        false => Some(Temp::create(dir, name, tree)?),
    };
    let merged = match &temp {
        Some(_) => None,
        None => Some(
            rustix::fs::openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|errno| failure(errno, "cannot open the destination"))?,
        ),
    };
    // What is written into: the temporary file or directory, or the merged one.
    let target = match (&temp, &merged) {
        (Some(temp), _) => temp.file.as_fd(),
        (None, Some(merged)) => merged.as_fd(),
        (None, None) => return Err(NOT_A_DIR),
    };
    let mut extractor = tree.then(|| Extractor::new(target));
    if let Some(extractor) = extractor.as_mut() {
        extractor.limit_file_size(max);
    }
    let (uid, gid) = match options.owner {
        Some((uid, gid)) => {
            rustix::fs::fchown(
                target,
                Some(rustix::process::Uid::from_raw(uid)),
                Some(rustix::process::Gid::from_raw(gid)),
            )
            .map_err(|errno| failure(errno, "cannot give the file its owner"))?;
            (uid, gid)
        }
        None => (
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
        ),
    };
    let now = sys::clock_gettime(rustix::time::ClockId::Realtime);
    let mut header = FileHeader {
        size: options.size.unwrap_or(0),
        mode: match tree {
            true => FileType::Directory.as_raw_mode(),
            false => FileType::RegularFile.as_raw_mode(),
        } | options.mode,
        mtime: options.mtime.unwrap_or(Timestamp {
            secs: now.tv_sec,
            nanos: now.tv_nsec as u32,
        }),
        uid,
        gid,
    };
    if let Some(merged) = &merged {
        // An existing directory keeps its own.
        let stat = rustix::fs::fstat(merged)
            .map_err(|errno| failure(errno, "cannot open the destination"))?;
        header = stat_header(&stat, 0);
    }
    if session.file_ready(header, clock::monotonic_us()).is_err() {
        return Ok(End::ClientGone);
    }
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    loop {
        let now = clock::monotonic_us();
        loop {
            let Ok(input) = session.handle_input(link.inbox.data(), now) else {
                // A breach: the session queued its error frame; the temporary file goes.
                return Ok(End::Closing);
            };
            let consumed = input.consumed;
            match input.event {
                None if consumed == 0 => break,
                Some(AgentEvent::Stdin(data)) => {
                    total = total.saturating_add(data.len() as u64);
                    if !tree && max > 0 && total > max {
                        return Err(too_large);
                    }
                    if options.size.is_some_and(|size| total > size) {
                        return Err(Refusal::new(
                            ErrorCode::IntegrityMismatch,
                            "more content than its declared size",
                        ));
                    }
                    hasher.update(data);
                    match extractor.as_mut() {
                        None => {
                            write_all(target, data)
                                .map_err(|errno| failure(errno, "cannot write the file"))?;
                            // Dirty data stays bounded: the commit's fsync (the client hears
                            // nothing meanwhile) never has more than this to write.
                            if total / SYNC_EVERY != (total - data.len() as u64) / SYNC_EVERY {
                                rustix::fs::fdatasync(target)
                                    .map_err(|errno| failure(errno, "cannot write the file"))?;
                            }
                        }
                        // Fed at once; it stops after each entry it skips, whose note goes
                        // first.
                        Some(extractor) => {
                            let mut rest = data;
                            while !rest.is_empty() {
                                let fed = extractor.feed(rest).map_err(tar_failure)?;
                                rest = rest.get(fed..).unwrap_or_default();
                                let note = extractor.take_skipped();
                                let (sock, outbox) = (link.sock, &mut link.outbox);
                                if !send_note(sock, outbox, session, note, stall_timeout) {
                                    return Ok(End::ClientGone);
                                }
                            }
                        }
                    }
                    *moved = total;
                    session.stdin_consumed(data.len());
                }
                Some(AgentEvent::PutEnd(digest)) => {
                    link.inbox.consume(consumed);
                    if options.size.is_some_and(|size| total != size) {
                        return Err(Refusal::new(
                            ErrorCode::IntegrityMismatch,
                            "less content than its declared size",
                        ));
                    }
                    let sha256 = hasher.finalize();
                    if sha256 != digest {
                        return Err(Refusal::new(
                            ErrorCode::IntegrityMismatch,
                            "the content does not match its SHA-256",
                        ));
                    }
                    if let Some(extractor) = extractor.as_mut() {
                        extractor.finish().map_err(tar_failure)?;
                    }
                    let committed = match &temp {
                        Some(temp) => temp.commit(name, options),
                        // Merged: what was unpacked reaches the disk.
                        None => rustix::fs::syncfs(target),
                    };
                    committed.map_err(|errno| failure(errno, "cannot commit the file"))?;
                    let summary = FileSummary {
                        bytes: total,
                        sha256: ByteArray(sha256),
                    };
                    return Ok(match session.file_done(summary, clock::monotonic_us()) {
                        Ok(()) => End::Closing,
                        Err(_) => End::ClientGone,
                    });
                }
                // The session yields nothing else during a put.
                _ => {}
            }
            link.inbox.consume(consumed);
        }
        link.outbox.refill(session);
        if link.flush().is_err() {
            return Ok(End::ClientGone);
        }
        match link.receive() {
            Received::Data => continue,
            Received::Nothing => {}
            // Before its digest: the put is abandoned (the session says so), nothing is
            // written.
            Received::Closed => {
                let _ = session.handle_eof();
                return Ok(End::ClientGone);
            }
        }
        let flags = if link.outbox.is_empty() {
            PollFlags::IN
        } else {
            PollFlags::IN | PollFlags::OUT
        };
        if link.wait(flags, session.poll_timeout()).is_err() {
            return Ok(End::ClientGone);
        }
        // Keepalives: the client learns the agent is alive while it sends.
        let _ = session.handle_timeout(clock::monotonic_us());
    }
}

/// Opens the directory `/DIR/` (`dir_path` ends with the slash before the file's name, which
/// becomes its NUL), making it and its missing parents first if asked.
#[inline(never)]
fn open_dir(dir_path: &mut [u8], create_parents: bool) -> Result<OwnedFd, Refusal> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let open = |path: &[u8]| match path {
        // The root: its slash is its name.
        [0] => rustix::fs::openat(CWD, c"/", flags, Mode::empty()),
        _ => rustix::fs::openat(
            CWD,
            sys::cstr_with_nul(path).ok_or(Errno::INVAL)?,
            flags,
            Mode::empty(),
        ),
    };
    if let Some(last) = dir_path.last_mut() {
        *last = 0;
    }
    match open(dir_path) {
        Err(Errno::NOENT) if create_parents => {}
        other => {
            return other.map_err(|errno| failure(errno, "cannot open the destination's directory"))
        }
    }
    // `mkdir -p`: each prefix ending before a slash, then the directory itself.
    for at in 1..dir_path.len() {
        let Some(byte) = dir_path.get(at).copied() else {
            break;
        };
        if byte != b'/' && byte != 0 {
            continue;
        }
        if let Some(end) = dir_path.get_mut(at) {
            *end = 0;
        }
        let made = match dir_path.get(..=at).and_then(sys::cstr_with_nul) {
            Some(prefix) => rustix::fs::mkdirat(CWD, prefix, Mode::from_raw_mode(PARENT_MODE)),
            None => Err(Errno::INVAL),
        };
        if let Some(end) = dir_path.get_mut(at) {
            *end = byte;
        }
        match made {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(errno) => return Err(failure(errno, "cannot make the destination's directory")),
        }
    }
    open(dir_path).map_err(|errno| failure(errno, "cannot open the destination's directory"))
}

/// Writes all of `data` to a regular file.
fn write_all(file: BorrowedFd<'_>, mut data: &[u8]) -> Result<(), Errno> {
    while !data.is_empty() {
        match rustix::io::write(file, data) {
            Ok(0) => return Err(Errno::IO),
            Ok(n) => data = data.get(n..).unwrap_or(&[]),
            Err(Errno::INTR) => {}
            Err(errno) => return Err(errno),
        }
    }
    Ok(())
}

/// The temporary file (or, for a tree, directory) a put writes, in the destination's
/// directory.
struct Temp<'d> {
    dir: BorrowedFd<'d>,
    file: OwnedFd,
    /// `O_TMPFILE`: no name until the commit links it.
    anonymous: bool,
    /// `.NAME.ferry-XXXXXXXX` and its NUL.
    name: [u8; 256],
    /// The name exists in the directory: it is removed unless the commit renamed it.
    named: Cell<bool>,
}

/// A destination's name is cut to this in its temporary file's name (`NAME_MAX` is 255).
const TEMP_NAME_PART: usize = 230;

impl<'d> Temp<'d> {
    #[inline(never)]
    fn create(dir: BorrowedFd<'d>, dest: &CStr, tree: bool) -> Result<Temp<'d>, Refusal> {
        let fail = |errno| failure(errno, "cannot create a temporary file");
        let random = crate::auth::nonce().map_err(fail)?;
        let mut hex = [0u8; 8];
        for (at, digit) in hex.iter_mut().enumerate() {
            let byte = random.get(at / 2).copied().unwrap_or(0);
            let nibble = if at % 2 == 0 { byte >> 4 } else { byte & 15 };
            *digit = b"0123456789abcdef"
                .get(usize::from(nibble))
                .copied()
                .unwrap_or(b'0');
        }
        let mut name = [0u8; 256];
        let dest = dest.to_bytes();
        let dest = dest.get(..TEMP_NAME_PART).unwrap_or(dest);
        let path = crate::cstr::join(&mut name, &[b".", dest, b".ferry-", &hex]);
        let path = path.ok_or(fail(Errno::INVAL))?;
        let (file, anonymous) = if tree {
            rustix::fs::mkdirat(dir, path, Mode::RWXU).map_err(fail)?;
            let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            match rustix::fs::openat(dir, path, flags, Mode::empty()) {
                Ok(file) => (file, false),
                Err(errno) => {
                    remove_tree(dir, path, 0);
                    return Err(fail(errno));
                }
            }
        } else {
            let mode = Mode::from_raw_mode(0o600);
            let flags = OFlags::WRONLY | OFlags::CLOEXEC;
            match rustix::fs::openat(dir, c".", flags | OFlags::TMPFILE, mode) {
                // Linked at the commit through /proc, which must be there.
                Ok(file) if proc_path(file.as_fd(), &mut [0u8; 32]).is_some() => (file, true),
                // The file system has no O_TMPFILE (or an old kernel says EISDIR), or no
                // /proc.
                Ok(_) | Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => {
                    let flags = flags | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW;
                    let file = rustix::fs::openat(dir, path, flags, mode).map_err(fail)?;
                    (file, false)
                }
                Err(errno) => return Err(fail(errno)),
            }
        };
        Ok(Temp {
            dir,
            file,
            named: Cell::new(!anonymous),
            anonymous,
            name,
        })
    }

    /// The temporary name.
    fn name(&self) -> Result<&CStr, Errno> {
        CStr::from_bytes_until_nul(&self.name).map_err(|_| Errno::INVAL)
    }

    /// The content checked out: the file gets its mode and time, is synced, and replaces
    /// the destination (or, with `no_clobber`, takes its name only if nothing has it). A
    /// tree's directory takes a name nothing has, and its file system is synced.
    #[inline(never)]
    fn commit(&self, dest: &CStr, options: &PutOptions) -> Result<(), Errno> {
        rustix::fs::fchmod(&self.file, Mode::from_raw_mode(options.mode))?;
        if let Some(mtime) = options.mtime {
            let times = Timestamps {
                last_access: Timespec {
                    tv_sec: 0,
                    tv_nsec: rustix::fs::UTIME_OMIT,
                },
                last_modification: Timespec {
                    tv_sec: mtime.secs,
                    tv_nsec: i64::from(mtime.nanos),
                },
            };
            rustix::fs::futimens(&self.file, &times)?;
        }
        match options.tree {
            true => rustix::fs::syncfs(&self.file)?,
            false => rustix::fs::fsync(&self.file)?,
        }
        let temp = self.name()?;
        if self.anonymous {
            let mut buf = [0u8; 32];
            let proc = proc_path(self.file.as_fd(), &mut buf).ok_or(Errno::NOENT)?;
            // No clobbering: linking fails on any existing name, atomically.
            let target = if options.no_clobber { dest } else { temp };
            rustix::fs::linkat(CWD, proc, self.dir, target, AtFlags::SYMLINK_FOLLOW)?;
            self.named.set(!options.no_clobber);
        }
        if self.named.get() {
            let flags = if options.no_clobber || options.tree {
                RenameFlags::NOREPLACE
            } else {
                RenameFlags::empty()
            };
            let renamed = match rustix::fs::renameat_with(self.dir, temp, self.dir, dest, flags) {
                // No RENAME_NOREPLACE here: a link fails on an existing name just as well
                // (the temporary name goes on drop). A directory cannot be linked: the
                // destination was checked missing.
                Err(Errno::INVAL) if options.tree => {
                    rustix::fs::renameat(self.dir, temp, self.dir, dest)
                }
                Err(Errno::INVAL) if options.no_clobber => {
                    return rustix::fs::linkat(self.dir, temp, self.dir, dest, AtFlags::empty())
                        .and_then(|()| rustix::fs::fsync(self.dir));
                }
                other => other,
            };
            renamed?;
            self.named.set(false);
        }
        rustix::fs::fsync(self.dir)
    }
}

impl Drop for Temp<'_> {
    fn drop(&mut self) {
        if let (true, Ok(name)) = (self.named.get(), self.name()) {
            remove_tree(self.dir, name, 0);
        }
    }
}

/// Removes `name` in `dir`, a directory with everything in it (`rm -r`), never following a
/// link. Best effort: what cannot be removed stays.
fn remove_tree(dir: BorrowedFd<'_>, name: &CStr, depth: u32) {
    // Deeper than any unpacked tree (`tar::MAX_DEPTH`): not ours.
    if depth > 80 || rustix::fs::unlinkat(dir, name, AtFlags::empty()) != Err(Errno::ISDIR) {
        return;
    }
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    if let Ok(sub) = rustix::fs::openat(dir, name, flags, Mode::empty()) {
        // A directory whose mode was applied early (0555) must still be emptied.
        let _ = rustix::fs::fchmod(&sub, Mode::RWXU);
        let mut buf = [MaybeUninit::<u8>::uninit(); 512];
        let mut entries = RawDir::new(&sub, &mut buf);
        while let Some(Ok(entry)) = entries.next() {
            if !matches!(entry.file_name().to_bytes(), b"." | b"..") {
                remove_tree(sub.as_fd(), entry.file_name(), depth + 1);
            }
        }
    }
    let _ = rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR);
}

/// `/proc/self/fd/N` for `file`, in `buf`, if `/proc` shows it.
fn proc_path<'b>(file: BorrowedFd<'_>, buf: &'b mut [u8; 32]) -> Option<&'b CStr> {
    let mut digits = [0u8; 10];
    let fd = users::decimal(file.as_raw_fd().unsigned_abs(), &mut digits);
    let path = crate::cstr::join(buf, &[b"/proc/self/fd/", fd])?;
    rustix::fs::statat(CWD, path, AtFlags::empty()).ok()?;
    Some(path)
}

// ---------------------------------------------------------------------------------------------
// Get.

#[inline(never)]
fn get(
    link: &mut Link<'_, '_>,
    session: &mut AgentSession,
    path: &[u8],
    tree: bool,
    stall_timeout: Micros,
    moved: &mut u64,
) -> Result<End, Refusal> {
    let fail = |errno| failure(errno, "cannot read the file");
    let path = sys::cstr_with_nul(path).ok_or(fail(Errno::INVAL))?;
    // Checked before the open too: opening a device can have effects (a tape rewinds, a
    // watchdog arms), and a FIFO's open would wait for a writer.
    let stat = rustix::fs::statat(CWD, path, AtFlags::empty()).map_err(fail)?;
    wrong_type(stat.st_mode, tree)?;
    let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK;
    let file = rustix::fs::openat(CWD, path, flags, Mode::empty()).map_err(fail)?;
    let stat = rustix::fs::fstat(&file).map_err(fail)?;
    wrong_type(stat.st_mode, tree)?;
    let header = stat_header(&stat, if tree { 0 } else { stat.st_size.unsigned_abs() });
    let mut source = match tree {
        true => Source::Tree(TreeWriter::new(file.as_fd()).map_err(tar_failure)?),
        false => Source::File(file),
    };
    let mut progress_at = clock::monotonic_us();
    if session.file_ready(header, progress_at).is_err() {
        return Ok(End::ClientGone);
    }
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    loop {
        // A tree's notes go between its data frames, when the outbox is empty.
        if !link.outbox.refill(session) && !link.outbox.put(|out| source.encode_note(session, out))
        {
            let read = link.outbox.file_data(session, |space| {
                let n = match &mut source {
                    Source::File(file) => read_some(file.as_fd(), space).map_err(fail)?,
                    Source::Tree(writer) => writer.read(space).map_err(tar_failure)?,
                };
                hasher.update(space.get(..n).unwrap_or(&[]));
                Ok(n)
            });
            match read? {
                // Or a tree's note is waiting.
                0 if link.outbox.put(|out| source.encode_note(session, out)) => {}
                0 => {
                    let summary = FileSummary {
                        bytes: total,
                        sha256: ByteArray(hasher.finalize()),
                    };
                    return Ok(match session.file_done(summary, clock::monotonic_us()) {
                        Ok(()) => End::Closing,
                        Err(_) => End::ClientGone,
                    });
                }
                n => {
                    total = total.saturating_add(n as u64);
                    *moved = total;
                }
            }
        }
        let before = link.outbox.pending();
        if link.flush().is_err() {
            return Ok(End::ClientGone);
        }
        let now = clock::monotonic_us();
        if link.outbox.pending() < before {
            progress_at = now;
        }
        if link.outbox.is_empty() {
            continue;
        }
        // The client does not take what is sent: it has the final-send timeout to start again.
        let give_up = progress_at.saturating_add(stall_timeout);
        if now >= give_up {
            return Ok(End::ClientGone);
        }
        let flags = if session.input_closed() {
            PollFlags::OUT
        } else {
            PollFlags::IN | PollFlags::OUT
        };
        let deadline = session.poll_timeout().map_or(give_up, |at| at.min(give_up));
        if link.wait(flags, Some(deadline)).is_err() {
            return Ok(End::ClientGone);
        }
        if !session.input_closed() {
            match link.receive() {
                // A get takes no frames: any whole one is a breach (the session queues its
                // error frame, behind the data already framed).
                Received::Data => {
                    if session.handle_input(link.inbox.data(), now).is_err() {
                        return Ok(End::Closing);
                    }
                }
                Received::Nothing => {}
                // A half-close: nothing more to read, the content still goes.
                Received::Closed => {
                    let _ = session.handle_eof();
                }
            }
        }
        let _ = session.handle_timeout(clock::monotonic_us());
    }
}

/// A get's source that is not of the type asked for.
#[inline(never)]
fn wrong_type(mode: u32, tree: bool) -> Result<(), Refusal> {
    match tree {
        true if !is_dir(mode) => Err(NOT_A_DIR),
        false if !is_regular(mode) => Err(NOT_A_FILE),
        _ => Ok(()),
    }
}

/// What a get reads: a file, or a directory as a tar stream.
// The writer's buffers are the large variant; the value lives once, on the stack.
#[allow(clippy::large_enum_variant)]
enum Source {
    File(OwnedFd),
    Tree(TreeWriter),
}

impl Source {
    /// Encodes a tree's note about the entry it just left out, if there is one (0 bytes if
    /// not).
    fn encode_note(
        &mut self,
        session: &mut AgentSession,
        out: &mut [u8],
    ) -> Result<usize, ferry_wire::session::SessionError> {
        match self {
            Source::Tree(writer) => match writer.take_skipped() {
                Some(note) => session.encode_skipped(note.path, note.reason, out),
                None => Ok(0),
            },
            Source::File(_) => Ok(0),
        }
    }
}

/// A file's header for `FileReady`, from its `stat`.
fn stat_header(stat: &rustix::fs::Stat, size: u64) -> FileHeader {
    FileHeader {
        size,
        mode: stat.st_mode,
        mtime: Timestamp {
            secs: stat.st_mtime,
            nanos: stat.st_mtime_nsec as u32,
        },
        uid: stat.st_uid,
        gid: stat.st_gid,
    }
}

fn is_regular(mode: u32) -> bool {
    FileType::from_raw_mode(mode) == FileType::RegularFile
}

fn is_dir(mode: u32) -> bool {
    FileType::from_raw_mode(mode) == FileType::Directory
}

/// Reads what `file` gives into `buf` (0 at its end).
fn read_some(file: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, Errno> {
    loop {
        match rustix::io::read(file, &mut *buf) {
            Err(Errno::INTR) => {}
            other => return other,
        }
    }
}
