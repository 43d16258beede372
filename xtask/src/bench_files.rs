//! `cargo xtask bench`'s file rows: put and get of 1 GiB through the local agent, each next to a
//! raw Unix-socket copy of the same bytes doing the same work at its ends, in the same run.
//!
//! What "the same work" means here, row by row (the baseline's text says it too):
//! - put: bytes from memory → socket → a file in a tmpfs directory, written and fsynced by the
//!   receiving side; the clock stops when the receiver has synced it (ferry: at `FileDone`).
//! - get: a file in the same directory, read by the sending side → socket → the host, which counts
//!   and drops the bytes; the clock stops at the end of the data (ferry: at `FileDone`).
//!
//! tmpfs, not the disk: the destination's fsync is then the kernel's bookkeeping alone, so the
//! rows compare what ferry adds (frames, credit, SHA-256 on both sides) with a plain copy instead
//! of two disk writebacks (which would hide that and swing with the other disk users).

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ferry_host::{Client, Get, Put};

use crate::bench::{bytes, transfer_row, Row};

/// Put, then get, of `total` bytes through `client`'s agent (on this machine), each trial next to
/// its raw copy, interleaved, best of 3.
pub fn local_file_rows(client: &Client, total: u64, rows: &mut Vec<Row>) -> Result<()> {
    let scratch = Scratch::create("files")?;
    let medium = scratch.medium();
    let pattern = pattern(1 << 20);
    let size = bytes(total);

    let (mut ferry_rates, mut raw_rates) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let destination = scratch.dir.join("put");
        ferry_rates.push(ferry_put(client, &destination, &pattern, total)?);
        std::fs::remove_file(&destination)
            .with_context(|| format!("removing {}", destination.display()))?;
        raw_rates.push(raw_socket_put(
            &scratch.dir.join("raw-put"),
            &pattern,
            total,
        )?);
    }
    rows.push(transfer_row(
        &format!("put {size} to a file on {medium}"),
        &ferry_rates,
        &raw_rates,
        "raw Unix socket → file, fsynced",
    ));

    let source = scratch.dir.join("source");
    make_file(&source, &pattern, total)?;
    let (mut ferry_rates, mut raw_rates) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        ferry_rates.push(ferry_get(client, &source, total)?);
        raw_rates.push(raw_socket_get(&source, total)?);
    }
    rows.push(transfer_row(
        &format!("get {size} of a file on {medium}"),
        &ferry_rates,
        &raw_rates,
        "file → raw Unix socket",
    ));
    Ok(())
}

/// `total` pattern bytes put at `destination`: bytes per second until the agent committed the
/// file (its digest checked, the file and its directory fsynced).
pub fn ferry_put(
    client: &Client,
    destination: impl AsRef<std::ffi::OsStr>,
    pattern: &[u8],
    total: u64,
) -> Result<f64> {
    let started = Instant::now();
    let done = client
        .put(
            Put::file(destination).size(total),
            PatternReader::new(pattern, total),
        )
        .context("put")?;
    let elapsed = started.elapsed();
    if done.bytes != total {
        bail!("put moved {} of {total} bytes", done.bytes);
    }
    Ok(total as f64 / elapsed.as_secs_f64())
}

/// `source` got and dropped: bytes per second until the agent's summary checked out.
pub fn ferry_get(client: &Client, source: impl AsRef<std::ffi::OsStr>, total: u64) -> Result<f64> {
    let started = Instant::now();
    let done = client
        .get(&Get::file(source), std::io::sink())
        .context("get")?;
    let elapsed = started.elapsed();
    if done.bytes != total {
        bail!("get moved {} of {total} bytes", done.bytes);
    }
    Ok(total as f64 / elapsed.as_secs_f64())
}

/// `total` bytes of a pattern, repeated, as a reader (a put's content).
pub struct PatternReader<'a> {
    pattern: &'a [u8],
    at: usize,
    left: u64,
}

impl<'a> PatternReader<'a> {
    pub fn new(pattern: &'a [u8], total: u64) -> PatternReader<'a> {
        PatternReader {
            pattern,
            at: 0,
            left: total,
        }
    }
}

impl Read for PatternReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64)
            .min(self.left)
            .min((self.pattern.len() - self.at) as u64) as usize;
        buf[..n].copy_from_slice(&self.pattern[self.at..self.at + n]);
        self.at = (self.at + n) % self.pattern.len();
        self.left -= n as u64;
        Ok(n)
    }
}

/// The copy buffer on the raw side, as large as the agent's pumps move at once or larger.
pub const CHUNK: usize = 256 * 1024;

/// A scratch directory for transfers, on tmpfs when the machine has one, removed on drop.
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn create(label: &str) -> Result<Scratch> {
        let base = if is_tmpfs(Path::new("/dev/shm")) {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("ferry-bench-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // A root agent puts and gets as its default user (nobody): the directory is everyone's,
        // sticky, like /tmp.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777))?;
        Ok(Scratch { dir })
    }

    /// "tmpfs" or "disk": what the baseline text says the files sat on.
    pub fn medium(&self) -> &'static str {
        if is_tmpfs(&self.dir) {
            "tmpfs"
        } else {
            "disk"
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether `path` sits on tmpfs: the file system of the longest mount point in `/proc/mounts`
/// that contains it.
fn is_tmpfs(path: &Path) -> bool {
    let (Ok(path), Ok(mounts)) = (path.canonicalize(), std::fs::read_to_string("/proc/mounts"))
    else {
        return false;
    };
    filesystem_of(&mounts, &path) == Some("tmpfs")
}

/// The file-system type of the longest mount point of `mounts` (`/proc/mounts` text) that
/// contains `path`.
fn filesystem_of<'a>(mounts: &'a str, path: &Path) -> Option<&'a str> {
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, point, kind) = (fields.next()?, fields.next()?, fields.next()?);
            path.starts_with(point).then_some((point.len(), kind))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, kind)| kind)
}

/// A non-zero, non-repeating-per-block pattern (xorshift), so no layer can take a shortcut on
/// zero pages; content does not change SHA-256's cost.
pub fn pattern(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `total` bytes of `pattern` (repeated) to `sink` in [`CHUNK`]s.
pub fn write_pattern(sink: &mut impl Write, pattern: &[u8], total: u64) -> std::io::Result<()> {
    let mut left = total;
    let mut at = 0usize;
    while left > 0 {
        let n = (left.min(CHUNK as u64) as usize).min(pattern.len() - at);
        sink.write_all(&pattern[at..at + n])?;
        left -= n as u64;
        at = (at + n) % pattern.len();
    }
    Ok(())
}

/// A file of `total` pattern bytes at `path` (the source of the get rows).
pub fn make_file(path: &Path, pattern: &[u8], total: u64) -> Result<()> {
    let mut file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    write_pattern(&mut file, pattern, total)?;
    file.sync_all()?;
    Ok(())
}

/// Raw put: a writer thread sends `total` pattern bytes into a Unix socket; this thread reads
/// them into `destination` and fsyncs it. Bytes per second until the sync returned.
pub fn raw_socket_put(destination: &Path, pattern: &[u8], total: u64) -> Result<f64> {
    let started = Instant::now();
    let (mut tx, mut rx) = UnixStream::pair()?;
    let pattern = pattern.to_vec();
    let writer = thread::spawn(move || write_pattern(&mut tx, &pattern, total));
    let mut file =
        File::create(destination).with_context(|| format!("creating {}", destination.display()))?;
    let mut buf = vec![0u8; CHUNK];
    let mut received = 0u64;
    loop {
        let n = rx.read(&mut buf)?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n])?;
        received += n as u64;
    }
    file.sync_all()?;
    // The agent syncs the directory too, after the rename.
    if let Some(dir) = destination.parent() {
        File::open(dir)?.sync_all()?;
    }
    let elapsed = started.elapsed();
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer thread panicked"))??;
    if received != total {
        bail!("raw put moved {received} of {total} bytes");
    }
    std::fs::remove_file(destination)?;
    Ok(total as f64 / elapsed.as_secs_f64())
}

/// Raw get: a reader thread copies `source` into a Unix socket; this thread counts and drops
/// the bytes. Bytes per second until EOF.
pub fn raw_socket_get(source: &Path, total: u64) -> Result<f64> {
    let started = Instant::now();
    let (mut tx, mut rx) = UnixStream::pair()?;
    let mut file = File::open(source).with_context(|| format!("opening {}", source.display()))?;
    let reader = thread::spawn(move || -> std::io::Result<()> {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            tx.write_all(&buf[..n])?;
        }
    });
    let mut buf = vec![0u8; CHUNK];
    let mut received = 0u64;
    loop {
        let n = rx.read(&mut buf)?;
        if n == 0 {
            break;
        }
        received += n as u64;
    }
    let elapsed = started.elapsed();
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader thread panicked"))??;
    if received != total {
        bail!("raw get moved {received} of {total} bytes");
    }
    Ok(total as f64 / elapsed.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_is_not_zero_and_repeats_exactly() {
        let pattern = pattern(1000);
        assert_eq!(pattern.len(), 1000);
        assert!(pattern.iter().filter(|&&b| b == 0).count() < 20);
        let mut out = Vec::new();
        write_pattern(&mut out, &pattern, 2500).unwrap();
        assert_eq!(out.len(), 2500);
        assert_eq!(&out[..1000], &pattern[..]);
        assert_eq!(&out[1000..2000], &pattern[..]);
        assert_eq!(&out[2000..], &pattern[..500]);
        let mut read = Vec::new();
        PatternReader::new(&pattern, 2500)
            .read_to_end(&mut read)
            .unwrap();
        assert_eq!(read, out);
    }

    #[test]
    fn the_longest_containing_mount_point_names_the_file_system() {
        let mounts = "/dev/vda / ext4 rw 0 0\ntmpfs /dev/shm tmpfs rw 0 0\n\
                      devtmpfs /dev devtmpfs rw 0 0\n";
        let of = |p: &str| filesystem_of(mounts, Path::new(p));
        assert_eq!(of("/dev/shm/x"), Some("tmpfs"));
        assert_eq!(of("/dev/null"), Some("devtmpfs"));
        assert_eq!(
            of("/dev/shmx"),
            Some("devtmpfs"),
            "components, not string prefixes"
        );
        assert_eq!(of("/work"), Some("ext4"));
        assert_eq!(filesystem_of("", Path::new("/x")), None);
    }

    #[test]
    fn raw_copies_move_every_byte() {
        let scratch = Scratch::create("selftest").unwrap();
        let pattern = pattern(CHUNK + 3);
        let total = 3 * CHUNK as u64 + 17;
        let source = scratch.dir.join("source");
        make_file(&source, &pattern, total).unwrap();
        assert_eq!(std::fs::metadata(&source).unwrap().len(), total);
        assert!(raw_socket_get(&source, total).unwrap() > 0.0);
        assert!(raw_socket_get(&source, total + 1).is_err());
        let destination = scratch.dir.join("destination");
        assert!(raw_socket_put(&destination, &pattern, total).unwrap() > 0.0);
        assert!(!destination.exists(), "the raw put's file is removed");
    }
}
