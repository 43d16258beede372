//! File transfer: a file (or a directory as a tar stream) into the guest with [`Put`], out of it
//! with [`Get`]. Content streams within the agent's stdin credit one way and straight from the
//! receive buffer the other, so memory stays bounded whatever the size; both sides hash it
//! (SHA-256) and a transfer succeeds only when the digests and byte counts agree.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_wire::limits::MAX_DATA;
use ferry_wire::{
    Bytes, FileHeader, FileSummary, GetRequest, PutRequest, SkipReason, Timestamp, TransferKind,
    DATA_HEADROOM, DIGEST_LEN,
};
use sha2::{Digest, Sha256};

use crate::conn::{out_of_order, Connection, Received};
use crate::error::Error;

/// A SHA-256 digest.
pub type Sha256Digest = [u8; DIGEST_LEN];

/// How many skipped entries a transfer keeps by name (the rest are only counted), so a tree of
/// a million fifos cannot grow the host's memory.
pub const MAX_SKIPPED_KEPT: usize = 1024;

/// A byte counter a transfer adds to as content moves: poll it from another thread (a progress
/// bar). Cloning shares the count.
#[derive(Debug, Clone, Default)]
pub struct Progress(Arc<AtomicU64>);

impl Progress {
    /// A counter at zero.
    pub fn new() -> Progress {
        Progress::default()
    }

    /// Content bytes moved so far.
    pub fn bytes(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn add(&self, n: usize) {
        self.0.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// What to write in the guest, and how: a builder in the spirit of [`crate::Command`].
///
/// ```no_run
/// # use ferry_host::{Client, Put, Target};
/// # let client = Client::new(&"unix:///run/agent.sock".parse::<Target>()?, Default::default());
/// let file = std::fs::File::open("build.tar").unwrap();
/// let done = client.put(Put::file("/tmp/in.tar").mode(0o600).create_parents(true), file)?;
/// println!("{} bytes", done.bytes);
/// # Ok::<(), ferry_host::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Put {
    path: Vec<u8>,
    kind: TransferKind,
    mode: Option<u32>,
    owner: Option<Vec<u8>>,
    mtime: Option<Timestamp>,
    size: Option<u64>,
    create_parents: bool,
    no_clobber: bool,
    user: Option<Vec<u8>>,
    progress: Option<Progress>,
    invalid: Option<String>,
}

impl Put {
    /// Writes one regular file at `path` (absolute, in the guest), atomically: the agent writes
    /// a temporary file beside it, checks the digest and renames it over the destination.
    pub fn file(path: impl AsRef<OsStr>) -> Put {
        Put::new(path.as_ref(), TransferKind::File)
    }

    /// Unpacks a tar stream (ustar with pax headers) into the directory `path`: regular files,
    /// directories and symbolic links, with their modes and times. A new directory appears
    /// whole once the stream checked out (it is unpacked beside its place); into an existing
    /// one (unless [`Put::no_clobber`]) entries are merged as they arrive, and a failure leaves
    /// what was unpacked so far. Entries that would land outside `path` fail the put
    /// ([`crate::ErrorCode::PathEscape`]).
    pub fn tree(path: impl AsRef<OsStr>) -> Put {
        Put::new(path.as_ref(), TransferKind::Tree)
    }

    fn new(path: &OsStr, kind: TransferKind) -> Put {
        let mut put = Put {
            path: path.as_bytes().to_vec(),
            kind,
            mode: None,
            owner: None,
            mtime: None,
            size: None,
            create_parents: false,
            no_clobber: false,
            user: None,
            progress: None,
            invalid: None,
        };
        put.invalid = check_path(&put.path);
        put
    }

    /// The file's permission bits (at most `0o7777`; default `0o644`). For a tree: the
    /// destination directory's, when the put creates it (default `0o755`); its entries carry
    /// their own.
    pub fn mode(&mut self, mode: u32) -> &mut Put {
        self.mode = Some(mode);
        self
    }

    /// The file's owner, `NAME[:GROUP]` or `UID[:GID]` (default: the user the transfer runs
    /// as); the agent's policy decides whether that is allowed.
    pub fn owner(&mut self, owner: impl AsRef<OsStr>) -> &mut Put {
        self.owner = self.user_text(owner.as_ref(), "owner");
        self
    }

    /// The file's modification time (default: when it is written); for a tree, the
    /// destination directory's when the put creates it.
    pub fn mtime(&mut self, mtime: SystemTime) -> &mut Put {
        self.mtime = Some(timestamp(mtime));
        self
    }

    /// The content's size, when known: the agent checks it against its maximum file size and
    /// its free space before a byte is written, and the content must have exactly this size.
    pub fn size(&mut self, size: u64) -> &mut Put {
        self.size = Some(size);
        self
    }

    /// Creates missing parent directories (default: a missing one is [`crate::ErrorCode::NotFound`]).
    pub fn create_parents(&mut self, create: bool) -> &mut Put {
        self.create_parents = create;
        self
    }

    /// Refuses ([`crate::ErrorCode::AlreadyExists`]) instead of replacing an existing
    /// destination.
    pub fn no_clobber(&mut self, no_clobber: bool) -> &mut Put {
        self.no_clobber = no_clobber;
        self
    }

    /// Writes as this guest user (`NAME[:GROUP]` or `UID[:GID]`) instead of the agent's
    /// default; the agent's policy decides who may be asked for, as for exec.
    pub fn user(&mut self, user: impl AsRef<OsStr>) -> &mut Put {
        self.user = self.user_text(user.as_ref(), "user");
        self
    }

    /// Counts the content's bytes into `progress` as they are sent.
    pub fn progress(&mut self, progress: &Progress) -> &mut Put {
        self.progress = Some(progress.clone());
        self
    }

    fn user_text(&mut self, text: &OsStr, what: &str) -> Option<Vec<u8>> {
        let text = text.as_bytes();
        if text.is_empty() || text.contains(&0) {
            self.invalid
                .get_or_insert(format!("the {what} is empty or contains a NUL byte"));
        }
        Some(text.to_vec())
    }

    /// The wire request; builder misuse is reported here.
    pub(crate) fn request(&self) -> Result<PutRequest<'_>, Error> {
        if let Some(why) = &self.invalid {
            return Err(Error::InvalidRequest(why.clone()));
        }
        Ok(PutRequest {
            path: Bytes(&self.path),
            kind: self.kind,
            mode: self.mode,
            owner: self.owner.as_deref().map(Bytes),
            mtime: self.mtime,
            size: self.size,
            create_parents: self.create_parents,
            no_clobber: self.no_clobber,
            user: self.user.as_deref().map(Bytes),
        })
    }
}

/// What to read from the guest: a builder like [`Put`].
#[derive(Debug, Clone)]
pub struct Get {
    path: Vec<u8>,
    kind: TransferKind,
    user: Option<Vec<u8>>,
    progress: Option<Progress>,
    invalid: Option<String>,
}

impl Get {
    /// Reads the regular file at `path` (absolute, in the guest).
    pub fn file(path: impl AsRef<OsStr>) -> Get {
        Get::new(path.as_ref(), TransferKind::File)
    }

    /// Reads the directory at `path` as a tar stream (ustar with pax headers; devices, sockets
    /// and fifos are left out and reported in [`Transferred::skipped`]).
    pub fn tree(path: impl AsRef<OsStr>) -> Get {
        Get::new(path.as_ref(), TransferKind::Tree)
    }

    fn new(path: &OsStr, kind: TransferKind) -> Get {
        let path = path.as_bytes().to_vec();
        Get {
            invalid: check_path(&path),
            path,
            kind,
            user: None,
            progress: None,
        }
    }

    /// Reads as this guest user; see [`Put::user`].
    pub fn user(&mut self, user: impl AsRef<OsStr>) -> &mut Get {
        let user = user.as_ref().as_bytes();
        if user.is_empty() || user.contains(&0) {
            self.invalid
                .get_or_insert("the user is empty or contains a NUL byte".into());
        }
        self.user = Some(user.to_vec());
        self
    }

    /// Counts the content's bytes into `progress` as they arrive.
    pub fn progress(&mut self, progress: &Progress) -> &mut Get {
        self.progress = Some(progress.clone());
        self
    }

    pub(crate) fn request(&self) -> Result<GetRequest<'_>, Error> {
        if let Some(why) = &self.invalid {
            return Err(Error::InvalidRequest(why.clone()));
        }
        Ok(GetRequest {
            path: Bytes(&self.path),
            kind: self.kind,
            user: self.user.as_deref().map(Bytes),
        })
    }
}

fn check_path(path: &[u8]) -> Option<String> {
    if path.first() != Some(&b'/') {
        Some(format!(
            "the guest path {:?} is not absolute",
            String::from_utf8_lossy(path)
        ))
    } else if path.contains(&0) {
        Some("the guest path contains a NUL byte".into())
    } else {
        None
    }
}

/// A file as the agent describes it: a get's source, or a put's destination as it will be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileInfo {
    /// Its size in bytes (a tree's stream: 0, not known in advance).
    pub size: u64,
    /// Permission bits and file type, as `st_mode`.
    pub mode: u32,
    /// Its modification time.
    pub mtime: SystemTime,
    /// Its owner.
    pub uid: u32,
    /// Its group.
    pub gid: u32,
}

impl FileInfo {
    fn from_wire(header: &FileHeader) -> FileInfo {
        FileInfo {
            size: header.size,
            mode: header.mode,
            mtime: system_time(header.mtime),
            uid: header.uid,
            gid: header.gid,
        }
    }
}

/// An entry a tree transfer left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedEntry {
    /// Its path within the tree.
    pub path: Vec<u8>,
    /// Why.
    pub reason: SkipReason,
}

impl SkippedEntry {
    pub(crate) fn from_wire(skipped: &ferry_wire::Skipped<'_>) -> SkippedEntry {
        SkippedEntry {
            path: skipped.path.0.to_vec(),
            reason: skipped.reason,
        }
    }
}

/// A completed transfer: both sides counted the same bytes and computed the same SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transferred {
    /// Content bytes moved (a tree: the tar stream's).
    pub bytes: u64,
    /// Their SHA-256.
    pub sha256: Sha256Digest,
    /// The file as the agent described it (its `FileReady`), when it did.
    pub file: Option<FileInfo>,
    /// Entries of a tree the agent left out (the first [`MAX_SKIPPED_KEPT`]).
    pub skipped: Vec<SkippedEntry>,
    /// How many entries were left out in all.
    pub skipped_total: u64,
}

/// What a transfer has gathered beside its content.
#[derive(Debug, Default)]
struct Notes {
    file: Option<FileInfo>,
    skipped: Vec<SkippedEntry>,
    skipped_total: u64,
}

impl Notes {
    fn skip(&mut self, entry: SkippedEntry) {
        self.skipped_total += 1;
        if self.skipped.len() < MAX_SKIPPED_KEPT {
            self.skipped.push(entry);
        }
    }

    fn done(self, bytes: u64, sha256: Sha256Digest) -> Transferred {
        Transferred {
            bytes,
            sha256,
            file: self.file,
            skipped: self.skipped,
            skipped_total: self.skipped_total,
        }
    }
}

/// Checks the agent's summary against our own count and digest.
fn check_summary(summary: &FileSummary, bytes: u64, sha256: &Sha256Digest) -> Result<(), Error> {
    if summary.bytes == bytes && summary.sha256.0 == *sha256 {
        return Ok(());
    }
    Err(Error::IntegrityMismatch {
        agent_bytes: summary.bytes,
        agent_sha256: summary.sha256.0,
        bytes,
        sha256: *sha256,
    })
}

/// A put in progress: write the content (it implements [`Write`]; every write waits for credit
/// as needed), then [`Upload::finish`]. Dropping it unfinished abandons the put: the agent
/// writes nothing.
pub struct Upload {
    conn: Connection,
    hasher: Sha256,
    sent: u64,
    declared: Option<u64>,
    /// One frame: the content is read or copied to `frame[DATA_HEADROOM..]` and framed in place.
    frame: Box<[u8]>,
    notes: Notes,
    progress: Option<Progress>,
    /// The first failure, typed; later calls return it (or its message, through [`Write`]).
    failed: Option<Error>,
    finished: bool,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("sent", &self.sent)
            .finish_non_exhaustive()
    }
}

impl Upload {
    pub(crate) fn new(conn: Connection, put: &Put) -> Upload {
        Upload {
            conn,
            hasher: Sha256::new(),
            sent: 0,
            declared: put.size,
            frame: vec![0u8; DATA_HEADROOM + MAX_DATA].into_boxed_slice(),
            notes: Notes::default(),
            progress: put.progress.clone(),
            failed: None,
            finished: false,
        }
    }

    /// The destination as the agent described it, once it did (it may still be on its way).
    pub fn file_info(&self) -> Option<&FileInfo> {
        self.notes.file.as_ref()
    }

    /// Content bytes sent so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// The failure that ended this upload, if one did (a write then fails with its message):
    /// the agent's refusal, typed.
    pub fn error(&self) -> Option<&Error> {
        self.failed.as_ref()
    }

    /// Sends everything `reader` gives until its end, read straight into frames.
    pub fn send_from(&mut self, mut reader: impl Read) -> Result<u64, Error> {
        let start = self.sent;
        loop {
            let credit = self.wait_for_credit()?;
            let room = credit.min(MAX_DATA);
            let buf = &mut self.frame[DATA_HEADROOM..DATA_HEADROOM + room];
            let n = match reader.read(buf) {
                Ok(0) => return Ok(self.sent - start),
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(Error::Local {
                        context: "reading the content to send",
                        source,
                    })
                }
            };
            self.send_in_place(n)?;
        }
    }

    /// Frames and sends the `n` bytes at `frame[DATA_HEADROOM..]`.
    fn send_in_place(&mut self, n: usize) -> Result<(), Error> {
        let data = &self.frame[DATA_HEADROOM..DATA_HEADROOM + n];
        self.hasher.update(data);
        if let Err(err) = self.conn.shared().send_stdin_in_place(&mut self.frame, n) {
            return Err(self.fail_on_send(err));
        }
        self.sent += n as u64;
        if let Some(progress) = &self.progress {
            progress.add(n);
        }
        Ok(())
    }

    /// The credit available, receiving from the agent until there is some. An agent's error
    /// (it may refuse the put before any credit comes back) is returned typed.
    fn wait_for_credit(&mut self) -> Result<usize, Error> {
        self.check()?;
        loop {
            let credit = self.conn.shared().stdin_credit();
            if credit > 0 {
                return Ok(credit);
            }
            let received = self.receive()?;
            self.note(received)?;
        }
    }

    fn receive(&mut self) -> Result<Received, Error> {
        match self.conn.receive() {
            Ok(received) => Ok(received),
            Err(err) => Err(self.fail(err)),
        }
    }

    /// Takes what came while the content is being sent.
    fn note(&mut self, received: Received) -> Result<(), Error> {
        match received {
            Received::Credit => Ok(()),
            Received::FileReady(header) => {
                self.notes.file = Some(FileInfo::from_wire(&header));
                Ok(())
            }
            Received::Skipped(entry) => {
                self.notes.skip(entry);
                Ok(())
            }
            other => {
                let err = out_of_order(&other, "while a put's content was sent");
                Err(self.fail(err))
            }
        }
    }

    /// A failed send: the agent may have refused the put and closed. Its reason, when it is
    /// waiting in the socket, says more than the broken pipe.
    fn fail_on_send(&mut self, err: io::Error) -> Error {
        let reason = loop {
            match self.conn.receive() {
                Ok(Received::FileReady(header)) => {
                    self.notes.file = Some(FileInfo::from_wire(&header));
                }
                Ok(Received::Skipped(entry)) => self.notes.skip(entry),
                Ok(Received::Credit) => {}
                Ok(_) => break None,
                // What the agent said, or did wrong, explains the broken pipe.
                Err(err @ (Error::Remote(_) | Error::Protocol(_))) => break Some(err),
                Err(_) => break None,
            }
        };
        self.fail(reason.unwrap_or(Error::Io(err)))
    }

    fn fail(&mut self, err: Error) -> Error {
        self.conn.shared().close();
        // The first failure is the one to report; later ones follow from it.
        let kept = self.failed.take().unwrap_or(err);
        let copy = copy_error(&kept);
        self.failed = Some(kept);
        copy
    }

    fn check(&self) -> Result<(), Error> {
        match &self.failed {
            Some(err) => Err(copy_error(err)),
            None if self.finished => Err(Error::InvalidRequest("the put has ended".into())),
            None => Ok(()),
        }
    }

    /// Ends the content: sends its SHA-256, and waits for the agent to check it and commit
    /// the file. Succeeds only when the agent counted the same bytes and digest.
    pub fn finish(mut self) -> Result<Transferred, Error> {
        self.check()?;
        if let Some(declared) = self.declared.filter(|declared| *declared != self.sent) {
            // Abandoned (no end is sent): the agent writes nothing.
            return Err(self.fail(Error::InvalidRequest(format!(
                "the content was {} bytes, not the {declared} declared (did it change while \
                 it was read?)",
                self.sent
            ))));
        }
        self.finished = true;
        let digest: Sha256Digest = self.hasher.clone().finalize().into();
        if let Err(err) = self
            .conn
            .shared()
            .send_frame(|session, out| session.end_put(&digest, out))
        {
            let err = match err {
                Error::Io(err) => self.fail_on_send(err),
                other => self.fail(other),
            };
            return Err(err);
        }
        loop {
            match self.receive()? {
                Received::FileDone(summary) => {
                    check_summary(&summary, self.sent, &digest)?;
                    let notes = std::mem::take(&mut self.notes);
                    return Ok(notes.done(self.sent, digest));
                }
                // Credit for the last bytes may come before the end.
                other => self.note(other)?,
            }
        }
    }
}

impl Write for Upload {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        let credit = self.wait_for_credit().map_err(into_io)?;
        let n = data.len().min(credit).min(MAX_DATA);
        self.frame[DATA_HEADROOM..DATA_HEADROOM + n].copy_from_slice(&data[..n]);
        self.send_in_place(n).map_err(into_io)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        // Unfinished: the agent sees the connection end before the put's end, and drops it.
        self.conn.shared().shutdown();
    }
}

/// A get in progress, once the agent described the file ([`Download::file_info`]): read the
/// content (it implements [`Read`], which ends only when the agent's digest and byte count
/// matched ours), or copy it with [`Download::copy_to`]. [`Download::finish`] reads what is
/// left and returns the summary.
pub struct Download {
    conn: Connection,
    info: FileInfo,
    hasher: Sha256,
    received: u64,
    /// The part of the current chunk (in the connection's receive buffer) not read yet.
    pending: Range<usize>,
    notes: Notes,
    progress: Option<Progress>,
    /// The agent's summary matched ours: the end.
    summary: Option<(u64, Sha256Digest)>,
    failed: Option<Error>,
}

impl std::fmt::Debug for Download {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Download")
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

impl Download {
    /// Waits for the agent's `FileReady` (or its refusal) on a connection that sent a get.
    pub(crate) fn start(mut conn: Connection, get: &Get) -> Result<Download, Error> {
        let mut notes = Notes::default();
        let info = loop {
            match conn.receive()? {
                Received::FileReady(header) => break FileInfo::from_wire(&header),
                Received::Skipped(entry) => notes.skip(entry),
                other => return Err(out_of_order(&other, "before the file was ready")),
            }
        };
        notes.file = Some(info);
        Ok(Download {
            conn,
            info,
            hasher: Sha256::new(),
            received: 0,
            pending: 0..0,
            notes,
            progress: get.progress.clone(),
            summary: None,
            failed: None,
        })
    }

    /// The file as the agent described it before sending it.
    pub fn file_info(&self) -> &FileInfo {
        &self.info
    }

    /// Content bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// The failure that ended this download, if one did (a read then fails with its message).
    pub fn error(&self) -> Option<&Error> {
        self.failed.as_ref()
    }

    /// Entries of a tree the agent left out so far.
    pub fn skipped(&self) -> &[SkippedEntry] {
        &self.notes.skipped
    }

    /// Writes the rest of the content to `sink` straight from the receive buffer; succeeds only
    /// when the agent's summary matches what arrived.
    pub fn copy_to(mut self, mut sink: impl Write) -> Result<Transferred, Error> {
        loop {
            if !self.pending.is_empty() {
                let range = std::mem::replace(&mut self.pending, 0..0);
                if let Err(source) = sink.write_all(self.conn.chunk(range)) {
                    return Err(self.fail(Error::Local {
                        context: "writing the content received",
                        source,
                    }));
                }
            }
            if !self.next_chunk()? {
                return self.finish();
            }
        }
    }

    /// Reads (and discards) whatever content is left, then returns the summary: the typed
    /// error when the transfer failed.
    pub fn finish(mut self) -> Result<Transferred, Error> {
        if let Some(err) = self.failed.take() {
            return Err(err);
        }
        loop {
            self.pending = 0..0;
            if !self.next_chunk()? {
                break;
            }
        }
        let (bytes, sha256) = self.summary.unwrap_or_default();
        Ok(std::mem::take(&mut self.notes).done(bytes, sha256))
    }

    /// Receives the next chunk into `pending` (hashed and counted); `false` at the end, once
    /// the agent's summary matched ours.
    fn next_chunk(&mut self) -> Result<bool, Error> {
        if let Some(err) = &self.failed {
            return Err(copy_error(err));
        }
        if self.summary.is_some() {
            return Ok(false);
        }
        loop {
            let received = match self.conn.receive() {
                Ok(received) => received,
                Err(err) => return Err(self.fail(err)),
            };
            match received {
                Received::FileData(range) => {
                    let chunk = self.conn.chunk(range.clone());
                    self.hasher.update(chunk);
                    self.received += chunk.len() as u64;
                    if let Some(progress) = &self.progress {
                        progress.add(chunk.len());
                    }
                    self.pending = range;
                    return Ok(true);
                }
                Received::Skipped(entry) => self.notes.skip(entry),
                Received::FileDone(summary) => {
                    let digest: Sha256Digest = self.hasher.clone().finalize().into();
                    if let Err(err) = check_summary(&summary, self.received, &digest) {
                        return Err(self.fail(err));
                    }
                    self.summary = Some((self.received, digest));
                    return Ok(false);
                }
                other => {
                    let err = out_of_order(&other, "while a file's content arrived");
                    return Err(self.fail(err));
                }
            }
        }
    }

    fn fail(&mut self, err: Error) -> Error {
        self.conn.shared().close();
        let kept = self.failed.take().unwrap_or(err);
        let copy = copy_error(&kept);
        self.failed = Some(kept);
        copy
    }
}

impl Read for Download {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.pending.is_empty() && !self.next_chunk().map_err(into_io)? {
            return Ok(0);
        }
        let n = buf.len().min(self.pending.len());
        let start = self.pending.start;
        buf[..n].copy_from_slice(self.conn.chunk(start..start + n));
        self.pending.start += n;
        Ok(n)
    }
}

impl Drop for Download {
    fn drop(&mut self) {
        if self.summary.is_none() {
            self.conn.shared().shutdown();
        }
    }
}

/// An [`Error`] as an [`io::Error`] for the `Read` and `Write` impls (the typed one stays with
/// the transfer, for its `finish`).
fn into_io(err: Error) -> io::Error {
    let kind = match &err {
        Error::Io(io) | Error::Local { source: io, .. } => io.kind(),
        Error::IntegrityMismatch { .. } => io::ErrorKind::InvalidData,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, err)
}

/// A copy of `err` good enough to return while the original is kept: the same variant for the
/// errors a caller matches on, the message for the rest.
fn copy_error(err: &Error) -> Error {
    match err {
        Error::Remote(remote) => Error::Remote(remote.clone()),
        Error::IntegrityMismatch {
            agent_bytes,
            agent_sha256,
            bytes,
            sha256,
        } => Error::IntegrityMismatch {
            agent_bytes: *agent_bytes,
            agent_sha256: *agent_sha256,
            bytes: *bytes,
            sha256: *sha256,
        },
        Error::AgentSilent => Error::AgentSilent,
        Error::Disconnected(phase) => Error::Disconnected(phase),
        Error::InvalidRequest(why) => Error::InvalidRequest(why.clone()),
        Error::Protocol(why) => Error::Protocol(why.clone()),
        Error::Io(io) => Error::Io(io::Error::new(io.kind(), io.to_string())),
        Error::Local { context, source } => Error::Local {
            context,
            source: io::Error::new(source.kind(), source.to_string()),
        },
        other => Error::Protocol(other.to_string()),
    }
}

/// A wall-clock time on the wire.
pub(crate) fn timestamp(time: SystemTime) -> Timestamp {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => Timestamp {
            secs: i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
            nanos: after.subsec_nanos(),
        },
        Err(before) => {
            let before = before.duration();
            let (secs, nanos) = match before.subsec_nanos() {
                0 => (before.as_secs(), 0),
                n => (before.as_secs() + 1, 1_000_000_000 - n),
            };
            Timestamp {
                secs: i64::try_from(secs).map_or(i64::MIN, |secs| -secs),
                nanos,
            }
        }
    }
}

/// A wire time as a [`SystemTime`] (out of range: the epoch).
pub(crate) fn system_time(time: Timestamp) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(time.nanos.min(999_999_999)));
    let at = if time.secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(time.secs.unsigned_abs()))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(time.secs.unsigned_abs()))
    };
    at.and_then(|at| at.checked_add(nanos))
        .unwrap_or(UNIX_EPOCH)
}

/// Hex text of a digest, as `sha256sum` prints it.
pub fn hex(digest: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut text = String::with_capacity(digest.len() * 2);
    for byte in digest {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_on_both_sides_of_the_epoch() {
        for time in [
            UNIX_EPOCH,
            UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789),
            UNIX_EPOCH - Duration::new(5, 250_000_000),
            UNIX_EPOCH - Duration::from_secs(3),
        ] {
            let wire = timestamp(time);
            assert!(wire.is_valid(), "{wire:?}");
            assert_eq!(system_time(wire), time);
        }
        assert_eq!(
            timestamp(UNIX_EPOCH - Duration::new(5, 250_000_000)),
            Timestamp {
                secs: -6,
                nanos: 750_000_000
            }
        );
    }

    #[test]
    fn paths_must_be_absolute_and_users_not_empty() {
        assert!(Put::file("rel/x").request().is_err());
        assert!(Put::file("/a\0b").request().is_err());
        assert!(Get::file("").request().is_err());
        assert!(Put::file("/x").user("").request().is_err());
        assert!(Put::file("/x").owner("a\0").request().is_err());
        let mut put = Put::file("/x");
        put.mode(0o755).owner("app:app").size(3).no_clobber(true);
        let request = put.request().unwrap();
        assert_eq!(request.mode, Some(0o755));
        assert_eq!(request.owner, Some(Bytes(b"app:app")));
        assert_eq!(request.size, Some(3));
        assert!(request.no_clobber && !request.create_parents);
        assert_eq!(hex(&[0, 0xab, 0xff]), "00abff");
    }
}
