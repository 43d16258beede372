//! File transfer (protocol 4's put and get of one file), in the connection process, as the
//! request's user: the process drops its privileges to that user before it touches a file (it
//! serves only this connection), so the kernel's permission checks are the user's own.
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

use core::ffi::CStr;

use ferry_wire::session::{AgentEvent, AgentSession, Micros, Refusal};
use ferry_wire::{
    ByteArray, ErrorCode, FileHeader, FileSummary, GetRequest, PutRequest, Timestamp, TransferKind,
};
use rustix::event::PollFlags;
use rustix::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags, Timespec, Timestamps, CWD};
use rustix::io::Errno;

use super::io::{Link, Received};
use super::start::{is_root, Prepared};
use super::End;
use crate::sha::Sha256;
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
    /// The path and its NUL, at the front of the connection's path buffer.
    path: &'b mut [u8],
    credentials: Credentials,
}

enum Kind {
    Put(PutOptions),
    Get,
}

struct PutOptions {
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
        let owner = match request.owner {
            Some(owner) => {
                let owner = users::authorize(policy::current(), Some(owner.0), is_root())?;
                Some((owner.uid, owner.gid))
            }
            None => None,
        };
        let options = PutOptions {
            mode: request.mode.unwrap_or(DEFAULT_MODE),
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
        if transfer == TransferKind::Tree {
            return Err(Refusal::new(
                ErrorCode::Unsupported,
                "tree transfers are not supported by this agent",
            ));
        }
        // The session checked it: absolute, no NUL, within MAX_PATH (the buffer's size less
        // its NUL).
        let too_long = Refusal::new(ErrorCode::LimitExceeded, "path too long");
        let path_buf = buf.get_mut(..=path.len()).ok_or(too_long)?;
        let (text, nul) = path_buf.split_at_mut(path.len());
        text.copy_from_slice(path);
        nul.fill(0);
        Ok(Transfer {
            kind,
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
                Kind::Put(options) => put(link, session, transfer.path, &options, &mut moved),
                Kind::Get => get(link, session, transfer.path, stall_timeout, &mut moved),
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

fn is_regular(mode: u32) -> bool {
    FileType::from_raw_mode(mode) == FileType::RegularFile
}

// ---------------------------------------------------------------------------------------------
// Put.

#[inline(never)]
fn put(
    link: &mut Link<'_, '_>,
    session: &mut AgentSession,
    path: &mut [u8],
    options: &PutOptions,
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
    match rustix::fs::statat(dir, name, AtFlags::empty()) {
        Ok(stat) if FileType::from_raw_mode(stat.st_mode) == FileType::Directory => {
            return Err(Refusal::new(
                ErrorCode::WrongFileType,
                "the destination is a directory",
            ))
        }
        Ok(stat) if !is_regular(stat.st_mode) => return Err(NOT_A_FILE),
        Ok(_) if options.no_clobber => {
            return Err(Refusal::new(
                ErrorCode::AlreadyExists,
                "the destination exists",
            ))
        }
        Ok(_) => {}
        Err(Errno::NOENT) => {}
        Err(errno) => return Err(failure(errno, "cannot reach the destination")),
    }
    let max = policy::current().max_file_size;
    let too_large = Refusal::new(
        ErrorCode::FileTooLarge,
        "larger than the agent's max_file_size",
    );
    if let Some(size) = options.size {
        if max > 0 && size > max {
            return Err(too_large);
        }
        if let Ok(space) = rustix::fs::fstatvfs(dir) {
            if size > space.f_bavail.saturating_mul(space.f_frsize) {
                return Err(Refusal::new(ErrorCode::NoSpace, "not enough free space"));
            }
        }
    }
    let mut temp = Temp::create(dir, name)?;
    let (uid, gid) = match options.owner {
        Some((uid, gid)) => {
            rustix::fs::fchown(
                &temp.file,
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
    let header = FileHeader {
        size: options.size.unwrap_or(0),
        mode: FileType::RegularFile.as_raw_mode() | options.mode,
        mtime: options.mtime.unwrap_or(Timestamp {
            secs: now.tv_sec,
            nanos: now.tv_nsec as u32,
        }),
        uid,
        gid,
    };
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
                    if max > 0 && total > max {
                        return Err(too_large);
                    }
                    if options.size.is_some_and(|size| total > size) {
                        return Err(Refusal::new(
                            ErrorCode::IntegrityMismatch,
                            "more content than its declared size",
                        ));
                    }
                    write_all(temp.file.as_fd(), data)
                        .map_err(|errno| failure(errno, "cannot write the file"))?;
                    hasher.update(data);
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
                    temp.commit(name, options)
                        .map_err(|errno| failure(errno, "cannot commit the file"))?;
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

/// The temporary file a put writes, in the destination's directory.
struct Temp<'d> {
    dir: BorrowedFd<'d>,
    file: OwnedFd,
    /// `O_TMPFILE`: no name until the commit links it.
    anonymous: bool,
    /// `.NAME.ferry-XXXXXXXX` and its NUL.
    name: heapless::Vec<u8, 256>,
    /// The name exists in the directory: it is removed unless the commit renamed it.
    named: bool,
}

/// A destination's name is cut to this in its temporary file's name (`NAME_MAX` is 255).
const TEMP_NAME_PART: usize = 230;

impl<'d> Temp<'d> {
    #[inline(never)]
    fn create(dir: BorrowedFd<'d>, dest: &CStr) -> Result<Temp<'d>, Refusal> {
        let fail = |errno| failure(errno, "cannot create a temporary file");
        let mut name = heapless::Vec::new();
        let dest = dest.to_bytes();
        let random = crate::auth::nonce().map_err(fail)?;
        let mut hex = [0u8; 8];
        for (pair, byte) in hex.chunks_mut(2).zip(random) {
            for (digit, nibble) in pair.iter_mut().zip([byte >> 4, byte & 15]) {
                *digit = b"0123456789abcdef"
                    .get(usize::from(nibble))
                    .copied()
                    .unwrap_or(b'0');
            }
        }
        for part in [
            b".",
            dest.get(..TEMP_NAME_PART).unwrap_or(dest),
            b".ferry-",
            &hex,
            b"\0",
        ] {
            let _ = name.extend_from_slice(part);
        }
        let mode = Mode::from_raw_mode(0o600);
        let flags = OFlags::WRONLY | OFlags::CLOEXEC;
        let anonymous = rustix::fs::openat(dir, c".", flags | OFlags::TMPFILE, mode);
        let (file, anonymous) = match anonymous {
            // Linked at the commit through /proc, which must be there.
            Ok(file) if proc_path(file.as_fd(), &mut [0u8; 32]).is_some() => (file, true),
            // The file system has no O_TMPFILE (or an old kernel says EISDIR), or no /proc.
            Ok(_) | Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => {
                let path = sys::cstr_with_nul(&name).ok_or(fail(Errno::INVAL))?;
                let flags = flags | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW;
                (
                    rustix::fs::openat(dir, path, flags, mode).map_err(fail)?,
                    false,
                )
            }
            Err(errno) => return Err(fail(errno)),
        };
        Ok(Temp {
            dir,
            file,
            named: !anonymous,
            anonymous,
            name,
        })
    }

    /// The content checked out: the file gets its mode and time, is synced, and replaces
    /// the destination (or, with `no_clobber`, takes its name only if nothing has it).
    #[inline(never)]
    fn commit(&mut self, dest: &CStr, options: &PutOptions) -> Result<(), Errno> {
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
        rustix::fs::fsync(&self.file)?;
        let temp = sys::cstr_with_nul(&self.name).ok_or(Errno::INVAL)?;
        if self.anonymous {
            let mut buf = [0u8; 32];
            let proc = proc_path(self.file.as_fd(), &mut buf).ok_or(Errno::NOENT)?;
            // No clobbering: linking fails on any existing name, atomically.
            let target = if options.no_clobber { dest } else { temp };
            rustix::fs::linkat(CWD, proc, self.dir, target, AtFlags::SYMLINK_FOLLOW)?;
            self.named = !options.no_clobber;
        }
        if self.named {
            let flags = if options.no_clobber {
                RenameFlags::NOREPLACE
            } else {
                RenameFlags::empty()
            };
            match rustix::fs::renameat_with(self.dir, temp, self.dir, dest, flags) {
                // No RENAME_NOREPLACE here: a link fails on an existing name just as well
                // (the temporary name goes on drop).
                Err(Errno::INVAL) if options.no_clobber => {
                    rustix::fs::linkat(self.dir, temp, self.dir, dest, AtFlags::empty())?
                }
                other => {
                    other?;
                    self.named = false;
                }
            }
        }
        rustix::fs::fsync(self.dir)
    }
}

impl Drop for Temp<'_> {
    fn drop(&mut self) {
        if let (true, Some(name)) = (self.named, sys::cstr_with_nul(&self.name)) {
            let _ = rustix::fs::unlinkat(self.dir, name, AtFlags::empty());
        }
    }
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
    stall_timeout: Micros,
    moved: &mut u64,
) -> Result<End, Refusal> {
    let fail = |errno| failure(errno, "cannot read the file");
    let path = sys::cstr_with_nul(path).ok_or(fail(Errno::INVAL))?;
    // Checked before the open too: opening a device can have effects (a tape rewinds, a
    // watchdog arms), and a FIFO's open would wait for a writer.
    let stat = rustix::fs::statat(CWD, path, AtFlags::empty()).map_err(fail)?;
    if !is_regular(stat.st_mode) {
        return Err(NOT_A_FILE);
    }
    let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK;
    let file = rustix::fs::openat(CWD, path, flags, Mode::empty()).map_err(fail)?;
    let stat = rustix::fs::fstat(&file).map_err(fail)?;
    if !is_regular(stat.st_mode) {
        return Err(NOT_A_FILE);
    }
    let header = FileHeader {
        size: stat.st_size.unsigned_abs(),
        mode: stat.st_mode,
        mtime: Timestamp {
            secs: stat.st_mtime,
            nanos: stat.st_mtime_nsec as u32,
        },
        uid: stat.st_uid,
        gid: stat.st_gid,
    };
    let mut progress_at = clock::monotonic_us();
    if session.file_ready(header, progress_at).is_err() {
        return Ok(End::ClientGone);
    }
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    loop {
        if !link.outbox.refill(session) {
            let read = link.outbox.file_data(session, |space| {
                let n = read_some(file.as_fd(), space)?;
                hasher.update(space.get(..n).unwrap_or(&[]));
                Ok(n)
            });
            match read.map_err(fail)? {
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

/// Reads what `file` gives into `buf` (0 at its end).
fn read_some(file: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, Errno> {
    loop {
        match rustix::io::read(file, &mut *buf) {
            Err(Errno::INTR) => {}
            other => return other,
        }
    }
}
