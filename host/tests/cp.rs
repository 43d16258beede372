//! `ferry cp` against the shipped agent: round trips with identical SHA-256 in bounded memory,
//! stdio, refusals before a byte is written (exit 1, the path and the errno's name), a CLI
//! killed mid-put, --no-clobber, -p, --digest.
#![allow(clippy::unwrap_used)] // a test reports failure by panicking

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::{children, cp, ferry, fresh_dir, guest, names, stderr, text, Agent};
use sha2::{Digest, Sha256};

fn sha256_file(path: &Path) -> String {
    let mut file = std::fs::File::open(path).unwrap();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    ferry_host::hex(&hasher.finalize())
}

/// `len` pseudo-random bytes (xorshift: incompressible, reproducible) into `path`.
fn random_file(path: &Path, len: usize) {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ len as u64;
    let mut block = vec![0u8; 1 << 16];
    let mut left = len;
    while left > 0 {
        for word in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let n = left.min(block.len());
        file.write_all(&block[..n]).unwrap();
        left -= n;
    }
    file.flush().unwrap();
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    line.trim().trim_end_matches(" kB").parse().ok()
}

/// Runs `ferry cp ARGS` and samples the peak resident memory of the CLI (its VmHWM, read
/// until it exits) and of the agent's connection processes (their VmRSS).
fn cp_measured(agent: &Agent, args: &[&str]) -> (Output, u64, u64) {
    let agent_peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let agent_pid = agent.pid();
    let sampler = {
        let (peak, done) = (agent_peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                for pid in children(agent_pid) {
                    peak.fetch_max(status_kib(pid, "VmRSS").unwrap_or(0), Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let mut child = ferry(agent)
        .arg("cp")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut cli_peak = 0;
    while child.try_wait().unwrap().is_none() {
        // A high-water mark: the last value read before the exit is the peak.
        if let Some(hwm) = status_kib(pid, "VmHWM") {
            cli_peak = cli_peak.max(hwm);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let output = child.wait_with_output().unwrap();
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    (output, cli_peak, agent_peak.load(Ordering::Relaxed))
}

/// A large random file goes in and comes back with the same SHA-256, and neither the CLI nor
/// the agent's connection process grows with it (< 16 MiB). 256 MiB by default;
/// `FERRY_CP_MIB=1024` for the gibibyte.
#[test]
fn a_large_file_round_trips_in_bounded_memory() {
    let agent = Agent::start();
    let dir = fresh_dir("ferry-cp");
    let mib: usize = std::env::var("FERRY_CP_MIB")
        .ok()
        .and_then(|mib| mib.parse().ok())
        .unwrap_or(256);
    let (local, remote, back) = (dir.join("big"), dir.join("remote/big"), dir.join("back"));
    random_file(&local, mib << 20);
    let expected = sha256_file(&local);

    let started = Instant::now();
    let (output, cli_put, agent_put) =
        cp_measured(&agent, &["-q", "-p", text(&local), &guest(&remote)]);
    let put_took = started.elapsed();
    assert!(output.status.success(), "{}", stderr(&output));
    let started = Instant::now();
    let (output, cli_get, agent_get) = cp_measured(&agent, &["-q", &guest(&remote), text(&back)]);
    let get_took = started.elapsed();
    assert!(output.status.success(), "{}", stderr(&output));

    assert_eq!(sha256_file(&remote), expected);
    assert_eq!(sha256_file(&back), expected);
    let rate = |took: Duration| mib as f64 / took.as_secs_f64();
    eprintln!(
        "{mib} MiB: put {put_took:?} ({:.0} MiB/s), get {get_took:?} ({:.0} MiB/s); peak RSS: \
         CLI {cli_put} / {cli_get} KiB, agent connection {agent_put} / {agent_get} KiB",
        rate(put_took),
        rate(get_took)
    );
    for peak in [cli_put, cli_get, agent_put, agent_get] {
        assert!(peak > 0 && peak < 16 * 1024, "peak RSS {peak} KiB");
    }
    // Mode and time travel both ways (the file was made 0644 here).
    let meta = |path: &Path| std::fs::metadata(path).unwrap();
    assert_eq!(meta(&back).permissions().mode() & 0o7777, 0o644);
    assert_eq!(
        meta(&back).modified().unwrap(),
        meta(&local).modified().unwrap()
    );
    assert_eq!(names(&dir), ["back", "big", "remote"]);
    // Hundreds of MiB: not left behind on success (a failure keeps them to look at).
    let _ = std::fs::remove_dir_all(&dir);
}

/// A CLI killed halfway through a put: the destination keeps its old content, nothing is left
/// in its directory, and the agent goes on serving.
#[test]
fn a_cli_killed_mid_put_leaves_the_old_file() {
    let agent = Agent::start();
    let dir = fresh_dir("ferry-cp");
    let (local, remote) = (dir.join("big"), dir.join("remote"));
    std::fs::create_dir(&remote).unwrap();
    let destination = remote.join("file");
    std::fs::write(&destination, b"old content").unwrap();
    random_file(&local, 256 << 20);
    // The CLI reads its content from a pipe we feed: killed when half of it went through.
    let mut child = ferry(&agent)
        .args(["cp", "-q", "-", &guest(&destination)])
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut file = std::fs::File::open(&local).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..128 {
        file.read_exact(&mut buf).unwrap();
        stdin.write_all(&buf).unwrap();
    }
    child.kill().unwrap();
    child.wait().unwrap();
    drop(stdin);
    let deadline = Instant::now() + Duration::from_secs(10);
    while children(agent.pid()).len() > 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(std::fs::read(&destination).unwrap(), b"old content");
    assert_eq!(names(&remote), ["file"]);
    let output = cp(&agent, &[text(&local), &guest(&destination)]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(sha256_file(&destination), sha256_file(&local));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn stdin_and_stdout_and_the_digest_line() {
    let agent = Agent::start();
    let dir = fresh_dir("ferry-cp");
    let remote = dir.join("from-stdin");
    let mut child = ferry(&agent)
        .args(["cp", "--digest", "--mode", "600", "-", &guest(&remote)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"piped in\n")
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(std::fs::read(&remote).unwrap(), b"piped in\n");
    assert_eq!(
        std::fs::metadata(&remote).unwrap().permissions().mode() & 0o7777,
        0o600
    );
    let sum = sha256_file(&remote);
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!("{sum}  -\n")
    );

    // To stdout: the content alone there, the digest line on stderr.
    let output = cp(&agent, &["--digest", &guest(&remote), "-"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(output.stdout, b"piped in\n");
    assert_eq!(stderr(&output), format!("{sum}  -\n"));

    // The line is sha256sum's for the local file, byte for byte.
    let local = dir.join("local.bin");
    random_file(&local, 100_000);
    let output = cp(
        &agent,
        &["--digest", text(&local), &guest(&dir.join("r.bin"))],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let sha256sum = Command::new("sha256sum").arg(&local).output().unwrap();
    assert_eq!(output.stdout, sha256sum.stdout);
    let back = dir.join("back.bin");
    let output = cp(
        &agent,
        &["--digest", &guest(&dir.join("r.bin")), text(&back)],
    );
    let sha256sum = Command::new("sha256sum").arg(&back).output().unwrap();
    assert_eq!(output.stdout, sha256sum.stdout);
}

/// A get into a device or a fifo writes into it, as `cp` does: it is never renamed over (as
/// root, `ferry cp :/x /dev/null` once replaced the machine's /dev/null with a file).
#[test]
fn a_get_into_a_device_or_a_fifo_writes_into_it() {
    use std::os::unix::fs::FileTypeExt;
    let agent = Agent::start();
    let dir = fresh_dir("ferry-cp");
    let src = dir.join("src");
    std::fs::write(&src, b"into the pipe\n").unwrap();
    let fifo = dir.join("fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(fifo).unwrap())
    };
    let output = cp(&agent, &[&guest(&src), text(&fifo)]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(reader.join().unwrap(), b"into the pipe\n");
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    assert_eq!(names(&dir), ["fifo", "src"], "no temporary left beside it");

    // A null device of our own (root only: mknod), the way /dev/null is.
    let null = dir.join("null");
    let made = Command::new("mknod")
        .arg(&null)
        .args(["c", "1", "3"])
        .status();
    if !made.is_ok_and(|status| status.success()) {
        eprintln!("skipping the device half: mknod needs root");
        return;
    }
    let output = cp(&agent, &[&guest(&src), text(&null)]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(std::fs::metadata(&null)
        .unwrap()
        .file_type()
        .is_char_device());
}

/// A local directory as destination means DIR/NAME; a guest one ending in '/' too.
#[test]
fn directories_as_destinations_take_the_sources_name() {
    let agent = Agent::start();
    let dir = fresh_dir("ferry-cp");
    let (src, into) = (dir.join("app.log"), dir.join("into"));
    std::fs::write(&src, b"log").unwrap();
    std::fs::create_dir(&into).unwrap();
    let output = cp(&agent, &[text(&src), &format!("{}/", guest(&into))]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(std::fs::read(into.join("app.log")).unwrap(), b"log");
    let local = dir.join("local");
    std::fs::create_dir(&local).unwrap();
    let output = ferry(&agent)
        .args(["cp", &guest(&into.join("app.log")), "."])
        .current_dir(&local)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(std::fs::read(local.join("app.log")).unwrap(), b"log");
    assert_eq!(names(&local), ["app.log"]);
}

/// Missing parents: refused without -p (exit 1, the path, ENOENT), made with it; both ways.
#[test]
fn missing_directories_need_parents() {
    let agent = Agent::start();
    let dir = fresh_dir("ferry-cp");
    let src = dir.join("f");
    std::fs::write(&src, b"x").unwrap();
    let deep = dir.join("a/b/c");
    let output = cp(&agent, &[text(&src), &guest(&deep)]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains(&guest(&deep)),
        "{}",
        stderr(&output)
    );
    assert!(stderr(&output).contains("ENOENT"), "{}", stderr(&output));
    assert!(!dir.join("a").exists());
    let output = cp(&agent, &["-p", text(&src), &guest(&deep)]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(std::fs::read(&deep).unwrap(), b"x");

    let local = dir.join("x/y/z");
    let output = cp(&agent, &[&guest(&src), text(&local)]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("ENOENT"), "{}", stderr(&output));
    let output = cp(&agent, &["-p", &guest(&src), text(&local)]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(std::fs::read(&local).unwrap(), b"x");
}

/// Over the agent's maximum file size: refused before a byte is written, naming the path.
#[test]
fn a_file_over_the_agents_maximum_is_refused_up_front() {
    let agent = Agent::start_with(&["--set", "max_file_size=1M"]);
    let dir = fresh_dir("ferry-cp");
    let (src, remote) = (dir.join("big"), dir.join("remote"));
    std::fs::create_dir(&remote).unwrap();
    random_file(&src, 2 << 20);
    let destination = remote.join("big");
    let started = Instant::now();
    let output = cp(&agent, &[text(&src), &guest(&destination)]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains(&guest(&destination)),
        "{}",
        stderr(&output)
    );
    assert!(stderr(&output).contains("too large"), "{}", stderr(&output));
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(names(&remote).is_empty());
}

#[test]
fn no_clobber_keeps_what_is_there_both_ways() {
    let agent = Agent::start();
    let dir = fresh_dir("ferry-cp");
    let (src, dst) = (dir.join("new"), dir.join("old"));
    std::fs::write(&src, b"new").unwrap();
    std::fs::write(&dst, b"old").unwrap();
    let output = cp(&agent, &["--no-clobber", text(&src), &guest(&dst)]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("EEXIST") || stderr(&output).contains("exists"));
    assert_eq!(std::fs::read(&dst).unwrap(), b"old");
    let output = cp(&agent, &["--no-clobber", &guest(&src), text(&dst)]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert_eq!(std::fs::read(&dst).unwrap(), b"old");
    // Without it, replaced.
    let output = cp(&agent, &[&guest(&src), text(&dst)]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(std::fs::read(&dst).unwrap(), b"new");
    assert_eq!(names(&dir), ["new", "old"]);
}

/// Gets that cannot be served: one line naming the path and the errno's name, exit 1, and no
/// local file (not even a temporary one).
#[test]
fn failed_gets_name_the_path_and_errno_and_write_nothing() {
    let agent = Agent::start_unprivileged(&[]);
    let dir = fresh_dir("ferry-cp");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, b"s").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let local = fresh_dir("ferry-cp-local");
    let out = local.join("out");
    for (src, errno) in [
        (dir.join("missing"), "ENOENT"),
        (secret.clone(), "EACCES"),
        (dir.clone(), "with -r"),
    ] {
        let output = cp(&agent, &[&guest(&src), text(&out)]);
        assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
        let message = stderr(&output);
        assert_eq!(message.lines().count(), 1, "{message}");
        assert!(
            message.starts_with(&format!("ferry: {}: ", guest(&src))),
            "{message}"
        );
        assert!(message.contains(errno), "{errno}: {message}");
        assert!(names(&local).is_empty(), "{:?}", names(&local));
    }
    // A local file that cannot be read: the same shape.
    let output = cp(&agent, &[text(&dir.join("nope")), &guest(&dir.join("x"))]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("ENOENT"), "{}", stderr(&output));
}

/// Usage errors exit 255, like the rest of the CLI's; an unreachable agent too.
#[test]
fn usage_errors_and_an_unreachable_agent_exit_255() {
    let agent = Agent::start();
    for args in [
        &[":/a", ":/b"][..],
        &["a", "b"],
        &[":relative", "x"],
        &["--mode", "999", "a", ":/b"],
    ] {
        let output = cp(&agent, args);
        assert_eq!(
            output.status.code(),
            Some(255),
            "{args:?}: {}",
            stderr(&output)
        );
    }
    let output = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "-c",
            "unix:///nonexistent/agent.sock",
            "cp",
            "/etc/hostname",
            ":/x",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(255), "{}", stderr(&output));
}

/// The time of a put is the local file's, to the nanosecond the agent keeps.
#[test]
fn a_put_keeps_the_files_time() {
    let agent = Agent::start();
    let dir = fresh_dir("ferry-cp");
    let src = dir.join("old");
    std::fs::write(&src, b"t").unwrap();
    let when = SystemTime::UNIX_EPOCH + Duration::new(1_000_000_000, 123_456_789);
    std::fs::File::options()
        .write(true)
        .open(&src)
        .unwrap()
        .set_modified(when)
        .unwrap();
    let dst: PathBuf = dir.join("copy");
    let output = cp(&agent, &[text(&src), &guest(&dst)]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(std::fs::metadata(&dst).unwrap().modified().unwrap(), when);
}
