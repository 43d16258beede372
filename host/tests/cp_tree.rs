//! `ferry cp -r` and tree transfers against the shipped agent: a tree of every kind the agent
//! carries round-trips with its modes, times and links; special files are skipped with a note
//! both ways; hostile streams (escapes, symlinks, truncation) are refused with nothing written
//! outside the destination, and a new destination appears only whole.
#![allow(clippy::unwrap_used)] // a test reports failure by panicking

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use common::{cp, fresh_dir, guest, names, stderr, text, Agent};
use ferry_host::{ErrorCode, Get, Put};

fn set_mtime(path: &Path, secs: u64) {
    let when = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
    std::fs::File::open(path)
        .unwrap()
        .set_modified(when)
        .unwrap();
}

/// Every entry under `root` (the root itself as ""): kind, permission bits, mtime in seconds,
/// and the content or link target. What `diff -r` compares, plus modes and times.
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    let mut entries = BTreeMap::new();
    walk(root, root, &mut entries);
    entries
}

fn walk(root: &Path, dir: &Path, entries: &mut BTreeMap<String, String>) {
    let relative = dir
        .strip_prefix(root)
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let meta = std::fs::symlink_metadata(dir).unwrap();
    entries.insert(
        relative,
        format!("dir {:o} {}", meta.mode() & 0o7777, meta.mtime()),
    );
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let name = path
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let kind = meta.file_type();
        if kind.is_dir() {
            walk(root, &path, entries);
            continue;
        }
        let what = if kind.is_symlink() {
            // A link's own mode is always 0777 and its time is not kept by the host's
            // unpacker: the target is what matters.
            format!("link {}", std::fs::read_link(&path).unwrap().display())
        } else if kind.is_file() {
            let content = std::fs::read(&path).unwrap();
            format!(
                "file {:o} {} {}",
                meta.mode() & 0o7777,
                meta.mtime(),
                String::from_utf8_lossy(&content)
            )
        } else {
            format!("special {:o}", meta.mode())
        };
        entries.insert(name, what);
    }
}

/// Differences between two snapshots, for a readable failure.
fn differences(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for (name, what) in a {
        match b.get(name) {
            Some(other) if other == what => {}
            Some(other) => out.push(format!("{name}: {what} != {other}")),
            None => out.push(format!("{name}: only in the first")),
        }
    }
    for name in b.keys().filter(|name| !a.contains_key(*name)) {
        out.push(format!("{name}: only in the second"));
    }
    out
}

/// A tree with 1000 files, nested directories of several modes (a read-only one), symlinks
/// (relative, absolute, dangling), a 200-byte name, files of several modes, and set times.
fn build_tree(src: &Path) {
    std::fs::create_dir_all(src.join("deep/er/est")).unwrap();
    for i in 0..1000 {
        let path = src.join(format!("many/f{i:04}"));
        if i == 0 {
            std::fs::create_dir(src.join("many")).unwrap();
        }
        std::fs::write(&path, format!("content {i}\n")).unwrap();
        set_mtime(&path, 1_600_000_000 + i);
    }
    let long = "n".repeat(200);
    std::fs::write(src.join("deep").join(&long), b"a long name").unwrap();
    std::fs::write(src.join("deep/er/est/empty"), b"").unwrap();
    for (name, mode) in [("run.sh", 0o755), ("secret", 0o600), ("plain", 0o644)] {
        let path = src.join("deep/er").join(name);
        std::fs::write(&path, name).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        set_mtime(&path, 1_500_000_000);
    }
    std::os::unix::fs::symlink("../many/f0001", src.join("deep/relative")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", src.join("absolute")).unwrap();
    std::os::unix::fs::symlink("nowhere/at/all", src.join("dangling")).unwrap();
    std::os::unix::fs::symlink(format!("{}/x", "t".repeat(150)), src.join("far")).unwrap();
    std::fs::create_dir(src.join("private")).unwrap();
    std::fs::write(src.join("private/inside"), b"p").unwrap();
    std::fs::create_dir(src.join("ro")).unwrap();
    std::fs::write(src.join("ro/inside"), b"ro").unwrap();
    for (dir, mode, secs) in [
        ("private", 0o700, 1_400_000_000),
        ("ro", 0o555, 1_400_000_001),
        ("deep/er/est", 0o750, 1_400_000_002),
        ("deep/er", 0o755, 1_400_000_003),
        ("deep", 0o711, 1_400_000_004),
        ("many", 0o755, 1_400_000_005),
        ("", 0o700, 1_400_000_006),
    ] {
        let path = src.join(dir);
        set_mtime(&path, secs);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

fn make_fifo(path: &Path) {
    let made = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(made.success());
}

/// `ferry cp -r DIR :/dst`, then `ferry cp -r :/dst OUT`: the same tree three times, modes
/// and times included. Special files are left out with a note, in both directions.
#[test]
fn a_tree_round_trips_with_modes_times_and_links() {
    let agent = Agent::start();
    let dir = fresh_dir("ferry-cp-tree");
    let (src, remote, out) = (dir.join("src"), dir.join("remote"), dir.join("out"));
    build_tree(&src);
    let want = snapshot(&src);
    // Special files on the host: left out by the CLI's packer, with a note.
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o755)).unwrap();
    make_fifo(&src.join("fifo"));
    let _socket = std::os::unix::net::UnixListener::bind(src.join("sock")).unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o700)).unwrap();
    set_mtime(&src, 1_400_000_006);

    let output = cp(&agent, &["-r", text(&src), &guest(&remote)]);
    assert!(output.status.success(), "{}", stderr(&output));
    for name in ["fifo", "sock"] {
        assert!(
            stderr(&output).contains(&format!("skipped {name} (special file)")),
            "{}",
            stderr(&output)
        );
    }
    let put = snapshot(&remote);
    assert_eq!(differences(&want, &put), Vec::<String>::new());

    // Special files in the guest: the agent's writer leaves them out, and says so.
    std::fs::set_permissions(&remote, std::fs::Permissions::from_mode(0o755)).unwrap();
    make_fifo(&remote.join("deep/guest-fifo"));
    let _socket = std::os::unix::net::UnixListener::bind(remote.join("guest-sock")).unwrap();
    std::fs::set_permissions(&remote, std::fs::Permissions::from_mode(0o700)).unwrap();
    set_mtime(&remote, 1_400_000_006);
    set_mtime(&remote.join("deep"), 1_400_000_004);
    let output = cp(&agent, &["-r", &guest(&remote), text(&out)]);
    assert!(output.status.success(), "{}", stderr(&output));
    for name in ["deep/guest-fifo", "guest-sock"] {
        assert!(
            stderr(&output).contains(&format!("skipped {name} (special file)")),
            "{}",
            stderr(&output)
        );
    }
    assert_eq!(stderr(&output).lines().count(), 2, "{}", stderr(&output));
    let got = snapshot(&out);
    assert_eq!(differences(&want, &got), Vec::<String>::new());
    // The comparer can fail: a changed mode is seen.
    std::fs::set_permissions(
        out.join("deep/er/secret"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    assert_eq!(differences(&want, &snapshot(&out)).len(), 1);

    // Again into the existing directory: merged, and still the same.
    std::fs::write(remote.join("extra"), b"kept").unwrap();
    let output = cp(&agent, &["-r", text(&src), &guest(&remote)]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(std::fs::read(remote.join("extra")).unwrap(), b"kept");
    assert_eq!(
        std::fs::read_to_string(remote.join("many/f0999")).unwrap(),
        "content 999\n"
    );
    // --no-clobber refuses an existing destination, before a byte lands.
    std::fs::remove_file(remote.join("many/f0005")).unwrap();
    let output = cp(&agent, &["-r", "--no-clobber", text(&src), &guest(&remote)]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("EEXIST") || stderr(&output).contains("exists"));
    assert!(!remote.join("many/f0005").exists());
    for path in [&src, &remote, &out] {
        std::fs::set_permissions(path.join("ro"), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// A raw tar entry: name, type, link target, data.
type RawEntry<'a> = (&'a [u8], tar::EntryType, &'a [u8], &'a [u8]);

/// A tar stream of raw entries, names written as they are (the tar crate's builder would
/// refuse the hostile ones).
fn raw_tar(entries: &[RawEntry<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, kind, link, data) in entries {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(*kind);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(1_000_000_000);
        let old = header.as_old_mut();
        old.name.fill(0);
        old.name[..name.len()].copy_from_slice(name);
        old.linkname.fill(0);
        old.linkname[..link.len()].copy_from_slice(link);
        header.set_cksum();
        builder.append(&header, *data).unwrap();
    }
    builder.into_inner().unwrap()
}

/// Sends `stream` as a tree put to `dst` with the library; the agent's error code, if any.
fn put_raw(agent: &Agent, put: &Put, stream: &[u8]) -> Result<(), ErrorCode> {
    let client = agent.client();
    let mut upload = client.upload(put).unwrap();
    let _ = upload.write_all(stream);
    match upload.finish() {
        Ok(_) => Ok(()),
        Err(err) => Err(err.remote_code().unwrap_or_else(|| panic!("{err}"))),
    }
}

/// Streams that try to write outside the destination: each is refused with `PathEscape`,
/// nothing outside is touched, and a new destination is not left half made.
#[test]
fn hostile_streams_are_refused_and_touch_nothing_outside() {
    use tar::EntryType::{Directory, Regular, Symlink};
    let agent = Agent::start();
    let dir = fresh_dir("ferry-cp-tree");
    let outside = dir.join("outside");
    std::fs::create_dir(&outside).unwrap();
    let victim = outside.join("victim");
    std::fs::write(&victim, b"original").unwrap();
    let out = outside.as_os_str().as_bytes();
    let absolute = victim.as_os_str().as_bytes();
    let cases: Vec<Vec<RawEntry<'_>>> = vec![
        vec![(b"../outside/victim", Regular, b"", b"x")],
        vec![(b"a/../../outside/victim", Regular, b"", b"x")],
        vec![(absolute, Regular, b"", b"x")],
        // A link to outside, then a file through it.
        vec![(b"l", Symlink, out, b""), (b"l/victim", Regular, b"", b"x")],
        // A link to outside, then a directory through it.
        vec![(b"l", Symlink, out, b""), (b"l/sub", Directory, b"", b"")],
        // A relative link climbing out, then a file through it.
        vec![
            (b"up", Symlink, b"../outside", b""),
            (b"up/victim", Regular, b"", b"x"),
        ],
        // A link that stays inside is refused too: no link is followed on the way.
        vec![
            (b"d", Directory, b"", b""),
            (b"in", Symlink, b"d", b""),
            (b"in/f", Regular, b"", b"x"),
        ],
    ];
    for (i, case) in cases.iter().enumerate() {
        let dst = dir.join(format!("dst{i}"));
        let stream = raw_tar(case);
        let result = put_raw(&agent, &Put::tree(&dst), &stream);
        assert_eq!(result, Err(ErrorCode::PathEscape), "case {i}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"original", "case {i}");
        assert_eq!(names(&outside), ["victim"], "case {i}");
        // The new destination never appeared, and its temporary directory is gone.
        let left: Vec<_> = names(&dir)
            .into_iter()
            .filter(|name| name != "outside")
            .collect();
        assert!(left.is_empty(), "case {i}: {left:?}");
    }
    // Into an existing directory holding a link to outside: refused, nothing through it.
    let existing = dir.join("existing");
    std::fs::create_dir(&existing).unwrap();
    std::os::unix::fs::symlink(&outside, existing.join("link")).unwrap();
    let stream = raw_tar(&[(b"link/victim", Regular, b"", b"x")]);
    let result = put_raw(&agent, &Put::tree(&existing), &stream);
    assert_eq!(result, Err(ErrorCode::PathEscape));
    assert_eq!(std::fs::read(&victim).unwrap(), b"original");
    // A file of the same name as an existing link replaces the link, not its target.
    let stream = raw_tar(&[(b"link", Regular, b"", b"x")]);
    put_raw(&agent, &Put::tree(&existing), &stream).unwrap();
    assert_eq!(std::fs::read(existing.join("link")).unwrap(), b"x");
    assert_eq!(names(&outside), ["victim"]);
}

/// A stream cut inside an entry is `BadArchive`, a garbage header too; a file over the agent's
/// maximum is `FileTooLarge`; none leaves a destination behind.
#[test]
fn broken_streams_and_large_files_are_refused_whole() {
    use tar::EntryType::Regular;
    let agent = Agent::start_with(&["--set", "max_file_size=1M"]);
    let dir = fresh_dir("ferry-cp-tree");
    let dst = dir.join("dst");
    let good = raw_tar(&[
        (b"first", Regular, b"", b"one"),
        (b"second", Regular, b"", &[7; 3000]),
    ]);
    // Cut in the second file's data (the end blocks are gone too).
    let result = put_raw(&agent, &Put::tree(&dst), &good[..2048]);
    assert_eq!(result, Err(ErrorCode::BadArchive));
    let mut garbage = good.clone();
    garbage[1030] ^= 0x55; // In the second header.
    let result = put_raw(&agent, &Put::tree(&dst), &garbage);
    assert_eq!(result, Err(ErrorCode::BadArchive));
    let big = vec![1u8; (1 << 20) + 1];
    let stream = raw_tar(&[(b"small", Regular, b"", b"s"), (b"big", Regular, b"", &big)]);
    let result = put_raw(&agent, &Put::tree(&dst), &stream);
    assert_eq!(result, Err(ErrorCode::FileTooLarge));
    assert!(names(&dir).is_empty(), "{:?}", names(&dir));
    // The same stream whole, under the limit: fine, and the stream's total may exceed it.
    let files = raw_tar(&[
        (b"a", Regular, b"", &big[..900_000]),
        (b"b", Regular, b"", &big[..900_000]),
    ]);
    put_raw(&agent, &Put::tree(&dst), &files).unwrap();
    assert_eq!(names(&dst), ["a", "b"]);
}

/// A client that goes away mid-stream: the new destination is not left half made.
#[test]
fn an_abandoned_tree_put_leaves_nothing() {
    use tar::EntryType::Regular;
    let agent = Agent::start();
    let dir = fresh_dir("ferry-cp-tree");
    let dst = dir.join("dst");
    let stream = raw_tar(&[
        (b"first", Regular, b"", b"one"),
        (b"second", Regular, b"", &[7; 100_000]),
    ]);
    let client = agent.client();
    let mut upload = client.upload(&Put::tree(&dst)).unwrap();
    upload.write_all(&stream[..50_000]).unwrap();
    // The agent has started unpacking.
    let deadline = Instant::now() + Duration::from_secs(5);
    while names(&dir).is_empty() {
        assert!(Instant::now() < deadline, "nothing was unpacked");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(upload);
    while !names(&dir).is_empty() {
        assert!(Instant::now() < deadline, "left behind: {:?}", names(&dir));
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Gets that cannot be served: a file with -r, a missing directory; exit 1, the path named,
/// nothing written locally. A tree put onto a file is refused the same way.
#[test]
fn wrong_kinds_and_missing_trees_are_refused() {
    let agent = Agent::start();
    let dir = fresh_dir("ferry-cp-tree");
    let file = dir.join("file");
    std::fs::write(&file, b"f").unwrap();
    let local = fresh_dir("ferry-cp-tree-local");
    let out = local.join("out");
    for (src, expected) in [(&file, "not a directory"), (&dir.join("missing"), "ENOENT")] {
        let output = cp(&agent, &["-r", &guest(src), text(&out)]);
        assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
        let message = stderr(&output);
        assert!(
            message.starts_with(&format!("ferry: {}: ", guest(src))),
            "{message}"
        );
        assert!(message.contains(expected), "{message}");
        assert!(names(&local).is_empty(), "{:?}", names(&local));
    }
    let client = agent.client();
    let err = client.get(&Get::tree(&file), std::io::sink()).unwrap_err();
    assert_eq!(err.remote_code(), Some(ErrorCode::WrongFileType));
    let src = fresh_dir("ferry-cp-tree-src");
    std::fs::write(src.join("x"), b"x").unwrap();
    let output = cp(&agent, &["-r", text(&src), &guest(&file)]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("not a directory"),
        "{}",
        stderr(&output)
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"f");
    // An owner is for a file.
    let mut put = Put::tree(dir.join("owned"));
    put.owner("0:0");
    let err = client.put(&put, &[][..]).unwrap_err();
    assert!(matches!(err, ferry_host::Error::InvalidRequest(_)), "{err}");
}
