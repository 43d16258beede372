//! `ferry cp`: files and directories between the host and the guest, like `docker cp`.
//!
//! A guest path is written `:PATH` (absolute); `-` is stdin or stdout. Exactly one side is in
//! the guest. A put sends the local file's mode, modification time and size (so the agent
//! checks its limits and free space first); a get writes a temporary file beside the
//! destination and renames it into place once the agent's SHA-256 matched, so a failure leaves
//! nothing behind. Directories (`-r`) travel as tar streams (ustar + pax).

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, IsTerminal, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use ferry_host::{hex, Client, Error, ErrorCode, Get, Progress, Put, SkipReason, Transferred};

/// A transfer failed (the agent refused, the content did not match, a local file could not be
/// read or written).
const EXIT_FAILED: u8 = 1;
/// Usage errors and ferry's own (transport, protocol), as for `exec`.
const EXIT_FERRY: u8 = 255;

/// `ferry cp`'s arguments.
#[derive(clap::Args)]
#[command(after_help = "\
Paths:
  :PATH      a path in the guest (absolute)
  -          stdin (as SRC) or stdout (as DST)
  DST ending in '/' (or an existing local directory) means DST/NAME, NAME being SRC's last
  component. Without it a guest DST is the file (or, with -r, the directory) itself.

Examples:
  ferry cp build.tar :/tmp/in.tar        ferry cp :/var/log/app.log .
  tar c src | ferry cp - :/tmp/src.tar   ferry cp :/etc/hostname -
  ferry cp -r ./site :/srv/www           ferry cp -r :/var/log ./guest-logs

A file put keeps the local file's mode and modification time (--mode overrides the mode); a
get keeps the guest file's. A get writes a temporary file beside the destination and renames
it into place only once the agent's SHA-256 and byte count matched ours: a failure leaves
nothing behind. With -r, a directory travels as a tar stream: regular files, directories and
symbolic links, with their modes and times (devices, sockets and fifos are skipped, with a
note); the agent and the CLI refuse entries that would land outside the destination. A new
destination directory is unpacked beside its place and renamed into it at the end (atomic: a
failure leaves nothing), taking the source directory's mode and time; an existing one is
merged into, NOT atomically: entries land as they arrive, and a failure leaves what was
unpacked so far (--no-clobber refuses an existing destination instead).

Exit status: 0 on success, 1 when the transfer failed, 255 for usage errors and when the agent
cannot be reached.")]
pub struct CpArgs {
    /// What to copy: a local path, `-` (stdin) or `:PATH` in the guest
    #[arg(value_name = "SRC")]
    src: OsString,

    /// Where to: a local path, `-` (stdout) or `:PATH` in the guest
    #[arg(value_name = "DST")]
    dst: OsString,

    /// Copy directories, as tar streams
    #[arg(short = 'r', long)]
    recursive: bool,

    /// The file's permission bits, in octal (default: the source's; 0644 from stdin)
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    mode: Option<u32>,

    /// Put only: the guest file's owner, NAME[:GROUP] or UID[:GID] (the agent's policy decides)
    #[arg(long, value_name = "OWNER")]
    owner: Option<OsString>,

    /// Create missing parent directories of the destination
    #[arg(short = 'p', long)]
    parents: bool,

    /// Fail instead of replacing an existing destination
    #[arg(long)]
    no_clobber: bool,

    /// Transfer as this guest user (NAME[:GROUP] or UID[:GID]) instead of the agent's default;
    /// the agent's policy decides who may be asked for
    #[arg(short = 'u', long = "user", value_name = "USER[:GROUP]")]
    user: Option<OsString>,

    /// After success, print `SHA256  NAME` as sha256sum does (NAME: the local side; on stderr
    /// when the content went to stdout). With -r, the digest of the tar stream
    #[arg(long)]
    digest: bool,

    /// No progress bar
    #[arg(short = 'q', long)]
    quiet: bool,
}

fn parse_mode(text: &str) -> Result<u32, String> {
    match u32::from_str_radix(text, 8) {
        Ok(mode) if mode <= 0o7777 => Ok(mode),
        _ => Err(format!("{text:?} is not an octal mode (at most 7777)")),
    }
}

/// One side of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Side {
    /// `:PATH`: the guest.
    Guest(Vec<u8>),
    /// `-`: stdin or stdout.
    Stdio,
    Local(PathBuf),
}

impl Side {
    fn parse(text: &OsStr) -> Side {
        let bytes = text.as_bytes();
        match bytes {
            b"-" => Side::Stdio,
            [b':', path @ ..] => Side::Guest(path.to_vec()),
            _ => Side::Local(PathBuf::from(text)),
        }
    }
}

/// The last component of a guest path (`None` for `/`).
fn guest_name(path: &[u8]) -> Option<&[u8]> {
    path.split(|b| *b == b'/')
        .rev()
        .find(|part| !part.is_empty() && *part != b".")
        .filter(|part| *part != b"..")
}

fn usage(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("ferry: cp: {message}");
    ExitCode::from(EXIT_FERRY)
}

/// A failure about `what` (a path as the user wrote it); transport failures are ferry's own.
fn failed(what: &str, err: &Error) -> ExitCode {
    let code = match err {
        Error::Remote(_)
        | Error::IntegrityMismatch { .. }
        | Error::Local { .. }
        | Error::InvalidRequest(_) => EXIT_FAILED,
        _ => EXIT_FERRY,
    };
    match err {
        Error::Remote(_) | Error::InvalidRequest(_) => eprintln!("ferry: {what}: {err}"),
        _ => eprintln!("ferry: {err}"),
    }
    ExitCode::from(code)
}

fn local_failure(what: &Path, err: &io::Error) -> ExitCode {
    eprintln!("ferry: {}: {}", what.display(), describe_io(err));
    ExitCode::from(EXIT_FAILED)
}

/// An I/O error as `message (ENAME)`, like the agent's.
fn describe_io(err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(errno) => {
            let text = io::Error::from_raw_os_error(errno).to_string();
            let text = text
                .split(" (os error")
                .next()
                .unwrap_or(&text)
                .to_lowercase();
            format!("{text} ({})", ferry_host::errno_name(errno.unsigned_abs()))
        }
        None => err.to_string(),
    }
}

pub fn cp(client: &Client, args: CpArgs) -> ExitCode {
    let (src, dst) = (Side::parse(&args.src), Side::parse(&args.dst));
    for side in [&src, &dst] {
        if let Side::Guest(path) = side {
            if path.first() != Some(&b'/') {
                return usage(format_args!(
                    "a guest path must be absolute: :{}",
                    String::from_utf8_lossy(path)
                ));
            }
        }
    }
    match (src, dst) {
        (Side::Guest(_), Side::Guest(_)) => {
            usage("both paths are in the guest; one must be local (or -)")
        }
        (Side::Guest(src), dst) => {
            if args.owner.is_some() {
                return usage("--owner applies to a put (a copy into the guest)");
            }
            let dst = match dst {
                Side::Local(path) => Some(path),
                _ => None,
            };
            if args.recursive {
                get_tree(client, &args, &src, dst)
            } else {
                get_file(client, &args, &src, dst)
            }
        }
        (src, Side::Guest(dst)) => {
            let src = match src {
                Side::Local(path) => Some(path),
                _ => None,
            };
            if args.recursive {
                put_tree(client, &args, src, &dst)
            } else {
                put_file(client, &args, src, &dst)
            }
        }
        _ => usage("neither path is in the guest: write a guest path as :PATH"),
    }
}

/// The guest destination: `DST/NAME` when it ends in '/'.
fn guest_destination(dst: &[u8], name: Option<&OsStr>) -> Result<Vec<u8>, ExitCode> {
    if !dst.ends_with(b"/") || dst == b"/" && name.is_none() {
        return Ok(dst.to_vec());
    }
    let Some(name) = name else {
        return Err(usage(
            "the destination is a directory (it ends in '/') and the source has no name",
        ));
    };
    let mut path = dst.to_vec();
    path.extend_from_slice(name.as_bytes());
    Ok(path)
}

fn configure_put(put: &mut Put, args: &CpArgs, progress: &Progress) {
    put.create_parents(args.parents)
        .no_clobber(args.no_clobber)
        .progress(progress);
    if let Some(owner) = &args.owner {
        put.owner(owner);
    }
    if let Some(user) = &args.user {
        put.user(user);
    }
}

/// A put of one file; `src` `None` is stdin.
fn put_file(client: &Client, args: &CpArgs, src: Option<PathBuf>, dst: &[u8]) -> ExitCode {
    let (reader, name, metadata): (Box<dyn Read>, _, _) = match &src {
        None => (Box::new(io::stdin().lock()), None, None),
        Some(path) => {
            let file = match File::open(path) {
                Ok(file) => file,
                Err(err) => return local_failure(path, &err),
            };
            let metadata = match file.metadata() {
                Ok(metadata) => metadata,
                Err(err) => return local_failure(path, &err),
            };
            if metadata.is_dir() {
                eprintln!(
                    "ferry: {}: is a directory (copy it with -r)",
                    path.display()
                );
                return ExitCode::from(EXIT_FAILED);
            }
            (Box::new(file), path.file_name(), Some(metadata))
        }
    };
    let dst = match guest_destination(dst, name) {
        Ok(dst) => dst,
        Err(code) => return code,
    };
    let progress = Progress::new();
    let mut put = Put::file(OsStr::from_bytes(&dst));
    configure_put(&mut put, args, &progress);
    let mut total = None;
    if let Some(metadata) = metadata.filter(|metadata| metadata.is_file()) {
        put.size(metadata.len())
            .mode(args.mode.unwrap_or(metadata.mode() & 0o7777));
        if let Ok(mtime) = metadata.modified() {
            put.mtime(mtime);
        }
        total = Some(metadata.len());
    } else if let Some(mode) = args.mode {
        put.mode(mode);
    }
    let bar = Bar::start(&progress, total, args.quiet);
    let result = client.put(&put, reader);
    bar.finish();
    let what = format!(":{}", String::from_utf8_lossy(&dst));
    match result {
        Ok(done) => report(args, &done, &side_name(&src), false),
        Err(err @ Error::Local { .. }) => {
            eprintln!("ferry: {}: {err}", side_name(&src));
            ExitCode::from(EXIT_FAILED)
        }
        Err(err) => failed(&what, &err),
    }
}

/// A local side as the user wrote it (`-` for stdio).
fn side_name(side: &Option<PathBuf>) -> String {
    match side {
        None => "-".into(),
        Some(path) => path.display().to_string(),
    }
}

/// Notes, the digest line; success.
fn report(args: &CpArgs, done: &Transferred, local_name: &str, data_on_stdout: bool) -> ExitCode {
    for entry in &done.skipped {
        let why = match entry.reason {
            SkipReason::Special => "special file",
            SkipReason::HardLink => "hard link",
            SkipReason::UnknownType => "unknown entry type",
            SkipReason::Unreadable => "unreadable or vanished",
        };
        eprintln!(
            "ferry: skipped {} ({why})",
            String::from_utf8_lossy(&entry.path)
        );
    }
    let more = done.skipped_total.saturating_sub(done.skipped.len() as u64);
    if more > 0 {
        eprintln!("ferry: skipped {more} more entries");
    }
    if args.digest {
        let line = format!("{}  {local_name}", hex(&done.sha256));
        if data_on_stdout {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }
    ExitCode::SUCCESS
}

/// Where a get's content goes: `DST` itself, or `DST/NAME` for a directory.
fn local_destination(dst: &Path, name: Option<&[u8]>, into_existing_dir: bool) -> Option<PathBuf> {
    let ends_in_slash = dst.as_os_str().as_bytes().ends_with(b"/");
    if ends_in_slash || (into_existing_dir && dst.is_dir()) {
        Some(dst.join(OsStr::from_bytes(name?)))
    } else {
        Some(dst.to_path_buf())
    }
}

/// A get of one file; `dst` `None` is stdout.
fn get_file(client: &Client, args: &CpArgs, src: &[u8], dst: Option<PathBuf>) -> ExitCode {
    let what = format!(":{}", String::from_utf8_lossy(src));
    let target = match &dst {
        Some(dst) => match local_destination(dst, guest_name(src), true) {
            Some(target) => Some(target),
            None => return usage(format_args!("{what} has no file name to copy to")),
        },
        None => None,
    };
    if let Some(target) = &target {
        if let Err(code) = prepare_local(args, target) {
            return code;
        }
    }
    let progress = Progress::new();
    let mut get = Get::file(OsStr::from_bytes(src));
    get.progress(&progress);
    if let Some(user) = &args.user {
        get.user(user);
    }
    // The agent's refusal comes here, before anything is written locally.
    let download = match client.download(&get) {
        Ok(download) => download,
        Err(err) if err.remote_code() == Some(ErrorCode::WrongFileType) => {
            eprintln!("ferry: {what}: {err} (a directory is copied with -r)");
            return ExitCode::from(EXIT_FAILED);
        }
        Err(err) => return failed(&what, &err),
    };
    let info = *download.file_info();
    let bar = Bar::start(&progress, Some(info.size), args.quiet);
    let Some(target) = target else {
        let result = download.copy_to(io::stdout().lock());
        bar.finish();
        return match result {
            Ok(done) => report(args, &done, "-", true),
            Err(err) => failed(&what, &err),
        };
    };
    // A device or a fifo at the destination (`/dev/null`, a named pipe) is written into, as
    // `cp` does: never renamed over (as root that would replace the device with a file).
    if fs::metadata(&target).is_ok_and(|meta| !meta.is_file() && !meta.is_dir()) {
        let sink = match fs::OpenOptions::new().write(true).open(&target) {
            Ok(sink) => sink,
            Err(err) => return local_failure(&target, &err),
        };
        let result = download.copy_to(sink);
        bar.finish();
        return match result {
            Ok(done) => report(args, &done, &target.display().to_string(), false),
            Err(err) => failed(&what, &err),
        };
    }
    let mut staged = match Staged::file(&target) {
        Ok(staged) => staged,
        Err(err) => return local_failure(&target, &err),
    };
    let result = download.copy_to(&mut staged.file);
    bar.finish();
    let done = match result {
        Ok(done) => done,
        Err(err) => return failed(&what, &err),
    };
    let mode = args.mode.unwrap_or(info.mode & 0o7777);
    if let Err(err) = staged.commit(mode, info.mtime, args.no_clobber) {
        return local_failure(&target, &err);
    }
    report(args, &done, &target.display().to_string(), false)
}

/// Checks a local destination before anything is transferred: its directory (created with
/// -p), and --no-clobber.
fn prepare_local(args: &CpArgs, target: &Path) -> Result<(), ExitCode> {
    if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
        if args.parents {
            fs::create_dir_all(parent).map_err(|err| local_failure(parent, &err))?;
        } else if !parent.is_dir() {
            let err = io::Error::from_raw_os_error(libc::ENOENT);
            return Err(local_failure(parent, &err));
        }
    }
    if args.no_clobber && target.symlink_metadata().is_ok() {
        let err = io::Error::from_raw_os_error(libc::EEXIST);
        return Err(local_failure(target, &err));
    }
    Ok(())
}

/// Paths a signal must remove before the CLI dies: temporary files and directories.
static STAGED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Removes the staged paths when SIGINT, SIGTERM or SIGHUP ends the CLI mid-transfer.
fn clean_up_on_signals() {
    static INSTALLED: AtomicBool = AtomicBool::new(false);
    if INSTALLED.swap(true, Ordering::SeqCst) {
        return;
    }
    let signals = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];
    let Ok(mut caught) = signal_hook::iterator::Signals::new(signals) else {
        return;
    };
    thread::spawn(move || {
        if let Some(signal) = caught.forever().next() {
            let staged = STAGED.lock().map(|paths| paths.clone()).unwrap_or_default();
            for path in staged {
                let _ = fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path));
            }
            std::process::exit(128 + signal);
        }
    });
}

/// A temporary file (or directory) beside the destination, removed unless committed.
struct Staged {
    file: File,
    temporary: PathBuf,
    target: PathBuf,
    committed: bool,
}

/// A name for a temporary beside `target`: `.NAME.ferry-PID-N`.
fn temporary_beside(target: &Path) -> PathBuf {
    use std::sync::atomic::AtomicU32;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = target.file_name().unwrap_or(OsStr::new("ferry"));
    let mut temporary = OsString::from(".");
    temporary.push(name);
    temporary.push(format!(
        ".ferry-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    target.with_file_name(temporary)
}

fn stage(path: &Path) {
    clean_up_on_signals();
    if let Ok(mut staged) = STAGED.lock() {
        staged.push(path.to_path_buf());
    }
}

fn unstage(path: &Path) {
    if let Ok(mut staged) = STAGED.lock() {
        staged.retain(|staged| staged != path);
    }
}

impl Staged {
    fn file(target: &Path) -> io::Result<Staged> {
        let temporary = temporary_beside(target);
        stage(&temporary);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary);
        let file = match file {
            Ok(file) => file,
            Err(err) => {
                unstage(&temporary);
                return Err(err);
            }
        };
        Ok(Staged {
            file,
            temporary,
            target: target.to_path_buf(),
            committed: false,
        })
    }

    /// Mode, time, sync, then the rename (a link for --no-clobber: it fails if the target
    /// appeared meanwhile).
    fn commit(&mut self, mode: u32, mtime: SystemTime, no_clobber: bool) -> io::Result<()> {
        self.file
            .set_permissions(fs::Permissions::from_mode(mode))?;
        self.file.set_modified(mtime)?;
        self.file.sync_all()?;
        if no_clobber {
            fs::hard_link(&self.temporary, &self.target)?;
            fs::remove_file(&self.temporary)?;
        } else {
            fs::rename(&self.temporary, &self.target)?;
        }
        self.committed = true;
        unstage(&self.temporary);
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.temporary);
            unstage(&self.temporary);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Trees.

fn put_tree(client: &Client, args: &CpArgs, src: Option<PathBuf>, dst: &[u8]) -> ExitCode {
    let Some(root) = src else {
        return usage("-r needs a local directory as SRC (a tar stream on stdin: cp without -r)");
    };
    if args.mode.is_some() {
        return usage("--mode applies to a file; a tree's entries keep their own");
    }
    let root_metadata = match fs::metadata(&root) {
        Ok(metadata) if metadata.is_dir() => metadata,
        Ok(_) => {
            eprintln!("ferry: {}: not a directory", root.display());
            return ExitCode::from(EXIT_FAILED);
        }
        Err(err) => return local_failure(&root, &err),
    };
    let name = root
        .canonicalize()
        .ok()
        .and_then(|path| path.file_name().map(OsStr::to_os_string));
    let dst = match guest_destination(dst, name.as_deref()) {
        Ok(dst) => dst,
        Err(code) => return code,
    };
    let what = format!(":{}", String::from_utf8_lossy(&dst));
    let progress = Progress::new();
    let mut put = Put::tree(OsStr::from_bytes(&dst));
    configure_put(&mut put, args, &progress);
    // The directory's own mode and time, for a destination the put creates.
    put.mode(root_metadata.mode() & 0o7777);
    if let Ok(mtime) = root_metadata.modified() {
        put.mtime(mtime);
    }
    let mut upload = match client.upload(&put) {
        Ok(upload) => upload,
        Err(err) => return failed(&what, &err),
    };
    let bar = Bar::start(&progress, None, args.quiet);
    let packed = {
        // Headers are 512 bytes: gathered into frames of the protocol's size, not one each.
        let writer = BufWriter::with_capacity(PACK_BUFFER, &mut upload);
        let mut builder = tar::Builder::new(writer);
        pack(&mut builder, &root, Path::new(""))
            .and_then(|()| builder.into_inner())
            .and_then(|mut writer| writer.flush())
    };
    let result = match packed {
        Ok(()) => upload.finish(),
        Err(err) => {
            bar.finish();
            if let Some(remote) = upload.error() {
                return failed(&what, remote);
            }
            eprintln!("ferry: {}: {}", root.display(), describe_io(&err));
            // Dropped unfinished: the agent abandons the tree.
            return ExitCode::from(EXIT_FAILED);
        }
    };
    bar.finish();
    match result {
        Ok(done) => report(args, &done, &root.display().to_string(), false),
        Err(err) => failed(&what, &err),
    }
}

/// What the packer gathers before it writes to the upload: whole frames of the protocol's
/// largest data size, not one 512-byte header per frame.
const PACK_BUFFER: usize = 64 * 1024;

/// Appends the tree under `root/relative` (not the root itself), entries sorted by name.
fn pack<W: Write>(builder: &mut tar::Builder<W>, root: &Path, relative: &Path) -> io::Result<()> {
    let dir = root.join(relative);
    let mut entries = fs::read_dir(&dir)
        .map_err(|err| at_path(&dir, err))?
        .map(|entry| entry.map(|entry| entry.file_name()))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|err| at_path(&dir, err))?;
    entries.sort();
    for name in entries {
        let name = relative.join(name);
        let path = root.join(&name);
        let metadata = fs::symlink_metadata(&path).map_err(|err| at_path(&path, err))?;
        let kind = metadata.file_type();
        let mut header = tar::Header::new_ustar();
        header.set_metadata_in_mode(&metadata, tar::HeaderMode::Complete);
        if kind.is_dir() {
            header.set_size(0);
            append(builder, header, &name, None, io::empty())?;
            pack(builder, root, &name)?;
        } else if kind.is_file() {
            let file = File::open(&path).map_err(|err| at_path(&path, err))?;
            let exact = Exact {
                inner: file.take(metadata.len()),
                left: metadata.len(),
                path: path.clone(),
            };
            append(builder, header, &name, None, exact)?;
        } else if kind.is_symlink() {
            let target = fs::read_link(&path).map_err(|err| at_path(&path, err))?;
            header.set_size(0);
            append(builder, header, &name, Some(&target), io::empty())?;
        } else {
            eprintln!("ferry: skipped {} (special file)", name.display());
        }
    }
    Ok(())
}

fn at_path(path: &Path, err: io::Error) -> io::Error {
    io::Error::new(
        err.kind(),
        format!("{}: {}", path.display(), describe_io(&err)),
    )
}

/// Appends one entry; a name or link target too long for ustar goes in a pax header before it.
fn append<W: Write>(
    builder: &mut tar::Builder<W>,
    mut header: tar::Header,
    name: &Path,
    link: Option<&Path>,
    data: impl Read,
) -> io::Result<()> {
    let mut pax = Vec::new();
    let mut name_bytes = name.as_os_str().as_bytes().to_vec();
    if header.entry_type().is_dir() {
        name_bytes.push(b'/');
    }
    if header.set_path(OsStr::from_bytes(&name_bytes)).is_err() || name_bytes.len() > 99 {
        pax_record(&mut pax, "path", &name_bytes);
        set_truncated(&mut header.as_old_mut().name, &name_bytes);
        if let Some(ustar) = header.as_ustar_mut() {
            ustar.prefix.fill(0);
        }
    }
    if let Some(link) = link {
        let link = link.as_os_str().as_bytes();
        if header.set_link_name(OsStr::from_bytes(link)).is_err() || link.len() > 99 {
            pax_record(&mut pax, "linkpath", link);
            set_truncated(&mut header.as_old_mut().linkname, link);
        }
    }
    if !pax.is_empty() {
        let mut extension = tar::Header::new_ustar();
        extension.set_entry_type(tar::EntryType::XHeader);
        extension.set_size(pax.len() as u64);
        extension.set_mode(0o644);
        let mut pax_name = b"PaxHeader/".to_vec();
        pax_name.extend(name_bytes.iter().take(80));
        set_truncated(&mut extension.as_old_mut().name, &pax_name);
        extension.set_cksum();
        builder.append(&extension, &pax[..])?;
    }
    header.set_cksum();
    builder.append(&header, data)
}

fn set_truncated(field: &mut [u8], value: &[u8]) {
    field.fill(0);
    let n = value.len().min(field.len() - 1);
    field[..n].copy_from_slice(&value[..n]);
}

/// A pax record: `LENGTH KEY=VALUE\n`, LENGTH counting itself.
fn pax_record(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    let rest = key.len() + value.len() + 3;
    let mut length = rest + 1;
    while length != rest + length.to_string().len() {
        length = rest + length.to_string().len();
    }
    out.extend_from_slice(format!("{length} {key}=").as_bytes());
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// A file's content, exactly as long as its header said (a file that shrank while it was read
/// would otherwise corrupt the stream).
struct Exact<R> {
    inner: R,
    left: u64,
    path: PathBuf,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{}: changed while it was read", self.path.display()),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn get_tree(client: &Client, args: &CpArgs, src: &[u8], dst: Option<PathBuf>) -> ExitCode {
    let what = format!(":{}", String::from_utf8_lossy(src));
    let Some(dst) = dst else {
        return usage("-r needs a local directory as DST (a tar stream on stdout: cp without -r)");
    };
    if args.mode.is_some() {
        return usage("--mode applies to a file; a tree's entries keep their own");
    }
    let Some(target) = local_destination(&dst, guest_name(src), true) else {
        return usage(format_args!("{what} has no name to copy to"));
    };
    let merge = target.is_dir();
    if merge && args.no_clobber {
        let err = io::Error::from_raw_os_error(libc::EEXIST);
        return local_failure(&target, &err);
    }
    if !merge {
        if let Err(code) = prepare_local(args, &target) {
            return code;
        }
    }
    let progress = Progress::new();
    let mut get = Get::tree(OsStr::from_bytes(src));
    get.progress(&progress);
    if let Some(user) = &args.user {
        get.user(user);
    }
    let mut download = match client.download(&get) {
        Ok(download) => download,
        Err(err) => return failed(&what, &err),
    };
    let info = *download.file_info();
    // A new tree is unpacked beside its place and renamed into it at the end; an existing
    // directory is merged into.
    let unpack_into = if merge {
        target.clone()
    } else {
        let staging = temporary_beside(&target);
        stage(&staging);
        if let Err(err) = fs::DirBuilder::new().mode(0o700).create(&staging) {
            unstage(&staging);
            return local_failure(&staging, &err);
        }
        staging
    };
    let bar = Bar::start(&progress, None, args.quiet);
    let unpacked = unpack(&mut download, &unpack_into);
    let result = match unpacked {
        Ok(()) => download.finish().map_err(|err| failed(&what, &err)),
        Err(err) => Err(match download.error() {
            Some(remote) => failed(&what, remote),
            None => {
                eprintln!("ferry: {}: {}", target.display(), err);
                ExitCode::from(EXIT_FAILED)
            }
        }),
    };
    bar.finish();
    let done = match result {
        Ok(done) => done,
        Err(code) => {
            if !merge {
                let _ = fs::remove_dir_all(&unpack_into);
                unstage(&unpack_into);
            }
            return code;
        }
    };
    if !merge {
        let committed =
            fs::set_permissions(&unpack_into, fs::Permissions::from_mode(info.mode & 0o7777))
                .and_then(|()| File::open(&unpack_into)?.set_modified(info.mtime))
                .and_then(|()| fs::rename(&unpack_into, &target));
        if let Err(err) = committed {
            let _ = fs::remove_dir_all(&unpack_into);
            unstage(&unpack_into);
            return local_failure(&target, &err);
        }
        unstage(&unpack_into);
    }
    report(args, &done, &target.display().to_string(), false)
}

/// Unpacks a tar stream into `dir`, which the caller made: regular files, directories and
/// symbolic links. An entry whose name is absolute or climbs out with `..` is refused (the
/// whole transfer fails), as is one that would be written through a symbolic link that leads
/// out of `dir` (the tar crate checks every parent against `dir`, canonicalized, and never
/// writes a file through an existing link). Anything else is skipped with a note.
pub(crate) fn unpack(stream: impl Read, dir: &Path) -> io::Result<()> {
    let mut archive = tar::Archive::new(stream);
    // Permission bits without set-id bits: the guest's setuid file is not the host's.
    archive.set_preserve_permissions(false);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    // Directories last, deepest first: their modes (0555, say) and times must not stop or
    // change what goes in them.
    let mut directories = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let name = entry.path()?.into_owned();
        check_name(&name)?;
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                // Created now, so children can be; its mode and time at the end.
                make_dir_inside(dir, &name)?;
                let header = entry.header();
                directories.push((name, header.mode()?, header.mtime()?));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::Symlink => {
                if !entry.unpack_in(dir)? {
                    return Err(escape(&name));
                }
            }
            // Pax and GNU extensions are read by the iterator; they never come here.
            other => eprintln!(
                "ferry: skipped {} ({})",
                name.display(),
                if other.is_hard_link() {
                    "hard link"
                } else {
                    "special file"
                }
            ),
        }
    }
    for (name, mode, mtime) in directories.into_iter().rev() {
        let path = dir.join(&name);
        // The entry made it a directory inside `dir`; a later symlink of the same name may
        // have replaced it: only a real directory is touched.
        if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode & 0o777))?;
            let time = SystemTime::UNIX_EPOCH + Duration::from_secs(mtime);
            File::open(&path)?.set_modified(time)?;
        }
    }
    Ok(())
}

/// Creates `dir/name` and the directories on the way, every one a real directory: a symbolic
/// link on the way (which could lead anywhere) is refused.
fn make_dir_inside(dir: &Path, name: &Path) -> io::Result<()> {
    let mut path = dir.to_path_buf();
    for part in name.components() {
        let Component::Normal(part) = part else {
            continue;
        };
        path.push(part);
        match fs::symlink_metadata(&path) {
            Ok(metadata) if metadata.is_dir() => {}
            Ok(_) => return Err(escape(name)),
            // `mkdir` never follows a link in its last component.
            Err(err) if err.kind() == io::ErrorKind::NotFound => fs::create_dir(&path)?,
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

fn check_name(name: &Path) -> io::Result<()> {
    let climbs = name
        .components()
        .any(|part| !matches!(part, Component::Normal(_) | Component::CurDir));
    if climbs || name.as_os_str().is_empty() {
        return Err(escape(name));
    }
    Ok(())
}

fn escape(name: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "the tree's entry {:?} would land outside the destination: refused",
            name.as_os_str()
        ),
    )
}

// ---------------------------------------------------------------------------------------------
// The progress bar.

/// A progress bar on stderr for a transfer that takes a while, when stderr is a terminal.
struct Bar {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

/// How long a transfer runs before it gets a bar (a short one never shows one).
const BAR_AFTER: Duration = Duration::from_millis(500);

impl Bar {
    fn start(progress: &Progress, total: Option<u64>, quiet: bool) -> Bar {
        let stop = Arc::new(AtomicBool::new(false));
        if quiet || !io::stderr().is_terminal() {
            return Bar { stop, thread: None };
        }
        let (progress, stopped) = (progress.clone(), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            let started = Instant::now();
            let mut bar: Option<indicatif::ProgressBar> = None;
            while !stopped.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(100));
                if bar.is_none() && started.elapsed() >= BAR_AFTER {
                    bar = Some(new_bar(total));
                }
                if let Some(bar) = &bar {
                    bar.set_position(progress.bytes());
                }
            }
            if let Some(bar) = bar {
                bar.set_position(progress.bytes());
                bar.finish_and_clear();
            }
        });
        Bar {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn new_bar(total: Option<u64>) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let (bar, template) = match total {
        Some(total) => (
            ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr()),
            "{wide_bar} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
        ),
        None => (
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
            "{spinner} {binary_bytes} {binary_bytes_per_sec} {elapsed}",
        ),
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_and_names() {
        assert_eq!(Side::parse(OsStr::new("-")), Side::Stdio);
        assert_eq!(Side::parse(OsStr::new(":/x")), Side::Guest(b"/x".to_vec()));
        assert_eq!(
            Side::parse(OsStr::new("./:x")),
            Side::Local(PathBuf::from("./:x"))
        );
        assert_eq!(guest_name(b"/var/log/app.log"), Some(&b"app.log"[..]));
        assert_eq!(guest_name(b"/var/log/"), Some(&b"log"[..]));
        assert_eq!(guest_name(b"/"), None);
        assert_eq!(guest_name(b"/a/.."), None);
        assert_eq!(
            guest_destination(b"/tmp/", Some(OsStr::new("f"))).ok(),
            Some(b"/tmp/f".to_vec())
        );
        assert_eq!(
            guest_destination(b"/tmp/x", Some(OsStr::new("f"))).ok(),
            Some(b"/tmp/x".to_vec())
        );
    }

    #[test]
    fn pax_records_count_their_own_length() {
        for len in [1, 5, 90, 95, 96, 200, 995, 1000] {
            let mut out = Vec::new();
            pax_record(&mut out, "path", &vec![b'a'; len]);
            let text = String::from_utf8(out.clone()).unwrap();
            let declared: usize = text.split(' ').next().unwrap().parse().unwrap();
            assert_eq!(declared, out.len(), "{len}");
        }
    }

    /// A fresh directory of this test's own.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ferry-cp-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A raw tar entry: name, type, link target, data.
    type RawEntry<'a> = (&'a [u8], tar::EntryType, &'a [u8], &'a [u8]);

    /// A tar stream with raw entries.
    fn raw_tar(entries: &[RawEntry<'_>]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, kind, link, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            set_truncated(&mut header.as_old_mut().name, name);
            set_truncated(&mut header.as_old_mut().linkname, link);
            header.set_cksum();
            builder.append(&header, *data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    /// Streams that try to write outside the destination: each is refused, and nothing lands
    /// outside.
    #[test]
    fn unpacking_never_writes_outside_the_destination() {
        use tar::EntryType::{Directory, Link, Regular, Symlink};
        let base = scratch("escape");
        let outside = base.join("outside");
        fs::create_dir(&outside).unwrap();
        let out = outside.to_str().unwrap().as_bytes();
        let victim = format!("{}/victim", outside.display());
        let cases: Vec<Vec<RawEntry<'_>>> = vec![
            vec![(b"../outside/victim", Regular, b"", b"x")],
            vec![(victim.as_bytes(), Regular, b"", b"x")],
            vec![(b"a/../../outside/victim", Regular, b"", b"x")],
            // A link to outside, then a file through it.
            vec![(b"l", Symlink, out, b""), (b"l/victim", Regular, b"", b"x")],
            // A link to outside, then a directory through it.
            vec![(b"l", Symlink, out, b""), (b"l/sub", Directory, b"", b"")],
            // A link named like the file that follows: the file must not go through it.
            vec![
                (b"f", Symlink, victim.as_bytes(), b""),
                (b"f", Regular, b"", b"x"),
            ],
            // A relative link climbing out, then a file through it.
            vec![
                (b"up", Symlink, b"../outside", b""),
                (b"up/victim", Regular, b"", b"x"),
            ],
            // A hard link to a file outside.
            vec![(b"h", Link, victim.as_bytes(), b"")],
        ];
        fs::write(&victim, b"original").unwrap();
        for (i, case) in cases.iter().enumerate() {
            let dir = base.join(format!("dst{i}"));
            fs::create_dir(&dir).unwrap();
            let _ = unpack(&raw_tar(case)[..], &dir);
            assert_eq!(fs::read(&victim).unwrap(), b"original", "case {i}");
            let names: Vec<_> = fs::read_dir(&outside)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, ["victim"], "case {i}");
        }
        // The plain escapes are refused outright, not skipped quietly.
        for case in &cases[..3] {
            let dir = base.join("refused");
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir(&dir).unwrap();
            let err = unpack(&raw_tar(case)[..], &dir).unwrap_err();
            assert!(err.to_string().contains("outside the destination"), "{err}");
        }
        fs::remove_dir_all(&base).unwrap();
    }

    /// What `pack` writes, `unpack` reads back the same: 1000 files, nested directories with
    /// their modes (a read-only one included), symbolic links (dangling too), a 200-byte name
    /// and a link target longer than ustar holds (pax), an empty file; fifos are skipped.
    #[test]
    fn a_packed_tree_unpacks_identically() {
        let base = scratch("roundtrip");
        let src = base.join("src");
        fs::create_dir_all(src.join("deep/er/est")).unwrap();
        for i in 0..1000 {
            fs::write(src.join(format!("f{i:04}")), format!("content {i}\n")).unwrap();
        }
        let long = "n".repeat(200);
        fs::write(src.join("deep").join(&long), b"long name").unwrap();
        fs::write(src.join("deep/er/est/empty"), b"").unwrap();
        let exe = src.join("deep/er/run.sh");
        fs::write(&exe, b"#!/bin/sh\n").unwrap();
        fs::set_permissions(&exe, fs::Permissions::from_mode(0o751)).unwrap();
        std::os::unix::fs::symlink("../f0001", src.join("deep/link")).unwrap();
        std::os::unix::fs::symlink("nowhere", src.join("dangling")).unwrap();
        let far = format!("{}/target", "t".repeat(150));
        std::os::unix::fs::symlink(&far, src.join("far")).unwrap();
        fs::create_dir(src.join("ro")).unwrap();
        fs::write(src.join("ro/inside"), b"ro").unwrap();
        fs::set_permissions(src.join("ro"), fs::Permissions::from_mode(0o555)).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(src.join("fifo"))
            .status()
            .unwrap();
        assert!(made.success());

        let mut builder = tar::Builder::new(Vec::new());
        pack(&mut builder, &src, Path::new("")).unwrap();
        let stream = builder.into_inner().unwrap();
        let dst = base.join("dst");
        fs::create_dir(&dst).unwrap();
        unpack(&stream[..], &dst).unwrap();

        let status = std::process::Command::new("diff")
            .args(["-r", "--no-dereference"])
            .arg(&src)
            .arg(&dst)
            .status()
            .unwrap();
        // diff -r reports the fifo as only in src; everything else must match.
        assert_eq!(status.code(), Some(1));
        let output = std::process::Command::new("diff")
            .args(["-r", "--no-dereference"])
            .arg(&src)
            .arg(&dst)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("fifo"), "{text}");
        assert_eq!(fs::read_link(dst.join("far")).unwrap(), Path::new(&far));
        for name in ["deep/er/run.sh", "ro", "deep", "f0007"] {
            let mode = |root: &Path| fs::symlink_metadata(root.join(name)).unwrap().mode();
            assert_eq!(mode(&src), mode(&dst), "{name}");
            let mtime = |root: &Path| fs::symlink_metadata(root.join(name)).unwrap().mtime();
            assert_eq!(mtime(&src), mtime(&dst), "{name}");
        }
        fs::set_permissions(src.join("ro"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(dst.join("ro"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn modes_are_octal() {
        assert_eq!(parse_mode("755"), Ok(0o755));
        assert_eq!(parse_mode("4755"), Ok(0o4755));
        assert!(parse_mode("10000").is_err());
        assert!(parse_mode("9").is_err());
    }
}
