//! The agent's side of file transfer (protocol 4's put and get of one file), through raw
//! sessions against the shipped agent binary on its Unix socket: what lands on disk, what is
//! refused before a byte is written, what is left after a failure (the old file, no temporary
//! file), as whom it runs, and what a hostile client gets (garbage mid-put, a reader that stops,
//! a client that leaves halfway).
#![allow(clippy::unwrap_used)] // a test reports failure by panicking

mod common;
#[path = "../../qemu-tests/tests/suite/frames.rs"]
#[allow(dead_code)] // its raw connections are not needed here
mod frames;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{children, fresh_dir, names, secret_path, Agent};
use ferry_wire::{Bytes, ClientFrame, ErrorCode, GetRequest, PutRequest, Timestamp, TransferKind};
use frames::{Outcome, Transfer};
use sha2::{Digest, Sha256};

fn secret() -> ferry_wire::session::Secret {
    ferry_host::read_secret_file(secret_path()).unwrap()
}

fn open(agent: &Agent) -> Transfer {
    Transfer::open(UnixStream::connect(&agent.socket).unwrap(), Some(secret()))
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn put_request(path: &str) -> PutRequest<'_> {
    PutRequest {
        path: Bytes(path.as_bytes()),
        kind: TransferKind::File,
        mode: None,
        owner: None,
        mtime: None,
        size: None,
        create_parents: false,
        no_clobber: false,
        user: None,
    }
}

fn get_request(path: &str) -> GetRequest<'_> {
    GetRequest {
        path: Bytes(path.as_bytes()),
        kind: TransferKind::File,
        user: None,
    }
}

/// A whole put of `content` (its real digest); the outcome and the agent's header.
fn put(agent: &Agent, request: &PutRequest<'_>, content: &[u8]) -> (Outcome, Transfer) {
    let mut transfer = open(agent);
    transfer.start_put(request);
    if let Some(early) = transfer.send_content(content) {
        return (early, transfer);
    }
    transfer.end_put(&sha256(content));
    let outcome = transfer.finish(&mut |_| {});
    (outcome, transfer)
}

/// A whole get: the outcome and the content.
fn get(agent: &Agent, request: &GetRequest<'_>) -> (Outcome, Vec<u8>, Transfer) {
    let mut transfer = open(agent);
    transfer.start_get(request);
    let mut content = Vec::new();
    let outcome = transfer.finish(&mut |data| content.extend_from_slice(data));
    (outcome, content, transfer)
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

fn path_in(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().unwrap().to_owned()
}

fn wait_until(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    done()
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").unwrap().uid() == 0
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    line.trim().trim_end_matches(" kB").parse().ok()
}

/// The agent runs an exec for a well-behaved client, promptly.
fn assert_serving(agent: &Agent) {
    let started = Instant::now();
    let output = agent
        .client()
        .output(ferry_host::Command::new("/bin/echo").arg("ok"))
        .unwrap();
    assert_eq!(output.stdout, b"ok\n");
    assert!(started.elapsed() < Duration::from_secs(3));
}

// ---------------------------------------------------------------------------------------------
// What lands on disk.

#[test]
fn a_put_lands_exactly_and_reads_back() {
    let agent = Agent::start();
    let dir = fresh_dir("ferry-files");
    let content = pattern(200_000);
    let path = path_in(&dir, "file");
    let mtime = Timestamp {
        secs: 1_600_000_000,
        nanos: 123_456_789,
    };
    let request = PutRequest {
        mode: Some(0o640),
        mtime: Some(mtime),
        size: Some(content.len() as u64),
        ..put_request(&path)
    };
    let (outcome, transfer) = put(&agent, &request, &content);
    let Outcome::Done(summary) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(summary.bytes, content.len() as u64);
    assert_eq!(summary.sha256.0, sha256(&content));
    let header = transfer.header.unwrap();
    assert_eq!((header.size, header.mode), (200_000, 0o100640));
    assert_eq!(header.mtime, mtime);
    assert_eq!(std::fs::read(&path).unwrap(), content);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(
        meta.permissions().mode() & 0o7777,
        0o640,
        "whatever the umask"
    );
    assert_eq!(
        (meta.mtime(), meta.mtime_nsec()),
        (1_600_000_000, 123_456_789)
    );
    assert_eq!(names(&dir), ["file"], "no temporary file left");

    // And back.
    let (outcome, back, transfer) = get(&agent, &get_request(&path));
    assert_eq!(outcome, Outcome::Done(summary));
    assert_eq!(back, content);
    let header = transfer.header.unwrap();
    assert_eq!(
        (header.size, header.mode, header.mtime),
        (200_000, 0o100640, mtime)
    );

    // Replaced, with the default mode; an empty file too.
    let (outcome, _) = put(&agent, &put_request(&path), b"new");
    assert!(matches!(outcome, Outcome::Done(_)), "{outcome:?}");
    assert_eq!(std::fs::read(&path).unwrap(), b"new");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o644);
    let (outcome, _) = put(&agent, &put_request(&path), b"");
    assert_eq!(outcome, Outcome::Done(summary_of(b"")));
    assert_eq!(std::fs::read(&path).unwrap(), b"");
    let (outcome, back, _) = get(&agent, &get_request(&path));
    assert_eq!((outcome, back), (Outcome::Done(summary_of(b"")), vec![]));
}

fn summary_of(content: &[u8]) -> ferry_wire::FileSummary {
    ferry_wire::FileSummary {
        bytes: content.len() as u64,
        sha256: ferry_wire::ByteArray(sha256(content)),
    }
}

#[test]
fn an_owner_is_applied_when_the_policy_allows_it() {
    if !is_root() {
        eprintln!("SKIPPED: changing a file's owner needs root");
        return;
    }
    let agent = Agent::start();
    let dir = fresh_dir("ferry-files");
    let path = path_in(&dir, "owned");
    let request = PutRequest {
        owner: Some(Bytes(b"65534:65534")),
        ..put_request(&path)
    };
    let (outcome, transfer) = put(&agent, &request, b"x");
    assert!(matches!(outcome, Outcome::Done(_)), "{outcome:?}");
    let header = transfer.header.unwrap();
    assert_eq!((header.uid, header.gid), (65534, 65534));
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    // An owner the policy would not let a command run as: refused before a byte.
    let request = PutRequest {
        owner: Some(Bytes(b"root")),
        ..put_request(&path)
    };
    let (outcome, transfer) = put(&agent, &request, b"y");
    assert_eq!(outcome.code(), ErrorCode::PermissionDenied, "{outcome:?}");
    assert!(transfer.header.is_none());
    assert_eq!(std::fs::read(&path).unwrap(), b"x");
}

/// A put runs as the request's user: as the default user (65534), a root-owned directory is
/// out of reach, a world-writable one gets a file of that user's; a get of a 0600 root file is
/// refused with EACCES.
#[test]
fn transfers_run_as_the_requests_user() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to start an agent whose default user differs");
        return;
    }
    let agent = Agent::start_unprivileged(&[]);
    let dir = fresh_dir("ferry-files");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (outcome, _) = put(&agent, &put_request(&path_in(&dir, "f")), b"x");
    assert_eq!(
        outcome,
        Outcome::Refused(
            ErrorCode::PermissionDenied,
            "cannot create a temporary file".into()
        )
    );
    assert_eq!(names(&dir), Vec::<String>::new());

    let open_dir = dir.join("open");
    std::fs::create_dir(&open_dir).unwrap();
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let path = path_in(&open_dir, "mine");
    let (outcome, _) = put(&agent, &put_request(&path), b"x");
    assert!(matches!(outcome, Outcome::Done(_)), "{outcome:?}");
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534));

    let secret = path_in(&dir, "secret");
    std::fs::write(&secret, b"root's").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (outcome, content, transfer) = get(&agent, &get_request(&secret));
    assert_eq!(outcome.code(), ErrorCode::PermissionDenied);
    assert!(content.is_empty() && transfer.header.is_none());
    // Another user than the policy allows: refused as for exec.
    let request = GetRequest {
        user: Some(Bytes(b"root")),
        ..get_request(&secret)
    };
    let (outcome, _, _) = get(&agent, &request);
    assert_eq!(outcome.code(), ErrorCode::PermissionDenied);
}

// ---------------------------------------------------------------------------------------------
// Refused before a byte is written.

#[test]
fn refusals_come_before_any_write() {
    let agent = Agent::start_with(&["--set", "max_file_size=1000"]);
    let dir = fresh_dir("ferry-files");
    let path = path_in(&dir, "file");
    std::fs::write(&path, b"old").unwrap();
    let refused = |request: &PutRequest<'_>, content: &[u8]| {
        let (outcome, transfer) = put(&agent, request, content);
        assert!(transfer.header.is_none(), "{outcome:?} after FileReady");
        outcome.code()
    };
    // Declared too large for the policy, or for the disk.
    let request = PutRequest {
        size: Some(1001),
        ..put_request(&path)
    };
    assert_eq!(refused(&request, &[0; 1001]), ErrorCode::FileTooLarge);
    // No clobbering.
    let request = PutRequest {
        no_clobber: true,
        ..put_request(&path)
    };
    assert_eq!(refused(&request, b"new"), ErrorCode::AlreadyExists);
    // A directory, a name that is no file's.
    assert_eq!(
        refused(&put_request(dir.to_str().unwrap()), b"x"),
        ErrorCode::WrongFileType
    );
    // A special file: a FIFO of our own (were it replaced, /dev/null would be the machine's
    // loss).
    let fifo = dir.join("fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    assert!(made.unwrap().success());
    let fifo_path = fifo.to_str().unwrap();
    assert_eq!(
        refused(&put_request(fifo_path), b"x"),
        ErrorCode::WrongFileType
    );
    std::fs::remove_file(&fifo).unwrap();
    let slash = format!("{}/", dir.display());
    assert_eq!(
        refused(&put_request(&slash), b"x"),
        ErrorCode::WrongFileType
    );
    // A missing directory.
    let deep = path_in(&dir, "a/b/c");
    assert_eq!(refused(&put_request(&deep), b"x"), ErrorCode::NotFound);
    // A parent that is a file.
    let under_file = format!("{path}/x");
    assert_eq!(
        refused(&put_request(&under_file), b"x"),
        ErrorCode::WrongFileType
    );
    // A tree onto a file (or into an existing directory with no clobbering).
    let request = PutRequest {
        kind: TransferKind::Tree,
        ..put_request(&path)
    };
    assert_eq!(refused(&request, b""), ErrorCode::WrongFileType);
    let request = PutRequest {
        kind: TransferKind::Tree,
        no_clobber: true,
        ..put_request(dir.to_str().unwrap())
    };
    assert_eq!(refused(&request, b""), ErrorCode::AlreadyExists);
    assert_eq!(std::fs::read(&path).unwrap(), b"old");
    assert_eq!(names(&dir), ["file"]);

    // Too large without a declared size: found while writing, nothing left.
    // (Its FileReady may or may not have gone out before the refusal: the content came with
    // the request.)
    let (outcome, _) = put(&agent, &put_request(&path), &[7; 5000]);
    assert_eq!(outcome.code(), ErrorCode::FileTooLarge);
    // Exactly at the limit is fine.
    let (outcome, _) = put(&agent, &put_request(&path), &[7; 1000]);
    assert!(matches!(outcome, Outcome::Done(_)), "{outcome:?}");
    assert_eq!(names(&dir), ["file"]);
}

#[test]
fn missing_parents_are_made_when_asked() {
    let agent = Agent::start();
    let dir = fresh_dir("ferry-files");
    let deep = path_in(&dir, "a/b//c/file");
    let request = PutRequest {
        create_parents: true,
        ..put_request(&deep)
    };
    let (outcome, _) = put(&agent, &request, b"deep");
    assert!(matches!(outcome, Outcome::Done(_)), "{outcome:?}");
    assert_eq!(std::fs::read(&deep).unwrap(), b"deep");
    for made in ["a", "a/b", "a/b/c"] {
        let mode = std::fs::metadata(dir.join(made))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755, "{made}");
    }
    // A no-clobber put to a new name takes it.
    let fresh = path_in(&dir, "fresh");
    let request = PutRequest {
        no_clobber: true,
        ..put_request(&fresh)
    };
    let (outcome, _) = put(&agent, &request, b"first");
    assert!(matches!(outcome, Outcome::Done(_)), "{outcome:?}");
    assert_eq!(std::fs::read(&fresh).unwrap(), b"first");
}

/// No space: a tiny tmpfs (root only), declared (refused before the write) and not (ENOSPC
/// while writing; nothing left behind).
#[test]
fn no_space_is_refused_and_leaves_nothing() {
    if !is_root() {
        eprintln!("SKIPPED: mounting a small tmpfs needs root");
        return;
    }
    let dir = fresh_dir("ferry-files-tmpfs");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&dir)
        .status();
    if !mounted.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: cannot mount a tmpfs here");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&dir);
    let agent = Agent::start();
    let path = path_in(&dir, "file");
    std::fs::write(&path, b"old").unwrap();
    let big = pattern(1 << 20);
    let request = PutRequest {
        size: Some(big.len() as u64),
        ..put_request(&path)
    };
    let (outcome, transfer) = put(&agent, &request, &big);
    assert_eq!(outcome.code(), ErrorCode::NoSpace, "{outcome:?}");
    assert!(transfer.header.is_none());
    let (outcome, transfer) = put(&agent, &put_request(&path), &big);
    assert_eq!(outcome.code(), ErrorCode::NoSpace, "{outcome:?}");
    assert!(transfer.header.is_some());
    assert_eq!(std::fs::read(&path).unwrap(), b"old");
    assert_eq!(names(&dir), ["file"]);
}

// ---------------------------------------------------------------------------------------------
// Content that does not check out, and clients that misbehave.

#[test]
fn content_that_does_not_match_replaces_nothing() {
    let agent = Agent::start();
    let dir = fresh_dir("ferry-files");
    let path = path_in(&dir, "file");
    std::fs::write(&path, b"old").unwrap();
    let content = pattern(300_000);
    // A wrong digest.
    let mut transfer = open(&agent);
    transfer.start_put(&put_request(&path));
    assert_eq!(transfer.send_content(&content), None);
    let mut wrong = sha256(&content);
    wrong[0] ^= 1;
    transfer.end_put(&wrong);
    assert_eq!(
        transfer.finish(&mut |_| {}).code(),
        ErrorCode::IntegrityMismatch
    );
    // Less than declared, and more.
    for (declared, sent) in [(1000u64, 999usize), (1000, 1001)] {
        let request = PutRequest {
            size: Some(declared),
            ..put_request(&path)
        };
        let (outcome, _) = put(&agent, &request, &content[..sent]);
        assert_eq!(
            outcome.code(),
            ErrorCode::IntegrityMismatch,
            "{declared} {sent}"
        );
    }
    assert_eq!(std::fs::read(&path).unwrap(), b"old");
    assert_eq!(names(&dir), ["file"]);
}

/// Half the content, then the client leaves: the old file stays, no temporary file is left,
/// and the connection process ends.
#[test]
fn a_client_that_leaves_halfway_leaves_the_old_file() {
    let agent = Agent::start();
    let dir = fresh_dir("ferry-files");
    let path = path_in(&dir, "file");
    std::fs::write(&path, b"old").unwrap();
    let content = pattern(4 << 20);
    for close in [true, false] {
        let mut transfer = open(&agent);
        let request = PutRequest {
            size: Some(content.len() as u64),
            ..put_request(&path)
        };
        transfer.start_put(&request);
        assert_eq!(transfer.send_content(&content[..content.len() / 2]), None);
        if close {
            drop(transfer);
        } else {
            // A half-close before the digest is an abandoned put too.
            transfer.stream.shutdown(std::net::Shutdown::Write).unwrap();
            assert_eq!(transfer.finish(&mut |_| {}), Outcome::Closed);
        }
        assert!(
            wait_until(Duration::from_secs(5), || children(agent.pid()).len() <= 2),
            "the connection process lingers"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(names(&dir), ["file"]);
    }
}

/// Garbage, or a frame that has no place in a put, after some content: refused, nothing
/// replaced, nothing left.
#[test]
fn garbage_mid_put_is_refused() {
    let agent = Agent::start();
    let dir = fresh_dir("ferry-files");
    let path = path_in(&dir, "file");
    std::fs::write(&path, b"old").unwrap();
    let content = pattern(200_000);
    let garbage: [&[u8]; 3] = [
        &[5, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff],
        &frames::encode(&ClientFrame::StdinEof),
        &frames::encode(&ClientFrame::Signal(9)),
    ];
    for (bytes, code) in garbage.into_iter().zip([
        ErrorCode::Malformed,
        ErrorCode::ProtocolViolation,
        ErrorCode::ProtocolViolation,
    ]) {
        let mut transfer = open(&agent);
        transfer.start_put(&put_request(&path));
        assert_eq!(transfer.send_content(&content), None);
        use std::io::Write;
        let _ = transfer.stream.write_all(bytes);
        assert_eq!(transfer.finish(&mut |_| {}).code(), code);
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(names(&dir), ["file"]);
    }
}

/// A destination that is a symbolic link: the link is replaced, what it points to is not
/// written through.
#[test]
fn a_symlink_at_the_destination_is_replaced_not_followed() {
    let agent = Agent::start();
    let dir = fresh_dir("ferry-files");
    let target = path_in(&dir, "target");
    std::fs::write(&target, b"target").unwrap();
    let link = path_in(&dir, "link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let (outcome, _) = put(&agent, &put_request(&link), b"new");
    assert!(matches!(outcome, Outcome::Done(_)), "{outcome:?}");
    assert_eq!(std::fs::read(&target).unwrap(), b"target");
    assert!(std::fs::symlink_metadata(&link).unwrap().is_file());
    assert_eq!(std::fs::read(&link).unwrap(), b"new");
}

// ---------------------------------------------------------------------------------------------
// Get.

#[test]
fn gets_of_what_is_not_a_readable_file_are_refused() {
    let agent = Agent::start();
    let dir = fresh_dir("ferry-files");
    let fifo = dir.join("fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let cases = [
        (dir.to_str().unwrap().to_owned(), ErrorCode::WrongFileType),
        (fifo.to_str().unwrap().to_owned(), ErrorCode::WrongFileType),
        (path_in(&dir, "missing"), ErrorCode::NotFound),
        (path_in(&dir, "missing/below"), ErrorCode::NotFound),
    ];
    for (path, code) in cases {
        let started = Instant::now();
        let (outcome, content, transfer) = get(&agent, &get_request(&path));
        assert_eq!(outcome.code(), code, "{path}");
        assert!(content.is_empty() && transfer.header.is_none(), "{path}");
        assert!(started.elapsed() < Duration::from_secs(2), "{path}");
    }
    let (outcome, _, _) = get(&agent, &get_request(&path_in(&dir, "missing")));
    assert_eq!(
        outcome,
        Outcome::Refused(ErrorCode::NotFound, "cannot read the file".into())
    );
}

/// 64 MiB each way, streamed: the connection process stays small whatever the size.
#[test]
fn large_files_stream_both_ways_in_bounded_memory() {
    let agent = Agent::start();
    let dir = fresh_dir("ferry-files");
    let path = path_in(&dir, "big");
    let size: usize = std::env::var("FERRY_FILES_MIB")
        .ok()
        .and_then(|mib| mib.parse().ok())
        .unwrap_or(64)
        << 20;
    let chunk = pattern(1 << 20);
    let agent_pid = agent.pid();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                for pid in children(agent_pid) {
                    let rss = status_kib(pid, "VmRSS").unwrap_or(0);
                    peak.fetch_max(rss, std::sync::atomic::Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // Hashed ahead: the timings are the agent's (and the socket's), not this client's.
    let mut hasher = Sha256::new();
    for _ in 0..size / chunk.len() {
        hasher.update(&chunk);
    }
    let digest: [u8; 32] = hasher.finalize().into();
    let mut transfer = open(&agent);
    let request = PutRequest {
        size: Some(size as u64),
        ..put_request(&path)
    };
    let started = Instant::now();
    transfer.start_put(&request);
    for _ in 0..size / chunk.len() {
        assert_eq!(transfer.send_content(&chunk), None);
    }
    transfer.end_put(&digest);
    let outcome = transfer.finish(&mut |_| {});
    let put_took = started.elapsed();
    assert!(matches!(outcome, Outcome::Done(_)), "{outcome:?}");

    let started = Instant::now();
    let mut transfer = open(&agent);
    transfer.start_get(&get_request(&path));
    // Compared with what was put as it comes (the pattern repeats every chunk).
    let mut received = 0usize;
    let mut same = true;
    let outcome = transfer.finish(&mut |data| {
        let mut data = data;
        while !data.is_empty() {
            let at = received % chunk.len();
            let n = data.len().min(chunk.len() - at);
            same &= data[..n] == chunk[at..at + n];
            (received, data) = (received + n, &data[n..]);
        }
    });
    let get_took = started.elapsed();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    assert_eq!(received, size);
    assert!(same, "the content came back different");
    assert!(matches!(outcome, Outcome::Done(s) if s.sha256.0 == digest));
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    let mib_s = |took: Duration| size as f64 / (1 << 20) as f64 / took.as_secs_f64();
    eprintln!(
        "{} MiB: put {put_took:?} ({:.0} MiB/s), get {get_took:?} ({:.0} MiB/s), agent connection peak RSS {peak} KiB",
        size >> 20,
        mib_s(put_took),
        mib_s(get_took)
    );
    assert!(peak < 1024, "a connection process reached {peak} KiB");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A client that asks for a large file and reads nothing: the agent serves others meanwhile,
/// and the connection ends by the final-send timeout (30 s) instead of pinning its process.
#[test]
fn a_get_reader_that_stops_does_not_pin_the_agent() {
    let agent = Agent::start();
    let dir = fresh_dir("ferry-files");
    let path = path_in(&dir, "big");
    std::fs::write(&path, pattern(32 << 20)).unwrap();
    let mut transfer = open(&agent);
    transfer.start_get(&get_request(&path));
    std::thread::sleep(Duration::from_millis(500));
    assert_serving(&agent);
    let stalled = Instant::now();
    assert!(
        wait_until(Duration::from_secs(45), || children(agent.pid()).len() <= 2),
        "the stalled connection is still served after {:?}",
        stalled.elapsed()
    );
    let took = stalled.elapsed();
    assert!(took > Duration::from_secs(25), "gave up after {took:?}");
    // What was sent before is whole frames; then the end, without a last frame.
    let mut received = 0usize;
    let outcome = transfer.finish(&mut |data| received += data.len());
    assert_eq!(outcome, Outcome::Closed);
    assert!(received < 32 << 20);
    assert_serving(&agent);
}
