//! Tar streams for `ferry cp -r`: [`TreeWriter`] turns a directory into a POSIX ustar stream
//! (pax headers where ustar falls short), pulled like a pipe; [`Extractor`] unpacks a stream fed
//! in chunks of any size into a destination directory, never creating or changing anything
//! outside it. No allocation: fixed buffers, plus lazily mapped scratch pages for the
//! extractor's extension headers and deferred directory attributes.
//!
//! Decisions, for both directions:
//! - Paths are relative to the root, without `./`; the root itself is not an entry (its mode and
//!   time are the destination's business). An entry naming the root (`.`, `./`) is ignored if
//!   it is a directory and refused otherwise.
//! - Extracted modes keep the permission bits and the sticky bit (`MODE_MASK`); setuid and
//!   setgid are dropped: a copy is not a way to mint set-id programs. Modes are applied exactly
//!   (`fchmod`, no umask), like `tar -p`. The writer reports the real mode, set-id bits included.
//! - Owners are written (numeric uid/gid, octal; an id above 2,097,151 is written as that
//!   maximum, never in GNU base-256) but never applied: extraction runs with the requesting
//!   user's credentials, and what it creates is theirs. A size of 8 GiB or more goes in a pax
//!   `size` record (the ustar field then holds its maximum). The extractor reads octal and
//!   base-256 numbers.
//! - Extensions read: pax `path`, `linkpath`, `size` and `mtime` (others ignored, global
//!   headers too), GNU `L` long names and `K` long link targets. When an entry has several
//!   (a pax `path` and a GNU `L`), the latest header wins. Only the standard (unsigned)
//!   header checksum is accepted, not the signed one of some historic tars.
//! - NOTE: every parent path is resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//!   RESOLVE_NO_MAGICLINKS)`: a symlink anywhere in a parent path is refused
//!   ([`TarError::SymlinkInPath`]), whether it was in the destination already or made by the
//!   archive. Stricter than `RESOLVE_BENEATH` alone (which would allow links that stay inside),
//!   and simpler to reason about; the cost is that `lib/x` cannot be extracted into `/` when
//!   `/lib` is a symlink. Last components are created with `O_CREAT | O_EXCL` (an existing file
//!   or symlink is unlinked first, never opened), `mkdirat`, `symlinkat`: none follows a link.
//! - Directory modes and times are applied at [`Extractor::finish`], deepest first, so a
//!   read-only directory can still be filled. Their record holds [`DIR_RECORDS_BYTES`]; past
//!   it, a directory gets its mode and time at once (entries made in it later change the
//!   time).

use core::ffi::CStr;
use core::mem::MaybeUninit;

use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{AtFlags, Mode, OFlags, RawDir, ResolveFlags, SeekFrom, Timestamps};
use rustix::io::Errno;
use rustix::time::Timespec;

use crate::sys::{self, ScratchPages};
use ferry_wire::SkipReason;

/// A tar block: headers are one, data is padded to a multiple.
pub const BLOCK: usize = 512;
/// `PATH_MAX`: a path and its NUL. Archive paths are at most `MAX_PATH - 1` bytes.
pub const MAX_PATH: usize = 4096;
/// The most components an entry's path may have (`a/b` has two).
pub const MAX_DEPTH: usize = 64;
/// The largest pax extended header the extractor takes (room for a few xattrs).
pub const MAX_PAX: usize = 64 * 1024;
/// Room for the directories whose mode and time wait for [`Extractor::finish`]: each takes its
/// path, a NUL and [`DIR_TRAILER`] bytes.
pub const DIR_RECORDS_BYTES: usize = 1024 * 1024;
/// The mode bits extraction applies: permissions and sticky, not setuid/setgid.
pub const MODE_MASK: u32 = 0o1777;

/// The largest number an octal field of `len` bytes holds (`len - 1` digits and a NUL).
const fn octal_max(len: usize) -> u64 {
    (1 << (3 * (len - 1))) - 1
}
/// Sizes above this (8 GiB - 1) need a pax `size` record.
const MAX_USTAR_SIZE: u64 = octal_max(12);
/// A pax record for a path: `NNNN linkpath=` + value + `\n`, generously.
const PAX_PATH_RECORD: usize = MAX_PATH + 32;
/// The writer's pax data at most: path, linkpath and size records.
const MAX_WRITER_PAX: usize = 2 * PAX_PATH_RECORD + 64;
/// The writer's staging area: a pax header, its data (padded) and the ustar header.
const STAGING: usize = 2 * BLOCK + MAX_WRITER_PAX.div_ceil(BLOCK) * BLOCK;
/// A getdents buffer for one entry at least (`linux_dirent64` with a 255-byte name is 280
/// bytes, plus alignment).
const DIRENT_BUF: usize = 512;
/// Per deferred directory, after its path and NUL: seconds (8), then nanoseconds (4), mode (2)
/// and the length of the path with its NUL (2) as one little-endian `u64`.
const DIR_TRAILER: usize = 16;
/// The extractor's scratch pages: pax data, a GNU long name, a GNU long link, directory records.
const LONG_AREA: usize = MAX_PAX;
const DIR_AREA: usize = LONG_AREA + 2 * MAX_PATH;
const SCRATCH_LEN: usize = DIR_AREA + DIR_RECORDS_BYTES;
// A directory record's path length is 16 bits.
const _: () = assert!(MAX_PATH <= u16::MAX as usize);
const _: () = assert!(DIRENT_BUF >= 280 + 8);

/// `st_mode`'s file types.
const S_IFMT: u32 = 0o170_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;

/// What went wrong reading or writing a tar stream. Any of them ends the transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TarError {
    /// A system call failed (see the errno).
    Io(Errno),
    /// An entry's name is absolute, empty or has a `..` component.
    PathEscape,
    /// An entry's parent path runs through a symlink (never followed).
    SymlinkInPath,
    /// A path is longer than `MAX_PATH - 1` bytes.
    PathTooLong,
    /// A path has more than [`MAX_DEPTH`] components.
    TooDeep,
    /// A header's checksum is wrong.
    BadChecksum,
    /// A header field is malformed.
    BadHeader,
    /// A pax extended header is malformed.
    BadPax,
    /// A pax header or GNU long name is larger than its bound.
    ExtensionTooLarge,
    /// The stream ended inside a header or an entry.
    Truncated,
}

impl TarError {
    /// The message for the client.
    pub fn as_str(self) -> &'static str {
        match self {
            TarError::Io(_) => "tar: system call failed",
            TarError::PathEscape => "tar: path is absolute, empty or has '..'",
            TarError::SymlinkInPath => "tar: path runs through a symlink",
            TarError::PathTooLong => "tar: path too long",
            TarError::TooDeep => "tar: path nested too deep",
            TarError::BadChecksum => "tar: bad header checksum",
            TarError::BadHeader => "tar: malformed header",
            TarError::BadPax => "tar: malformed pax header",
            TarError::ExtensionTooLarge => "tar: extended header too large",
            TarError::Truncated => "tar: stream truncated",
        }
    }
}

impl From<Errno> for TarError {
    fn from(errno: Errno) -> Self {
        TarError::Io(errno)
    }
}

/// Entries passed over since the last [`TreeWriter::take_skipped`] or
/// [`Extractor::take_skipped`]: how many, and the path and reason of the last. The reader and
/// the extractor stop right after an entry they skip, so a driver that takes the note then
/// sees each one (a count of 1).
#[derive(Debug, PartialEq, Eq)]
pub struct Skipped<'a> {
    pub path: &'a [u8],
    pub count: u32,
    pub reason: SkipReason,
}

/// Produces a tar stream of a directory's contents, pulled through [`TreeWriter::read`].
pub struct TreeWriter {
    /// Open directories, the root first; the last is being listed.
    levels: heapless::Vec<Level, { MAX_DEPTH + 1 }>,
    /// The current entry's path (a directory's with its `/`).
    path: [u8; MAX_PATH],
    /// The current symlink's target.
    link: [u8; MAX_PATH],
    /// Headers ready to go out: `staging[staged..staged_end]`.
    staging: [u8; STAGING],
    staged: usize,
    staged_end: usize,
    /// The regular file whose data follows, `data_left` bytes of it still to send.
    file: Option<OwnedFd>,
    data_left: u64,
    /// Zero bytes to send next: a block's padding, or the two end blocks.
    zeros_left: usize,
    done: bool,
    changed: u32,
    skipped: Notes,
}

/// A directory being listed.
struct Level {
    fd: OwnedFd,
    /// Where `getdents` resumes (the last entry's `d_off`).
    cookie: u64,
    /// The length of its path prefix (`a/b/`) in `TreeWriter::path`.
    prefix: usize,
}

impl TreeWriter {
    /// A writer of everything under `root` (not `root` itself).
    pub fn new(root: BorrowedFd<'_>) -> Result<TreeWriter, TarError> {
        // A fresh open file description: its own getdents position.
        let fd = open_dir(root, c".")?;
        let mut levels = heapless::Vec::new();
        let _ = levels.push(Level {
            fd,
            cookie: 0,
            prefix: 0,
        });
        Ok(TreeWriter {
            levels,
            path: [0; MAX_PATH],
            link: [0; MAX_PATH],
            staging: [0; STAGING],
            staged: 0,
            staged_end: 0,
            file: None,
            data_left: 0,
            zeros_left: 0,
            done: false,
            changed: 0,
            skipped: Notes::new(),
        })
    }

    /// Fills `buf` with the stream's next bytes and returns how many: as many as fit, fewer
    /// only right after an entry was skipped ([`TreeWriter::take_skipped`] has it), 0 at the
    /// stream's end (after the two zero blocks) or with a note pending.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, TarError> {
        let mut n = 0;
        while let Some(out @ [_, ..]) = buf.get_mut(n..) {
            if self.skipped.count > 0 {
                break;
            } else if let Some(staged @ [_, ..]) = self.staging.get(self.staged..self.staged_end) {
                let k = copy_prefix(out, staged);
                self.staged += k;
                n += k;
            } else if self.data_left > 0 {
                let out = out
                    .get_mut(..clamp(self.data_left, out.len()))
                    .unwrap_or_default();
                let got = match &self.file {
                    Some(file) => match rustix::io::read(file, &mut *out) {
                        Err(Errno::INTR) => continue,
                        got => got?,
                    },
                    None => 0,
                };
                let got = if got == 0 {
                    // Shrunk since its header was written: zeros keep the stream valid.
                    if self.file.take().is_some() {
                        self.changed = self.changed.saturating_add(1);
                    }
                    out.fill(0);
                    out.len()
                } else {
                    got
                };
                self.data_left -= got as u64;
                n += got;
                if self.data_left == 0 {
                    // Grown since: cut at the header's size, and counted.
                    if let Some(file) = self.file.take() {
                        if rustix::io::read(file, &mut [0u8]) == Ok(1) {
                            self.changed = self.changed.saturating_add(1);
                        }
                    }
                }
            } else if self.zeros_left > 0 {
                let k = self.zeros_left.min(out.len());
                out.get_mut(..k).unwrap_or_default().fill(0);
                self.zeros_left -= k;
                n += k;
            } else if self.done {
                break;
            } else if !self.next_entry()? {
                self.done = true;
                self.zeros_left = 2 * BLOCK;
            }
        }
        Ok(n)
    }

    /// The entries skipped since the last call (device nodes, sockets, fifos, and files that
    /// vanished or could not be opened), if any.
    pub fn take_skipped(&mut self) -> Option<Skipped<'_>> {
        self.skipped.take()
    }

    /// How many files changed size while being read: a file that shrank has its data padded
    /// with zeros to the size in its header, one that grew is cut at that size.
    // NOTE: not surfaced yet: the protocol has no frame for it (the stream stays valid).
    #[cfg(test)]
    pub fn changed(&self) -> u32 {
        self.changed
    }

    /// Finds the next entry and stages its headers: `false` when the walk is over.
    #[inline(never)]
    fn next_entry(&mut self) -> Result<bool, TarError> {
        loop {
            let depth = self.levels.len();
            let Some(level) = self.levels.last_mut() else {
                return Ok(false);
            };
            rustix::fs::seek(&level.fd, SeekFrom::Start(level.cookie))?;
            let mut dirents = [MaybeUninit::<u8>::uninit(); DIRENT_BUF];
            let mut dir = RawDir::new(level.fd.as_fd(), &mut dirents);
            let Some(entry) = dir.next() else {
                self.levels.pop();
                continue;
            };
            let entry = entry?;
            level.cookie = entry.next_entry_cookie();
            let name = entry.file_name();
            let bytes = name.to_bytes();
            if bytes == b"." || bytes == b".." {
                continue;
            }
            let end = level.prefix + bytes.len();
            let slot = self.path.get_mut(level.prefix..=end);
            let Some((slash, slot)) = slot.and_then(|slot| slot.split_last_mut()) else {
                // No room for the name and a `/` or NUL after it.
                return Err(TarError::PathTooLong);
            };
            slot.copy_from_slice(bytes);
            if depth > MAX_DEPTH {
                return Err(TarError::TooDeep);
            }
            let dirfd = level.fd.as_fd();
            let stat = rustix::fs::statat(dirfd, name, AtFlags::SYMLINK_NOFOLLOW);
            let mut meta = match stat {
                Ok(stat) => Meta::of(&stat),
                Err(errno) => return self.skip(end, errno),
            };
            let mut name_len = end;
            let mut link_len = 0;
            if meta.kind == b'2' {
                match rustix::fs::readlinkat_raw(dirfd, name, &mut self.link[..]) {
                    Ok(len) if len < MAX_PATH => link_len = len,
                    Ok(_) => return Err(TarError::PathTooLong),
                    Err(errno) => return self.skip(end, errno),
                }
            } else if meta.kind == b'5' || meta.kind == b'0' {
                // Opened without following a link; a device is never opened (`statat` said
                // what it is), and anything swapped in since is skipped.
                let flags = OFlags::RDONLY
                    | OFlags::NOFOLLOW
                    | OFlags::CLOEXEC
                    | OFlags::NOCTTY
                    | OFlags::NONBLOCK;
                let opened = rustix::fs::openat(dirfd, name, flags, Mode::empty())
                    .and_then(|fd| Ok((rustix::fs::fstat(&fd)?, fd)));
                let fd = match opened {
                    Ok((stat, fd)) if Meta::of(&stat).kind == meta.kind => {
                        meta = Meta::of(&stat);
                        fd
                    }
                    Ok(_) => return self.skip(end, Errno::NOENT),
                    Err(errno) => return self.skip(end, errno),
                };
                if meta.kind == b'5' {
                    *slash = b'/';
                    name_len += 1;
                    let level = Level {
                        fd,
                        cookie: 0,
                        prefix: name_len,
                    };
                    self.levels.push(level).map_err(|_| TarError::TooDeep)?;
                } else {
                    self.data_left = meta.size;
                    self.zeros_left = padding(meta.size);
                    self.file = Some(fd);
                }
            } else {
                let path = self.path.get(..end).unwrap_or_default();
                self.skipped.note(path, SkipReason::Special);
                return Ok(true);
            }
            let name = self.path.get(..name_len).unwrap_or_default();
            let link = self.link.get(..link_len).unwrap_or_default();
            self.staged_end =
                stage_headers(&mut self.staging, name, link, &meta).ok_or(TarError::PathTooLong)?;
            self.staged = 0;
            return Ok(true);
        }
    }

    /// Passes over the entry at `path[..end]` that could not be read: noted when it vanished
    /// or is not ours to read (the walk goes on), an error otherwise.
    fn skip(&mut self, end: usize, errno: Errno) -> Result<bool, TarError> {
        if !matches!(errno, Errno::NOENT | Errno::ACCESS | Errno::PERM) {
            return Err(errno.into());
        }
        let path = self.path.get(..end).unwrap_or_default();
        self.skipped.note(path, SkipReason::Unreadable);
        Ok(true)
    }
}

/// What a ustar header says besides the names.
struct Meta {
    kind: u8,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: u64,
}

impl Meta {
    /// A file's header fields; its kind `0` (file), `5`, `2`, or `?` for what is not written.
    fn of(stat: &rustix::fs::Stat) -> Meta {
        let (kind, size) = match stat.st_mode & S_IFMT {
            S_IFREG => (b'0', stat.st_size as u64),
            S_IFDIR => (b'5', 0),
            S_IFLNK => (b'2', 0),
            _ => (b'?', 0),
        };
        Meta {
            kind,
            mode: stat.st_mode & 0o7777,
            uid: stat.st_uid,
            gid: stat.st_gid,
            size,
            // Before 1970: written as 1970.
            mtime: stat.st_mtime.max(0) as u64,
        }
    }
}

/// Writes the headers for one entry at the start of `out` (a pax header and its data when
/// ustar cannot hold the name, the link or the size, then the ustar header); returns their
/// length, `None` when they do not fit.
fn stage_headers(out: &mut [u8], name: &[u8], link: &[u8], meta: &Meta) -> Option<usize> {
    let split = ustar_split(name);
    let mut at = 0;
    let mut len = 0;
    let data = out.get_mut(BLOCK..)?;
    if split.is_none() {
        len = pax_record(data, len, b"path", name)?;
    }
    if link.len() > 100 {
        len = pax_record(data, len, b"linkpath", link)?;
    }
    if meta.size > MAX_USTAR_SIZE {
        let mut digits = [0u8; 20];
        let size = digits.get_mut(20 - decimal_len(meta.size)..)?;
        put_digits(size, meta.size, 10);
        len = pax_record(data, len, b"size", size)?;
    }
    if len > 0 {
        let padded = len.div_ceil(BLOCK) * BLOCK;
        data.get_mut(len..padded)?.fill(0);
        let pax = Meta {
            kind: b'x',
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: len as u64,
            mtime: meta.mtime,
        };
        ustar_header(out.get_mut(..BLOCK)?, (b"", b"././@PaxHeader"), b"", &pax);
        at = BLOCK + padded;
    }
    let names = split.unwrap_or((b"", name));
    ustar_header(out.get_mut(at..at + BLOCK)?, names, link, meta);
    Some(at + BLOCK)
}

/// A ustar header in `block` (`BLOCK` bytes) for the (prefix, name). What is too long is cut
/// (a pax record carries it whole).
fn ustar_header(block: &mut [u8], (prefix, name): (&[u8], &[u8]), link: &[u8], meta: &Meta) {
    let Ok(block) = <&mut [u8; BLOCK]>::try_from(block) else {
        return;
    };
    block.fill(0);
    copy_prefix(&mut block[0..100], name);
    put_octal(&mut block[100..108], u64::from(meta.mode));
    put_octal(&mut block[108..116], u64::from(meta.uid));
    put_octal(&mut block[116..124], u64::from(meta.gid));
    put_octal(&mut block[124..136], meta.size);
    put_octal(&mut block[136..148], meta.mtime);
    block[156] = meta.kind;
    copy_prefix(&mut block[157..257], link);
    block[257..265].copy_from_slice(b"ustar\x0000");
    copy_prefix(&mut block[345..500], prefix);
    // Six digits, a NUL and a space.
    let sum = checksum(block);
    put_octal(&mut block[148..155], sum);
    block[155] = b' ';
}

/// A header's checksum: the sum of its bytes, the checksum field counted as spaces.
#[inline(never)]
fn checksum(block: &[u8; BLOCK]) -> u64 {
    let mut sum = 0;
    for (i, &b) in block.iter().enumerate() {
        sum += u64::from(if (148..156).contains(&i) { b' ' } else { b });
    }
    sum
}

/// `name` as ustar's (prefix, name) when it fits: at most 100 bytes, or split at a `/` into at
/// most 155 and 100.
fn ustar_split(name: &[u8]) -> Option<(&[u8], &[u8])> {
    if name.len() <= 100 {
        return Some((b"", name));
    }
    // The first `/` that leaves at most 100 bytes after it, if at most 155 come before it.
    let from = name.len() - 101;
    let slash = from + name.get(from..)?.iter().position(|&b| b == b'/')?;
    if slash > 155 {
        return None;
    }
    Some((name.get(..slash)?, name.get(slash + 1..)?))
}

/// An octal header field: zero-padded digits and a NUL, the value clamped to the most they
/// hold.
#[inline(never)]
fn put_octal(field: &mut [u8], value: u64) {
    if let Some((nul, digits)) = field.split_last_mut() {
        *nul = 0;
        let max = octal_max(digits.len() + 1);
        put_digits(digits, value.min(max), 8);
    }
}

/// `value` in `base`, zero-padded to fill `field` (higher digits are lost).
#[inline(never)]
fn put_digits(field: &mut [u8], mut value: u64, base: u64) {
    for digit in field.iter_mut().rev() {
        *digit = b'0' + (value % base) as u8;
        value /= base;
    }
}

/// How many decimal digits `value` has.
fn decimal_len(mut value: u64) -> usize {
    let mut len = 1;
    while value >= 10 {
        value /= 10;
        len += 1;
    }
    len
}

/// Appends the pax record `LEN key=value\n` at `data[at..]`; returns the new end.
fn pax_record(data: &mut [u8], at: usize, key: &[u8], value: &[u8]) -> Option<usize> {
    let body = key.len() + value.len() + 3;
    // One more digit when counting the length's own digits carries it over a power of ten.
    let len = body + decimal_len((body + decimal_len(body as u64)) as u64);
    let mut end = at + (len - body);
    put_digits(data.get_mut(at..end)?, len as u64, 10);
    for part in [&b" "[..], key, b"=", value, b"\n"] {
        let next = end + part.len();
        data.get_mut(end..next)?.copy_from_slice(part);
        end = next;
    }
    Some(end)
}

/// Unpacks a tar stream fed in pieces into a destination directory.
pub struct Extractor<'d> {
    dest: BorrowedFd<'d>,
    scratch: ScratchPages,
    /// The header being gathered: `block[..block_len]`.
    block: [u8; BLOCK],
    block_len: usize,
    /// The current entry's data still to come, where it goes, and the padding after it.
    data_left: u64,
    sink: Sink,
    pad_left: u64,
    file: Option<OwnedFd>,
    /// Bytes gathered into the sink's scratch area.
    area_len: usize,
    /// The next entry's path and link target from extension headers: (start, length) in
    /// `scratch`.
    names: [Option<(usize, usize)>; 2],
    pax_size: Option<u64>,
    pax_mtime: Option<Timespec>,
    /// The file being written gets these when its data is complete.
    mode: u32,
    mtime: Timespec,
    /// Bytes used in the scratch pages' directory records.
    dir_records: usize,
    /// A regular file larger than this is refused (`EFBIG`); 0: no limit.
    max_file_size: u64,
    /// A zero block was seen: the archive is over.
    ended: bool,
    /// The entry's normalized path, NUL-terminated.
    path: [u8; MAX_PATH],
    /// The symlink's target, NUL-terminated.
    link: [u8; MAX_PATH],
    skipped: Notes,
}

/// Where an entry's data goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sink {
    Discard,
    File,
    Pax,
    /// A GNU long name (0) or long link target (1).
    Long(usize),
}

/// How every path under the destination is resolved (see the module's doc).
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

impl<'d> Extractor<'d> {
    /// An extractor into `dest`, a directory.
    pub fn new(dest: BorrowedFd<'d>) -> Extractor<'d> {
        Extractor {
            dest,
            scratch: ScratchPages::new(SCRATCH_LEN),
            block: [0; BLOCK],
            block_len: 0,
            data_left: 0,
            sink: Sink::Discard,
            pad_left: 0,
            file: None,
            area_len: 0,
            names: [None; 2],
            pax_size: None,
            pax_mtime: None,
            mode: 0,
            mtime: Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            dir_records: 0,
            max_file_size: 0,
            ended: false,
            path: [0; MAX_PATH],
            link: [0; MAX_PATH],
            skipped: Notes::new(),
        }
    }

    /// Takes the stream's next bytes, any amount, and returns how many it consumed: all of
    /// them, unless it stopped right after an entry it skipped ([`Extractor::take_skipped`]
    /// has it; feed it the rest). Bytes after the end blocks are consumed and ignored. After
    /// an error the extraction is over.
    pub fn feed(&mut self, mut input: &[u8]) -> Result<usize, TarError> {
        let len = input.len();
        while !input.is_empty() && !self.ended && self.skipped.count == 0 {
            if self.data_left > 0 {
                let n = clamp(self.data_left, input.len());
                let (chunk, rest) = input.split_at_checked(n).unwrap_or((input, &[]));
                self.consume(chunk)?;
                self.data_left -= n as u64;
                input = rest;
                if self.data_left == 0 {
                    self.end_of_data()?;
                }
            } else if self.pad_left > 0 {
                let n = clamp(self.pad_left, input.len());
                self.pad_left -= n as u64;
                input = input.get(n..).unwrap_or_default();
            } else {
                let room = self.block.get_mut(self.block_len..).unwrap_or_default();
                let n = copy_prefix(room, input);
                self.block_len += n;
                input = input.get(n..).unwrap_or_default();
                if self.block_len == BLOCK {
                    self.block_len = 0;
                    self.header()?;
                }
            }
        }
        Ok(if self.ended { len } else { len - input.len() })
    }

    /// Ends the stream: an error if it stopped inside a header or an entry (the end blocks
    /// are optional); applies the directories' modes and times.
    pub fn finish(&mut self) -> Result<(), TarError> {
        if self.block_len != 0 || self.data_left != 0 || self.pad_left != 0 {
            return Err(TarError::Truncated);
        }
        let mut end = core::mem::take(&mut self.dir_records);
        let records = self.scratch.bytes()?.get(DIR_AREA..).unwrap_or_default();
        // Deepest (latest) first: a parent's mode may forbid reaching its children.
        while let Some(trailer_at) = end.checked_sub(DIR_TRAILER) {
            let mut trailer = [0; DIR_TRAILER];
            copy_prefix(&mut trailer, records.get(trailer_at..).unwrap_or_default());
            let trailer = u128::from_le_bytes(trailer);
            let start = trailer_at.checked_sub((trailer >> 112) as usize);
            let path = start.and_then(|start| records.get(start..trailer_at));
            let mtime = Timespec {
                tv_sec: trailer as i64,
                tv_nsec: i64::from((trailer >> 64) as u32),
            };
            let path = path
                .and_then(sys::cstr_with_nul)
                .ok_or(TarError::BadHeader)?;
            set_dir(self.dest, path, (trailer >> 96) as u32 & 0xffff, mtime)?;
            end = start.unwrap_or_default();
        }
        Ok(())
    }

    /// Refuses regular files larger than `max` bytes (0: no limit) with `EFBIG`, at their
    /// header, before a byte of theirs is written.
    pub fn limit_file_size(&mut self, max: u64) {
        self.max_file_size = max;
    }

    /// The entries skipped since the last call (hard links, devices, fifos, unknown types), if
    /// any.
    pub fn take_skipped(&mut self) -> Option<Skipped<'_>> {
        self.skipped.take()
    }

    /// Writes an entry's data to its sink.
    fn consume(&mut self, chunk: &[u8]) -> Result<(), TarError> {
        let area = match self.sink {
            Sink::Discard => return Ok(()),
            Sink::File => {
                if let Some(file) = &self.file {
                    write_all(file.as_fd(), chunk)?;
                }
                return Ok(());
            }
            Sink::Pax => 0,
            Sink::Long(which) => LONG_AREA + which * MAX_PATH,
        };
        // `start` checked the size against the area's.
        let at = area + self.area_len;
        let slot = self.scratch.bytes()?.get_mut(at..at + chunk.len());
        slot.ok_or(TarError::ExtensionTooLarge)?
            .copy_from_slice(chunk);
        self.area_len += chunk.len();
        Ok(())
    }

    /// An entry's data is complete.
    fn end_of_data(&mut self) -> Result<(), TarError> {
        match core::mem::replace(&mut self.sink, Sink::Discard) {
            Sink::Discard => {}
            Sink::File => {
                if let Some(file) = self.file.take() {
                    rustix::fs::fchmod(&file, Mode::from_raw_mode(self.mode))?;
                    rustix::fs::futimens(&file, &times(self.mtime))?;
                }
            }
            Sink::Pax => self.parse_pax()?,
            Sink::Long(which) => {
                let at = LONG_AREA + which * MAX_PATH;
                let bytes = self.scratch.bytes()?.get(at..at + self.area_len);
                // Without its trailing NULs.
                let len = until_nul(bytes.unwrap_or_default()).len();
                if let Some(name) = self.names.get_mut(which) {
                    *name = Some((at, len));
                }
            }
        }
        Ok(())
    }

    /// Sets up an entry's data: `size` bytes to `sink`.
    fn start(&mut self, sink: Sink, size: u64) -> Result<(), TarError> {
        self.sink = sink;
        self.area_len = 0;
        self.data_left = size;
        self.pad_left = padding(size) as u64;
        if size == 0 {
            self.end_of_data()?;
        }
        Ok(())
    }

    /// A complete header block.
    fn header(&mut self) -> Result<(), TarError> {
        let sum = checksum(&self.block);
        if sum == 8 * u64::from(b' ') {
            // A zero block (the checksum field aside).
            self.ended = true;
            return Ok(());
        }
        if parse_number(&self.block[148..156])? != sum {
            return Err(TarError::BadChecksum);
        }
        let size = parse_number(&self.block[124..136])?;
        let (sink, max) = match self.block[156] {
            b'x' => {
                // New pax data: what pointed into the previous is gone.
                for name in &mut self.names {
                    if name.is_some_and(|(start, _)| start < LONG_AREA) {
                        *name = None;
                    }
                }
                self.pax_size = None;
                self.pax_mtime = None;
                (Sink::Pax, MAX_PAX)
            }
            b'g' => (Sink::Discard, usize::MAX),
            b'L' => (Sink::Long(0), MAX_PATH),
            b'K' => (Sink::Long(1), MAX_PATH),
            kind => return self.entry(kind, size),
        };
        if size > max as u64 {
            return Err(TarError::ExtensionTooLarge);
        }
        self.start(sink, size)
    }

    /// An entry proper (not an extension header): created, or skipped with a note.
    #[inline(never)]
    fn entry(&mut self, kind: u8, size: u64) -> Result<(), TarError> {
        let block = &self.block;
        let size = self.pax_size.take().unwrap_or(size);
        let mtime = Timespec {
            tv_sec: parse_number(&block[136..148])?.min(i64::MAX as u64) as i64,
            tv_nsec: 0,
        };
        let mtime = self.pax_mtime.take().unwrap_or(mtime);
        let mode = parse_number(&block[100..108])? as u32 & MODE_MASK;
        let [name, link] = core::mem::take(&mut self.names);
        let scratch: &[u8] = self.scratch.bytes()?;
        let area = |range: Option<(usize, usize)>| {
            range.and_then(|(start, len)| scratch.get(start..start.checked_add(len)?))
        };
        let prefix = if block[257..263] == *b"ustar\0" {
            until_nul(&block[345..500])
        } else {
            b""
        };
        let names = match area(name) {
            Some(name) => [name, b""],
            None => [prefix, until_nul(&block[0..100])],
        };
        let (len, slash) = normalize(&mut self.path, names)?;
        let reason = match kind {
            b'1' => SkipReason::HardLink,
            b'3' | b'4' | b'6' => SkipReason::Special,
            _ => SkipReason::UnknownType,
        };
        let kind = match kind {
            b'0' | b'\0' | b'7' => b'0',
            b'5' => b'5',
            b'2' => {
                let link = area(link).unwrap_or(until_nul(&block[157..257]));
                // A NUL-terminated copy, checked now: the target is used after `open_parent`.
                let target = self.link.get_mut(..=link.len());
                let (nul, text) = target
                    .and_then(|target| target.split_last_mut())
                    .ok_or(TarError::PathTooLong)?;
                text.copy_from_slice(link);
                *nul = 0;
                if link.is_empty() || link.contains(&0) {
                    return Err(TarError::BadHeader);
                }
                b'2'
            }
            _ => 0,
        };
        if kind == b'0' && self.max_file_size > 0 && size > self.max_file_size {
            return Err(Errno::FBIG.into());
        }
        if len == 0 {
            // The root: the destination keeps its own mode and time.
            if kind != b'5' {
                return Err(TarError::PathEscape);
            }
        } else if kind == 0 {
            self.skipped
                .note(self.path.get(..len).unwrap_or_default(), reason);
        } else {
            // Recorded before `open_parent`, which cuts the path into components.
            let recorded = kind == b'5' && self.record_dir(len, mode, mtime)?;
            let parent = open_parent(self.dest, &mut self.path, slash)?;
            let at = parent.as_ref().map_or(self.dest, |fd| fd.as_fd());
            let leaf = cstr_in(&self.path, slash.map_or(0, |slash| slash + 1), len)?;
            // What is there is replaced, like tar does: never opened or followed.
            let mut replaced = false;
            loop {
                let made = match kind {
                    b'0' => {
                        let flags = OFlags::WRONLY
                            | OFlags::CREATE
                            | OFlags::EXCL
                            | OFlags::NOFOLLOW
                            | OFlags::CLOEXEC
                            | OFlags::NOCTTY;
                        rustix::fs::openat(at, leaf, flags, Mode::RUSR | Mode::WUSR)
                            .map(|file| self.file = Some(file))
                    }
                    // Owner-writable until `finish` gives it its own mode.
                    b'5' => rustix::fs::mkdirat(at, leaf, Mode::RWXU),
                    _ => rustix::fs::symlinkat(cstr_in(&self.link, 0, self.link_len())?, at, leaf),
                };
                match made {
                    Err(Errno::EXIST) if !replaced => {
                        replaced = true;
                        match rustix::fs::unlinkat(at, leaf, AtFlags::empty()) {
                            // A directory stays, with its contents.
                            Err(Errno::ISDIR) if kind == b'5' => break,
                            unlinked => unlinked?,
                        }
                    }
                    made => break made?,
                }
            }
            if kind == b'2' {
                rustix::fs::utimensat(at, leaf, &times(mtime), AtFlags::SYMLINK_NOFOLLOW)?;
            } else if kind == b'5' && !recorded {
                set_dir(at, leaf, mode, mtime)?;
            }
        }
        self.mode = mode;
        self.mtime = mtime;
        let sink = if self.file.is_some() {
            Sink::File
        } else {
            Sink::Discard
        };
        self.start(sink, size)
    }

    /// The symlink target's length in `link`.
    fn link_len(&self) -> usize {
        self.link.iter().position(|&b| b == 0).unwrap_or(0)
    }

    /// Keeps the directory at `path[..len]`'s mode and time for `finish`; `false` when the
    /// records are full.
    fn record_dir(&mut self, len: usize, mode: u32, mtime: Timespec) -> Result<bool, TarError> {
        let at = DIR_AREA + self.dir_records;
        let record = len + 1 + DIR_TRAILER;
        let Some(slot) = self.scratch.bytes()?.get_mut(at..at + record) else {
            return Ok(false);
        };
        let trailer = u128::from(mtime.tv_sec as u64)
            | u128::from(mtime.tv_nsec as u32) << 64
            | u128::from(mode) << 96
            | ((len + 1) as u128) << 112;
        let path_end = copy_prefix(slot, self.path.get(..=len).unwrap_or_default());
        copy_prefix(
            slot.get_mut(path_end..).unwrap_or_default(),
            &trailer.to_le_bytes(),
        );
        self.dir_records += record;
        Ok(true)
    }

    /// A pax extended header's records: the ones for the next entry are kept. A record with
    /// an empty value is ignored (the header's field stands).
    #[inline(never)]
    fn parse_pax(&mut self) -> Result<(), TarError> {
        let data = self.scratch.bytes()?.get(..self.area_len);
        let data = data.unwrap_or_default();
        let mut at = 0;
        while let Some(rest @ [_, ..]) = data.get(at..) {
            let space = rest.iter().position(|&b| b == b' ');
            let space = space.ok_or(TarError::BadPax)?;
            let len = rest
                .get(..space)
                .and_then(|digits| parse_digits(digits, 10));
            let record = len.and_then(|len| rest.get(..usize::try_from(len).ok()?));
            let Some([body @ .., b'\n']) = record else {
                return Err(TarError::BadPax);
            };
            let pair = body.get(space + 1..).ok_or(TarError::BadPax)?;
            let eq = pair.iter().position(|&b| b == b'=');
            let eq = eq.ok_or(TarError::BadPax)?;
            let value = pair.get(eq + 1..).unwrap_or_default();
            let name = Some((at + space + 1 + eq + 1, value.len()));
            match pair.get(..eq).unwrap_or_default() {
                _ if value.is_empty() => {}
                b"path" => self.names[0] = name,
                b"linkpath" => self.names[1] = name,
                b"size" => self.pax_size = Some(parse_digits(value, 10).ok_or(TarError::BadPax)?),
                b"mtime" => self.pax_mtime = Some(parse_time(value).ok_or(TarError::BadPax)?),
                _ => {}
            }
            at += body.len() + 1;
        }
        Ok(())
    }
}

/// Opens the parent directory of the entry in `path` (its last `/` at `slash`; `None` for
/// `dest` itself), creating missing directories. Cuts `path[..slash]` into NUL-separated
/// components.
#[inline(never)]
fn open_parent(
    dest: BorrowedFd<'_>,
    path: &mut [u8; MAX_PATH],
    slash: Option<usize>,
) -> Result<Option<OwnedFd>, TarError> {
    let Some(slash) = slash else {
        return Ok(None);
    };
    let parent = path.get_mut(..=slash).ok_or(TarError::PathTooLong)?;
    if let Some(nul) = parent.last_mut() {
        *nul = 0;
    }
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let whole = sys::cstr_with_nul(parent).ok_or(TarError::BadHeader)?;
    match rustix::fs::openat2(dest, whole, flags, Mode::empty(), RESOLVE) {
        Err(Errno::NOENT) => {}
        opened => return opened.map(Some).map_err(resolve_error),
    }
    // Missing directories are made (as `tar` does for archives that list files only), one
    // component at a time, each opened as strictly as the whole.
    for byte in parent.iter_mut() {
        if *byte == b'/' {
            *byte = 0;
        }
    }
    let mut dir: Option<OwnedFd> = None;
    for component in parent.split_inclusive(|&b| b == 0) {
        let at = dir.as_ref().map_or(dest, |fd| fd.as_fd());
        let name = sys::cstr_with_nul(component).ok_or(TarError::BadHeader)?;
        match rustix::fs::mkdirat(at, name, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(errno) => return Err(errno.into()),
        }
        let opened = rustix::fs::openat2(at, name, flags, Mode::empty(), RESOLVE);
        dir = Some(opened.map_err(resolve_error)?);
    }
    Ok(dir)
}

/// Joins `pieces` (each `/`-separated) into `out` as a relative path without empty or `.`
/// components, NUL-terminated; returns its length and its last `/`. Refuses absolute paths,
/// `..` and bounds exceeded.
fn normalize(
    out: &mut [u8; MAX_PATH],
    pieces: [&[u8]; 2],
) -> Result<(usize, Option<usize>), TarError> {
    let first = pieces.iter().find(|piece| !piece.is_empty());
    if first.is_none_or(|piece| piece.first() == Some(&b'/')) {
        return Err(TarError::PathEscape);
    }
    let (mut len, mut slash, mut depth) = (0, None, 0);
    for piece in pieces {
        for component in piece.split(|&b| b == b'/') {
            match component {
                b"" | b"." => continue,
                b".." => return Err(TarError::PathEscape),
                _ => {}
            }
            depth += 1;
            if depth > MAX_DEPTH {
                return Err(TarError::TooDeep);
            }
            if len > 0 {
                slash = Some(len);
                *out.get_mut(len).ok_or(TarError::PathTooLong)? = b'/';
                len += 1;
            }
            let end = len + component.len();
            let slot = out.get_mut(len..end).ok_or(TarError::PathTooLong)?;
            slot.copy_from_slice(component);
            len = end;
        }
    }
    // Room for the NUL: at most `MAX_PATH - 1` bytes of path.
    *out.get_mut(len).ok_or(TarError::PathTooLong)? = 0;
    Ok((len, slash))
}

/// `buf[start..=end]` as a C string (`buf[end]` is its NUL).
fn cstr_in(buf: &[u8], start: usize, end: usize) -> Result<&CStr, TarError> {
    let bytes = buf.get(start..=end).ok_or(TarError::PathTooLong)?;
    sys::cstr_with_nul(bytes).ok_or(TarError::BadHeader)
}

/// Sets a directory's mode and modification time.
fn set_dir(at: BorrowedFd<'_>, path: &CStr, mode: u32, mtime: Timespec) -> Result<(), TarError> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let dir =
        rustix::fs::openat2(at, path, flags, Mode::empty(), RESOLVE).map_err(resolve_error)?;
    rustix::fs::fchmod(&dir, Mode::from_raw_mode(mode))?;
    rustix::fs::futimens(&dir, &times(mtime))?;
    Ok(())
}

/// `openat2`'s refusals as what they mean here.
fn resolve_error(errno: Errno) -> TarError {
    match errno {
        Errno::LOOP => TarError::SymlinkInPath,
        Errno::XDEV => TarError::PathEscape,
        errno => TarError::Io(errno),
    }
}

/// The access time left alone, the modification time set.
fn times(mtime: Timespec) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        last_modification: mtime,
    }
}

/// A ustar numeric field: octal (leading spaces, ended by a NUL or a space) or GNU base-256
/// (positive only).
#[inline(never)]
fn parse_number(field: &[u8]) -> Result<u64, TarError> {
    let number = match field.split_first() {
        Some((0x80, rest)) => parse_digits(rest, 256),
        Some((first, _)) if first & 0x80 != 0 => None,
        _ => {
            let start = field.iter().position(|&b| b != b' ').unwrap_or(field.len());
            let digits = field.get(start..).unwrap_or_default();
            let end = digits.iter().position(|&b| b == 0 || b == b' ');
            digits
                .get(..end.unwrap_or(digits.len()))
                .and_then(|digits| parse_digits(digits, 8))
        }
    };
    number.ok_or(TarError::BadHeader)
}

/// Digits of `base` (8 or 10 as ASCII, 256 as bytes), none meaning 0; `None` on any other
/// byte or an overflow.
#[inline(never)]
fn parse_digits(digits: &[u8], base: u64) -> Option<u64> {
    let mut value = 0u64;
    for &b in digits {
        let digit = u64::from(if base == 256 { b } else { b.wrapping_sub(b'0') });
        if digit >= base {
            return None;
        }
        value = value.checked_mul(base)?.checked_add(digit)?;
    }
    Some(value)
}

/// A pax time: `[-]SECONDS[.FRACTION]`.
fn parse_time(text: &[u8]) -> Option<Timespec> {
    let (negative, text) = match text {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, text),
    };
    let dot = text.iter().position(|&b| b == b'.').unwrap_or(text.len());
    let mut seconds = i64::try_from(parse_digits(text.get(..dot)?, 10)?).ok()?;
    let fraction = text.get(dot + 1..).unwrap_or_default();
    if !fraction.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut nanos = *b"000000000";
    copy_prefix(&mut nanos, fraction);
    let mut nanos = parse_digits(&nanos, 10)? as i64;
    if negative {
        seconds = -seconds;
        if nanos > 0 {
            seconds -= 1;
            nanos = 1_000_000_000 - nanos;
        }
    }
    Some(Timespec {
        tv_sec: seconds,
        tv_nsec: nanos,
    })
}

/// The bytes before the first NUL.
fn until_nul(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    field.get(..end).unwrap_or_default()
}

/// Zero bytes after `size` bytes of data, to the block's end.
fn padding(size: u64) -> usize {
    (size.wrapping_neg() % BLOCK as u64) as usize
}

/// `value` as a count of at most `limit`.
fn clamp(value: u64, limit: usize) -> usize {
    usize::try_from(value).map_or(limit, |value| value.min(limit))
}

/// Copies what fits of `src` to the start of `dst`; returns how much.
fn copy_prefix(dst: &mut [u8], src: &[u8]) -> usize {
    let n = dst.len().min(src.len());
    if let (Some(dst), Some(src)) = (dst.get_mut(..n), src.get(..n)) {
        dst.copy_from_slice(src);
    }
    n
}

/// Writes all of `data`.
fn write_all(fd: BorrowedFd<'_>, mut data: &[u8]) -> Result<(), Errno> {
    while !data.is_empty() {
        match rustix::io::write(fd, data) {
            Ok(n) => data = data.get(n..).unwrap_or_default(),
            Err(Errno::INTR) => {}
            Err(errno) => return Err(errno),
        }
    }
    Ok(())
}

/// Opens a directory below `at` for listing, without following a symlink.
fn open_dir(at: BorrowedFd<'_>, name: &CStr) -> Result<OwnedFd, TarError> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(rustix::fs::openat(at, name, flags, Mode::empty())?)
}

/// Skipped entries, counted, the last one's path kept.
struct Notes {
    count: u32,
    len: usize,
    path: [u8; MAX_PATH],
    reason: SkipReason,
}

impl Notes {
    const fn new() -> Self {
        Notes {
            count: 0,
            len: 0,
            path: [0; MAX_PATH],
            reason: SkipReason::Special,
        }
    }

    fn note(&mut self, path: &[u8], reason: SkipReason) {
        self.count = self.count.saturating_add(1);
        self.len = copy_prefix(&mut self.path, path);
        self.reason = reason;
    }

    fn take(&mut self) -> Option<Skipped<'_>> {
        let count = core::mem::take(&mut self.count);
        (count > 0).then(|| Skipped {
            path: self.path.get(..self.len).unwrap_or_default(),
            count,
            reason: self.reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU32, Ordering};

    fn tmp(what: &str) -> PathBuf {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ferry-tar-{}-{what}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn cpath(path: &Path) -> CString {
        CString::new(path.as_os_str().as_bytes()).unwrap()
    }

    fn open(path: &Path) -> OwnedFd {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        rustix::fs::open(cpath(path).as_c_str(), flags, Mode::empty()).unwrap()
    }

    fn set_mtime(path: &Path, sec: i64, nsec: i64) {
        let time = Timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        };
        let times = Timestamps {
            last_access: time,
            last_modification: time,
        };
        let c = cpath(path);
        rustix::fs::utimensat(
            rustix::fs::CWD,
            c.as_c_str(),
            &times,
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .unwrap();
    }

    /// A small deterministic generator for chunk sizes and contents.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self, below: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % below as u64) as usize
        }
    }

    /// Everything a comparison looks at, by relative path.
    fn snapshot(root: &Path) -> BTreeMap<String, String> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                let meta = std::fs::symlink_metadata(&path).unwrap();
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                let what = if meta.file_type().is_symlink() {
                    format!("link {:?}", std::fs::read_link(&path).unwrap())
                } else if meta.is_dir() {
                    walk(root, &path, out);
                    format!("dir {:o} {}", meta.mode() & 0o7777, meta.mtime())
                } else {
                    let data = std::fs::read(&path).unwrap();
                    let sum = data
                        .iter()
                        .fold(0u64, |h, &b| h.wrapping_mul(31).wrapping_add(b.into()));
                    format!(
                        "file {:o} {} {} {sum}",
                        meta.mode() & 0o7777,
                        meta.mtime(),
                        data.len()
                    )
                };
                out.insert(rel, what);
            }
        }
        let mut out = BTreeMap::new();
        walk(root, root, &mut out);
        out
    }

    /// The source tree of the round trips; returns the fifo's relative path.
    fn build_tree(root: &Path) {
        let mut rng = Rng(7);
        let big: Vec<u8> = (0..100_000).map(|_| rng.next(256) as u8).collect();
        std::fs::create_dir_all(root.join("a/b/c")).unwrap();
        std::fs::create_dir(root.join("ro")).unwrap();
        std::fs::create_dir(root.join("sticky")).unwrap();
        std::fs::write(root.join("empty"), b"").unwrap();
        std::fs::write(root.join("a/b/c/big"), &big).unwrap();
        std::fs::write(root.join("ro/inside"), b"read-only dir's file").unwrap();
        let long = "n".repeat(200);
        std::fs::write(root.join("a").join(&long), b"long name").unwrap();
        std::fs::write(root.join("x755"), b"#!/bin/sh\n").unwrap();
        std::fs::write(root.join("x600"), b"secret").unwrap();
        std::os::unix::fs::symlink("a/b/c/big", root.join("link")).unwrap();
        std::os::unix::fs::symlink("t".repeat(150), root.join("a/dangling-long")).unwrap();
        for (path, mode) in [
            ("x755", 0o755),
            ("x600", 0o600),
            ("ro", 0o555),
            ("sticky", 0o1777),
        ] {
            std::fs::set_permissions(root.join(path), std::fs::Permissions::from_mode(mode))
                .unwrap();
        }
        let mut sec = 1_600_000_000;
        for path in [
            "empty",
            "a/b/c/big",
            "x755",
            "x600",
            "link",
            "a/dangling-long",
            "ro/inside",
        ] {
            set_mtime(&root.join(path), sec, 0);
            sec += 1001;
        }
        set_mtime(&root.join("a").join(&long), 1_500_000_000, 0);
        for dir in ["a/b/c", "a/b", "a", "ro", "sticky"] {
            set_mtime(&root.join(dir), sec, 0);
            sec += 7;
        }
    }

    /// The whole stream, read in buffers of random sizes (1 byte included).
    fn archive(root: &Path, seed: u64) -> (Vec<u8>, Vec<(Vec<u8>, u32)>) {
        let fd = open(root);
        let mut writer = TreeWriter::new(fd.as_fd()).unwrap();
        let mut rng = Rng(seed);
        let (mut out, mut skipped) = (Vec::new(), Vec::new());
        let mut buf = vec![0u8; 65536];
        loop {
            let size = [1, 511, 512, 513, 65536, 1 + rng.next(9000)][rng.next(6)];
            let n = writer.read(&mut buf[..size]).unwrap();
            let note = writer.take_skipped();
            if let Some(note) = &note {
                skipped.push((note.path.to_vec(), note.count));
            }
            if n == 0 && note.is_none() {
                break;
            }
            assert!(n <= size);
            out.extend_from_slice(&buf[..n]);
        }
        assert_eq!(writer.read(&mut buf).unwrap(), 0, "the end stays the end");
        (out, skipped)
    }

    /// Feeds `stream` in chunks of random sizes (all 1 byte when `seed` is 0).
    fn extract(stream: &[u8], dest: &Path, seed: u64) -> Result<(), TarError> {
        let fd = open(dest);
        let mut extractor = Extractor::new(fd.as_fd());
        let mut rng = Rng(seed | 1);
        let mut rest = stream;
        while !rest.is_empty() {
            let n = if seed == 0 { 1 } else { 1 + rng.next(70_000) }.min(rest.len());
            let mut chunk = &rest[..n];
            while !chunk.is_empty() {
                chunk = &chunk[extractor.feed(chunk)?..];
                if let Some(note) = extractor.take_skipped() {
                    assert_eq!(note.count, 1, "one note at a time");
                }
            }
            rest = &rest[n..];
        }
        extractor.finish()
    }

    fn expected(source: &Path) -> BTreeMap<String, String> {
        let mut want = snapshot(source);
        // Set-id bits are dropped on extraction.
        for what in want.values_mut() {
            *what = what.replace("file 4755", "file 755");
        }
        want
    }

    #[test]
    fn round_trip_in_random_chunks() {
        let source = tmp("rt-src");
        build_tree(&source);
        let fifo = cpath(&source.join("a/fifo"));
        rustix::fs::mknodat(
            rustix::fs::CWD,
            fifo.as_c_str(),
            rustix::fs::FileType::Fifo,
            Mode::RUSR,
            0,
        )
        .unwrap();
        std::fs::write(source.join("suid"), b"x").unwrap();
        std::fs::set_permissions(source.join("suid"), std::fs::Permissions::from_mode(0o4755))
            .unwrap();
        set_mtime(&source.join("suid"), 1_234_567_890, 0);
        set_mtime(&source.join("a"), 1_700_000_000, 0);
        let (stream, skipped) = archive(&source, 3);
        assert_eq!(skipped, [(b"a/fifo".to_vec(), 1)]);
        assert_eq!(stream.len() % BLOCK, 0);
        assert!(stream.ends_with(&[0; 2 * BLOCK]));
        std::fs::remove_file(source.join("a/fifo")).unwrap();
        set_mtime(&source.join("a"), 1_700_000_000, 0);
        let want = expected(&source);
        assert!(want.len() >= 14, "{want:?}");
        for seed in [0, 1, 2, 3] {
            let dest = tmp("rt-dest");
            extract(&stream, &dest, seed).unwrap();
            assert_eq!(snapshot(&dest), want, "seed {seed}");
            // Extracting again over the result replaces and merges.
            extract(&stream, &dest, seed + 10).unwrap();
            assert_eq!(snapshot(&dest), want);
        }
        // Without the end blocks.
        let dest = tmp("rt-noend");
        extract(&stream[..stream.len() - 2 * BLOCK], &dest, 5).unwrap();
        assert_eq!(snapshot(&dest), want);
    }

    fn have_tar() -> bool {
        std::process::Command::new("tar")
            .arg("--version")
            .output()
            .is_ok()
    }

    #[test]
    fn gnu_tar_reads_our_stream_and_we_read_its() {
        if !have_tar() {
            eprintln!("no tar binary: interop not checked");
            return;
        }
        let source = tmp("gnu-src");
        build_tree(&source);
        std::os::unix::fs::symlink("k".repeat(300), source.join("a/long-target")).unwrap();
        let (stream, _) = archive(&source, 9);
        set_mtime(&source.join("a"), 1_700_000_000, 0);
        let (stream2, _) = archive(&source, 9);
        let _ = stream;
        let want = snapshot(&source);
        let dest = tmp("gnu-dest");
        let mut child = std::process::Command::new("tar")
            .args(["-x", "-p", "-f", "-", "-C"])
            .arg(&dest)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&stream2).unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(snapshot(&dest), want);
        // Nanoseconds come through pax.
        set_mtime(&source.join("x600"), 1_600_000_123, 456_789_000);
        for format in ["pax", "gnu", "ustar"] {
            let mut args = vec![
                format!("--format={format}"),
                "-c".into(),
                "-f".into(),
                "-".into(),
            ];
            args.extend([
                "-C".into(),
                source.to_string_lossy().into_owned(),
                ".".into(),
            ]);
            if format == "ustar" {
                // ustar cannot hold the 200-byte name or the 300-byte target.
                args.pop();
                args.extend(["x755".into(), "a/b".into()]);
            }
            let out = std::process::Command::new("tar")
                .args(&args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{format}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let dest = tmp(format);
            extract(&out.stdout, &dest, 4).unwrap();
            let got = snapshot(&dest);
            if format == "ustar" {
                assert_eq!(got["x755"], want["x755"]);
                assert_eq!(got["a/b/c/big"], want["a/b/c/big"]);
                assert!(got.contains_key("a"), "missing parents are made");
                continue;
            }
            assert_eq!(got, snapshot(&source), "{format}");
            let nanos = std::fs::metadata(dest.join("x600")).unwrap().mtime_nsec();
            assert_eq!(
                nanos,
                if format == "pax" { 456_789_000 } else { 0 },
                "{format}"
            );
        }
    }

    /// One entry's headers and data, as the writer would stage them.
    fn entry(name: &str, kind: u8, link: &str, data: &[u8]) -> Vec<u8> {
        let mut staging = vec![0u8; STAGING];
        let meta = Meta {
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: data.len() as u64,
            mtime: 1_000_000,
        };
        let n = stage_headers(&mut staging, name.as_bytes(), link.as_bytes(), &meta).unwrap();
        let mut out = staging[..n].to_vec();
        out.extend_from_slice(data);
        out.resize(out.len() + padding(data.len() as u64), 0);
        out
    }

    /// A pax header with these records, then the entry.
    fn with_pax(records: &[u8], then: Vec<u8>) -> Vec<u8> {
        let mut out = entry("pax", b'x', "", records);
        out.extend(then);
        out
    }

    fn fixed_checksum(block: &mut [u8]) {
        block[148..156].fill(b' ');
        let sum: u64 = block[..BLOCK].iter().map(|&b| u64::from(b)).sum();
        put_octal(&mut block[148..155], sum);
    }

    #[test]
    fn names_that_escape_are_refused() {
        let outside = tmp("outside");
        for name in ["../escape", "/abs/path", "a/../../x", "", "./..", "a/.."] {
            let dest = tmp("escape");
            let stream = entry(name, b'0', "", b"x");
            assert_eq!(
                extract(&stream, &dest, 1),
                Err(TarError::PathEscape),
                "{name:?}"
            );
            assert!(!dest.parent().unwrap().join("escape").exists());
            assert!(!Path::new("/abs/path").exists());
        }
        // The root as a directory entry is ignored; as anything else, refused.
        let dest = tmp("root");
        extract(&entry("./", b'5', "", b""), &dest, 1).unwrap();
        assert_eq!(
            extract(&entry(".", b'2', "x", b""), &dest, 1),
            Err(TarError::PathEscape)
        );
        // A symlink made by the archive is not followed, wherever it points.
        let outside_c = outside.to_string_lossy().into_owned();
        for target in [outside_c.as_str(), "..", "sub", "."] {
            let dest = tmp("symlink-attack");
            std::fs::create_dir(dest.join("sub")).unwrap();
            let mut stream = entry("l", b'2', target, b"");
            stream.extend(entry("l/file", b'0', "", b"owned"));
            assert_eq!(
                extract(&stream, &dest, 1),
                Err(TarError::SymlinkInPath),
                "{target}"
            );
            assert_eq!(
                std::fs::read_link(dest.join("l")).unwrap(),
                Path::new(target)
            );
            assert!(!outside.join("file").exists());
            assert!(!dest.join("sub/file").exists());
        }
        // Nor one that was there already, in any parent position.
        let dest = tmp("pre-existing");
        std::os::unix::fs::symlink(&outside, dest.join("pre")).unwrap();
        std::fs::create_dir(dest.join("d")).unwrap();
        std::os::unix::fs::symlink(&outside, dest.join("d/pre")).unwrap();
        for name in ["pre/file", "d/pre/file", "d/pre/new/file"] {
            let stream = entry(name, b'0', "", b"owned");
            assert_eq!(
                extract(&stream, &dest, 1),
                Err(TarError::SymlinkInPath),
                "{name}"
            );
        }
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        // A file entry replaces a symlink of its name, never writes through it.
        std::fs::write(outside.join("target"), b"keep").unwrap();
        std::os::unix::fs::symlink(outside.join("target"), dest.join("victim")).unwrap();
        extract(&entry("victim", b'0', "", b"new"), &dest, 1).unwrap();
        assert_eq!(std::fs::read(outside.join("target")).unwrap(), b"keep");
        assert!(std::fs::symlink_metadata(dest.join("victim"))
            .unwrap()
            .is_file());
        assert_eq!(std::fs::read(dest.join("victim")).unwrap(), b"new");
        // So does a directory entry, and its contents stay inside.
        let mut stream = entry("pre", b'5', "", b"");
        stream.extend(entry("pre/f", b'0', "", b"in"));
        extract(&stream, &dest, 1).unwrap();
        assert!(std::fs::symlink_metadata(dest.join("pre"))
            .unwrap()
            .is_dir());
        assert_eq!(std::fs::read(dest.join("pre/f")).unwrap(), b"in");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
    }

    #[test]
    fn malformed_streams() {
        let dest = tmp("malformed");
        let good = entry("f", b'0', "", &[7; 1000]);
        let mut bad = good.clone();
        bad[0] ^= 1;
        assert_eq!(extract(&bad, &dest, 1), Err(TarError::BadChecksum));
        let mut bad = good.clone();
        bad[100] = b'9';
        fixed_checksum(&mut bad);
        assert_eq!(
            extract(&bad, &dest, 1),
            Err(TarError::BadHeader),
            "not octal"
        );
        for cut in [100, 511, 512, 700, 1535] {
            assert_eq!(
                extract(&good[..cut], &dest, 1),
                Err(TarError::Truncated),
                "{cut}"
            );
        }
        extract(&good, &dest, 1).unwrap();
        // A huge declared size: the data never comes.
        let huge = with_pax(b"22 size=1099511627776\n", entry("h", b'0', "", b"abc"));
        assert_eq!(extract(&huge, &dest, 1), Err(TarError::Truncated));
        assert_eq!(
            std::fs::metadata(dest.join("h")).unwrap().len(),
            512 - 3 + 3
        );
        for records in [
            &b"99 path=x\n"[..],
            b"5 path=abc\n",
            b"x path=abc\n",
            b"11 path=abc",
            b"10 pathabc\n",
            b"0 \n",
        ] {
            let stream = with_pax(records, entry("f", b'0', "", b""));
            assert_eq!(
                extract(&stream, &dest, 1),
                Err(TarError::BadPax),
                "{records:?}"
            );
        }
        // The pax bound, at its edge: a comment record of exactly `MAX_PAX` bytes.
        let filler = |len: usize| {
            let mut record = format!("{len} comment=");
            record += &"c".repeat(len - record.len() - 1);
            record.push('\n');
            record.into_bytes()
        };
        let stream = with_pax(&filler(MAX_PAX), entry("edge", b'0', "", b"ok"));
        extract(&stream, &dest, 1).unwrap();
        let stream = with_pax(&filler(MAX_PAX + 1), entry("edge", b'0', "", b"ok"));
        assert_eq!(extract(&stream, &dest, 1), Err(TarError::ExtensionTooLarge));
        // After a zero block, the rest is ignored.
        let mut stream = entry("kept", b'0', "", b"1");
        stream.extend([0; BLOCK]);
        stream.extend(entry("ignored", b'0', "", b"2"));
        extract(&stream, &dest, 1).unwrap();
        assert!(dest.join("kept").exists() && !dest.join("ignored").exists());
    }

    #[test]
    fn name_lengths_at_their_edges() {
        let dest = tmp("names");
        let n100 = "a".repeat(100);
        let plain = entry(&n100, b'0', "", b"100");
        assert_eq!(plain.len(), 2 * BLOCK, "100 bytes fit ustar's name");
        let n101 = "b".repeat(101);
        let long = entry(&n101, b'0', "", b"101");
        assert_eq!(long[156], b'x', "101 bytes need pax");
        let split = format!("{}/{}", "p".repeat(155), "q".repeat(100));
        assert_eq!(
            entry(&split, b'0', "", b"").len(),
            BLOCK,
            "prefix 155 + name 100"
        );
        let unsplittable = format!("{}/{}", "p".repeat(156), "q".repeat(99));
        assert_eq!(entry(&unsplittable, b'0', "", b"").len(), 3 * BLOCK);
        let n255 = "c".repeat(255);
        let n256 = "d".repeat(256);
        for stream in [
            plain,
            long,
            entry(&n255, b'0', "", b"255"),
            entry(&split, b'0', "", b"s"),
        ] {
            extract(&stream, &dest, 1).unwrap();
        }
        assert_eq!(std::fs::read(dest.join(&n100)).unwrap(), b"100");
        assert_eq!(std::fs::read(dest.join(&n101)).unwrap(), b"101");
        assert_eq!(std::fs::read(dest.join(&n255)).unwrap(), b"255");
        assert_eq!(std::fs::read(dest.join(&split)).unwrap(), b"s");
        let stream = entry(&n256, b'0', "", b"256");
        assert_eq!(
            extract(&stream, &dest, 1),
            Err(TarError::Io(Errno::NAMETOOLONG))
        );
        // A path of `MAX_PATH - 1` bytes (16 components of 255), and one byte more.
        let deep: Vec<String> = (0..16).map(|i| format!("{i:x}").repeat(255)).collect();
        let at_limit = deep.join("/");
        assert_eq!(at_limit.len(), MAX_PATH - 1);
        extract(&entry(&at_limit, b'0', "", b"deep"), &dest, 1).unwrap();
        let over = format!("{at_limit}x");
        assert_eq!(
            extract(&entry(&over, b'0', "", b""), &dest, 1),
            Err(TarError::PathTooLong)
        );
        let fd = open(&dest);
        let deep_c = CString::new(at_limit).unwrap();
        let file = rustix::fs::openat(&fd, deep_c.as_c_str(), OFlags::RDONLY, Mode::empty());
        let mut buf = [0u8; 8];
        assert_eq!(
            crate::file::read_fd(file.unwrap().as_fd(), &mut buf)
                .unwrap()
                .text,
            b"deep"
        );
    }

    #[test]
    fn depth_at_its_edge() {
        let dest = tmp("depth");
        let path = |n: usize| vec!["d"; n].join("/");
        extract(&entry(&path(MAX_DEPTH), b'0', "", b"ok"), &dest, 1).unwrap();
        assert_eq!(
            extract(&entry(&path(MAX_DEPTH + 1), b'0', "", b""), &dest, 1),
            Err(TarError::TooDeep)
        );
        // The writer: `MAX_DEPTH` components pass, one more does not.
        let (stream, _) = archive(&dest, 1);
        let copy = tmp("depth-copy");
        extract(&stream, &copy, 1).unwrap();
        assert_eq!(std::fs::read(copy.join(path(MAX_DEPTH))).unwrap(), b"ok");
        std::fs::create_dir(dest.join(path(MAX_DEPTH))).ok();
        std::fs::remove_file(dest.join(path(MAX_DEPTH))).unwrap();
        std::fs::create_dir(dest.join(path(MAX_DEPTH))).unwrap();
        std::fs::write(dest.join(path(MAX_DEPTH + 1)), b"deep").unwrap();
        let fd = open(&dest);
        let mut writer = TreeWriter::new(fd.as_fd()).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        assert_eq!(writer.read(&mut buf), Err(TarError::TooDeep));
    }

    #[test]
    fn writer_path_length_at_its_edge() {
        let root = tmp("wpath");
        let mut dirfd = open(&root);
        for i in 0..15 {
            let name = CString::new(format!("{i:x}").repeat(255)).unwrap();
            rustix::fs::mkdirat(&dirfd, name.as_c_str(), Mode::RWXU).unwrap();
            dirfd = open_dir(dirfd.as_fd(), &name).unwrap();
        }
        // 15 × 256 + 255 = `MAX_PATH - 1`.
        let leaf = CString::new("f".repeat(255)).unwrap();
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::CLOEXEC;
        drop(rustix::fs::openat(&dirfd, leaf.as_c_str(), flags, Mode::RUSR).unwrap());
        let (stream, _) = archive(&root, 1);
        let dest = tmp("wpath-dest");
        extract(&stream, &dest, 1).unwrap();
        // One byte more.
        rustix::fs::mkdirat(&dirfd, c"g", Mode::RWXU).unwrap();
        let deeper = open_dir(dirfd.as_fd(), c"g").unwrap();
        drop(rustix::fs::openat(&deeper, leaf.as_c_str(), flags, Mode::RUSR).unwrap());
        let fd = open(&root);
        let mut writer = TreeWriter::new(fd.as_fd()).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let result = (0..100).try_for_each(|_| writer.read(&mut buf).map(drop));
        assert_eq!(result, Err(TarError::PathTooLong));
    }

    #[test]
    fn odd_entries_are_skipped_and_reported() {
        let dest = tmp("odd");
        let fd = open(&dest);
        let mut extractor = Extractor::new(fd.as_fd());
        let mut stream = Vec::new();
        for (name, kind) in [("hard", b'1'), ("chr", b'3'), ("blk", b'4'), ("fifo", b'6')] {
            stream.extend(entry(name, kind, "target", b""));
        }
        stream.extend(entry("global", b'g', "", b"9 a=bcd\n"));
        stream.extend(entry("sparse", b'S', "", &[1; 700]));
        stream.extend(entry("after", b'0', "", b"fine"));
        // Fed at once, it stops after each skipped entry, so each gets its note.
        let mut rest = &stream[..];
        let mut notes = Vec::new();
        while !rest.is_empty() {
            rest = &rest[extractor.feed(rest).unwrap()..];
            if let Some(note) = extractor.take_skipped() {
                notes.push((note.path.to_vec(), note.count, note.reason));
            }
        }
        use SkipReason::{HardLink, Special, UnknownType};
        let want: Vec<(Vec<u8>, u32, SkipReason)> = [
            ("hard", HardLink),
            ("chr", Special),
            ("blk", Special),
            ("fifo", Special),
            ("sparse", UnknownType),
        ]
        .iter()
        .map(|(name, reason)| (name.as_bytes().to_vec(), 1, *reason))
        .collect();
        assert_eq!(notes, want);
        assert_eq!(extractor.take_skipped(), None);
        extractor.finish().unwrap();
        let names: Vec<_> = std::fs::read_dir(&dest)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["after"]);
    }

    #[test]
    fn pax_and_gnu_records_override_the_header() {
        let dest = tmp("pax");
        let mut stream = with_pax(
            b"30 mtime=1700000000.123456789\n",
            entry("short", b'0', "", b"x"),
        );
        stream.extend(with_pax(
            b"16 path=renamed\n",
            entry("ignored", b'0', "", b"r"),
        ));
        stream.extend(with_pax(
            b"19 linkpath=target\n",
            entry("l", b'2', "wrong", b""),
        ));
        let mut long = entry("././@LongLink", b'L', "", b"gnu-name\0");
        long.extend(entry("././@LongLink", b'K', "", b"gnu-target\0"));
        long.extend(entry("cut", b'2', "cut", b""));
        stream.extend(long);
        extract(&stream, &dest, 1).unwrap();
        let meta = std::fs::metadata(dest.join("short")).unwrap();
        assert_eq!(
            (meta.mtime(), meta.mtime_nsec()),
            (1_700_000_000, 123_456_789)
        );
        assert_eq!(std::fs::read(dest.join("renamed")).unwrap(), b"r");
        assert!(!dest.join("ignored").exists());
        assert_eq!(
            std::fs::read_link(dest.join("l")).unwrap(),
            Path::new("target")
        );
        assert_eq!(
            std::fs::read_link(dest.join("gnu-name")).unwrap(),
            Path::new("gnu-target")
        );
        let t = |s: &[u8]| parse_time(s).map(|t| (t.tv_sec, t.tv_nsec));
        assert_eq!(t(b"-1.25"), Some((-2, 750_000_000)));
        assert_eq!(t(b"5"), Some((5, 0)));
        assert_eq!(t(b"5.x"), None);
        assert_eq!(t(b"x"), None);
        // An empty pax value leaves the header's field.
        let dest = tmp("pax-empty");
        extract(
            &with_pax(b"9 mtime=\n", entry("e", b'0', "", b"")),
            &dest,
            1,
        )
        .unwrap();
        let meta = std::fs::metadata(dest.join("e")).unwrap();
        assert_eq!(meta.mtime(), 1_000_000);
    }

    #[test]
    fn sizes_of_8_gib_and_more() {
        let mut staging = vec![0u8; STAGING];
        let size = MAX_USTAR_SIZE + 1;
        let meta = Meta {
            kind: b'0',
            mode: 0o644,
            uid: 0,
            gid: 0,
            size,
            mtime: 0,
        };
        let n = stage_headers(&mut staging, b"big", b"", &meta).unwrap();
        assert_eq!(n, 3 * BLOCK);
        assert_eq!(staging[156], b'x');
        assert!(staging[BLOCK..2 * BLOCK].starts_with(b"19 size=8589934592\n"));
        let header = &staging[2 * BLOCK..3 * BLOCK];
        // The ustar field holds its maximum; the pax record the size (never base-256).
        assert_eq!(parse_number(&header[124..136]), Ok(MAX_USTAR_SIZE));
        let mut base256 = [0u8; 12];
        base256[0] = 0x80;
        base256[7..].copy_from_slice(&[2, 0, 0, 0, 0]);
        assert_eq!(parse_number(&base256), Ok(size), "base-256 is read");
        assert_eq!(parse_number(b"77777777777\0"), Ok(MAX_USTAR_SIZE));
        assert_eq!(parse_number(&[0xff; 12]), Err(TarError::BadHeader));
        let dest = tmp("big");
        let fd = open(&dest);
        let mut extractor = Extractor::new(fd.as_fd());
        assert_eq!(extractor.feed(&staging[..n]), Ok(n));
        assert_eq!(extractor.feed(&[5; 1000]), Ok(1000));
        assert_eq!(extractor.finish(), Err(TarError::Truncated));
        // Uids beyond octal's 7 digits are written as the most it holds.
        let mut field = [0u8; 8];
        put_octal(&mut field, 4_000_000_000);
        assert_eq!(&field, b"7777777\0");
        put_octal(&mut field, 0o1234567);
        assert_eq!(&field, b"1234567\0");
    }

    #[test]
    fn a_file_that_shrinks_keeps_the_stream_valid() {
        let root = tmp("shrink");
        std::fs::write(root.join("f"), vec![b'z'; 10_000]).unwrap();
        let fd = open(&root);
        let mut writer = TreeWriter::new(fd.as_fd()).unwrap();
        let mut stream = vec![0u8; 600];
        assert_eq!(writer.read(&mut stream).unwrap(), 600);
        std::fs::OpenOptions::new()
            .write(true)
            .open(root.join("f"))
            .unwrap()
            .set_len(100)
            .unwrap();
        let mut buf = [0u8; 4096];
        loop {
            let n = writer.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            stream.extend_from_slice(&buf[..n]);
        }
        assert_eq!(writer.changed(), 1);
        let dest = tmp("shrink-dest");
        extract(&stream, &dest, 1).unwrap();
        let data = std::fs::read(dest.join("f")).unwrap();
        assert_eq!(data.len(), 10_000);
        assert!(data[..100].iter().all(|&b| b == b'z') && data[100..].iter().all(|&b| b == 0));
    }

    #[test]
    fn directory_records_at_their_bound() {
        // Long paths fill the records quickly: 15 components of 255 bytes, then `dNNN`.
        let base: Vec<String> = (0..15).map(|i| format!("{i:x}").repeat(255)).collect();
        let base = base.join("/");
        let record = base.len() + 1 + 4 + 1 + DIR_TRAILER;
        let fit = DIR_RECORDS_BYTES / record;
        let mut stream = Vec::new();
        for i in 0..=fit {
            let mut dir = entry(&format!("{base}/d{i:03}"), b'5', "", b"");
            // Mode 0o750 and mtime 1000 + i.
            let at = dir.len() - BLOCK;
            put_octal(&mut dir[at + 100..at + 108], 0o750);
            put_octal(&mut dir[at + 136..at + 148], 1000 + i as u64);
            fixed_checksum(&mut dir[at..]);
            stream.extend(dir);
        }
        // Past the bound, a directory gets its time at once: an entry made in it later
        // changes it.
        stream.extend(entry(&format!("{base}/d{fit:03}/later"), b'0', "", b""));
        let dest = tmp("records");
        extract(&stream, &dest, 1).unwrap();
        for i in 0..=fit {
            let meta = std::fs::metadata(dest.join(format!("{base}/d{i:03}"))).unwrap();
            assert_eq!(meta.mode() & 0o7777, 0o750, "{i}: the mode, always");
            let restored = meta.mtime() == 1000 + i as i64;
            assert_eq!(restored, i < fit, "{i}: the time, within the bound only");
        }
    }
}
