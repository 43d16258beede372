//! A job's output spool: one memfd per job (sparse: only written pages cost memory), holding
//! its argv and, per stream, the first `head` bytes and a ring of the most recent `ring` bytes.
//! Offsets are absolute (bytes since the stream began), so an attacher that comes back knows
//! exactly what it missed. Only the supervisor touches it, with `pwrite`/`pread`: no shared
//! memory, no races.
//!
//! Layout: `[0, META)` the argv (packed NUL-terminated, cut), then stdout's head and ring, then
//! stderr's. A byte at offset `o` of a stream lives in its head if `o < head`, else at
//! `head + (o - head) % ring`; it is retained while `o >= total - ring` (or `o < head`).

use rustix::fd::OwnedFd;
use rustix::io::Errno;

/// Room for the job's argv at the front of its spool ([`ferry_wire`]'s `MAX_JOB_ARGV`).
pub const META: u64 = 1024;

/// Which stream: 0 stdout, 1 stderr.
pub type StreamIndex = usize;

/// One job's spool.
pub struct Spool {
    fd: OwnedFd,
    head: u64,
    ring: u64,
    /// Bytes written so far, per stream.
    totals: [u64; 2],
}

/// What a read at an offset found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// `n` bytes from the offset were read into the buffer.
    Data(usize),
    /// The bytes from the offset on were overwritten: this many are lost; go on after them.
    Lost(u64),
    /// Nothing there yet (the offset is the stream's end, or beyond it).
    End,
}

impl Spool {
    /// A new, empty spool keeping `head` and `ring` bytes (at least 1) per stream.
    pub fn new(head: u64, ring: u64) -> Result<Spool, Errno> {
        let fd = rustix::fs::memfd_create(c"ferry-job", rustix::fs::MemfdFlags::CLOEXEC)?;
        Ok(Spool {
            fd,
            head,
            ring: ring.max(1),
            totals: [0; 2],
        })
    }

    /// Bytes the stream produced so far.
    pub fn total(&self, stream: StreamIndex) -> u64 {
        self.totals.get(stream).copied().unwrap_or(0)
    }

    /// The first offset of the stream still retained past its head: below it (and from the
    /// head's end on) bytes are lost.
    pub fn ring_start(&self, stream: StreamIndex) -> u64 {
        self.total(stream)
            .saturating_sub(self.ring)
            .max(self.head)
            .min(self.total(stream))
    }

    /// Where an attacher asking for offset `since` starts, and how many bytes before it are
    /// lost: `(from, lost)`. An offset past the end starts at the end.
    pub fn resume(&self, stream: StreamIndex, since: u64) -> (u64, u64) {
        let since = since.min(self.total(stream));
        let start = self.ring_start(stream);
        if since >= self.head && since < start {
            (start, start - since)
        } else {
            (since, 0)
        }
    }

    fn base(&self, stream: StreamIndex) -> u64 {
        let per_stream = self.head.saturating_add(self.ring);
        META.saturating_add(per_stream.saturating_mul(stream as u64))
    }

    /// Where offset `at` (retained) of `stream` lives in the file, and how many bytes may be
    /// read or written there in one piece.
    fn place(&self, stream: StreamIndex, at: u64) -> (u64, u64) {
        let base = self.base(stream);
        if at < self.head {
            (base + at, self.head - at)
        } else {
            let in_ring = (at - self.head) % self.ring;
            (base + self.head + in_ring, self.ring - in_ring)
        }
    }

    /// Appends `data` to `stream`. Bytes that would be overwritten at once (more than the ring
    /// holds) are not written, only counted.
    pub fn write(&mut self, stream: StreamIndex, mut data: &[u8]) -> Result<(), Errno> {
        let Some(total) = self.totals.get(stream).copied() else {
            return Err(Errno::INVAL);
        };
        let mut at = total;
        let end = total.saturating_add(data.len() as u64);
        while !data.is_empty() {
            // Past the head, only the last `ring` bytes of what is written survive.
            let keep_from = end.saturating_sub(self.ring);
            if at >= self.head && at < keep_from {
                let skip = usize::try_from(keep_from - at).unwrap_or(usize::MAX);
                data = data.get(skip..).unwrap_or(&[]);
                at = keep_from;
                continue;
            }
            let (offset, room) = self.place(stream, at);
            let n = usize::try_from(room).unwrap_or(usize::MAX).min(data.len());
            let (piece, rest) = data.split_at(n);
            write_all_at(&self.fd, piece, offset)?;
            data = rest;
            at += n as u64;
        }
        if let Some(slot) = self.totals.get_mut(stream) {
            *slot = end;
        }
        Ok(())
    }

    /// Reads from offset `at` of `stream` into `buf`: as much as is retained in one piece.
    pub fn read(&self, stream: StreamIndex, at: u64, buf: &mut [u8]) -> Result<Chunk, Errno> {
        let total = self.total(stream);
        if at >= total {
            return Ok(Chunk::End);
        }
        let start = self.ring_start(stream);
        if at >= self.head && at < start {
            return Ok(Chunk::Lost(start - at));
        }
        let (offset, room) = self.place(stream, at);
        let available = room.min(total - at);
        let n = usize::try_from(available)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let Some(part) = buf.get_mut(..n) else {
            return Err(Errno::INVAL);
        };
        read_exact_at(&self.fd, part, offset)?;
        Ok(Chunk::Data(n))
    }

    /// Keeps the job's argv (cut to [`META`] bytes).
    pub fn set_argv(&mut self, argv: &[u8]) -> Result<(), Errno> {
        let n = argv.len().min(META as usize);
        write_all_at(&self.fd, argv.get(..n).unwrap_or(&[]), 0)
    }

    /// Reads the argv back into `buf` (its length was kept by the caller).
    pub fn argv(&self, buf: &mut [u8]) -> Result<(), Errno> {
        let n = buf.len().min(META as usize);
        read_exact_at(&self.fd, buf.get_mut(..n).unwrap_or(&mut []), 0)
    }
}

fn write_all_at(fd: &OwnedFd, mut data: &[u8], mut offset: u64) -> Result<(), Errno> {
    while !data.is_empty() {
        match rustix::io::pwrite(fd, data, offset) {
            Ok(0) => return Err(Errno::NOSPC),
            Ok(n) => {
                data = data.get(n..).unwrap_or(&[]);
                offset += n as u64;
            }
            Err(Errno::INTR) => {}
            Err(errno) => return Err(errno),
        }
    }
    Ok(())
}

/// Reads `buf.len()` bytes at `offset`; a hole in the sparse file reads as zeros, and a short
/// file (never written that far) too.
fn read_exact_at(fd: &OwnedFd, buf: &mut [u8], mut offset: u64) -> Result<(), Errno> {
    let mut done = 0;
    while let Some(rest @ [_, ..]) = buf.get_mut(done..) {
        match rustix::io::pread(fd, &mut *rest, offset) {
            Ok(0) => {
                rest.fill(0);
                return Ok(());
            }
            Ok(n) => {
                done += n;
                offset += n as u64;
            }
            Err(Errno::INTR) => {}
            Err(errno) => return Err(errno),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads everything an attacher from `since` gets: the bytes, and the losses as
    /// (offset, bytes).
    fn replay(spool: &Spool, stream: StreamIndex, since: u64) -> (Vec<u8>, Vec<(u64, u64)>) {
        let (mut at, lost) = spool.resume(stream, since);
        let mut losses = Vec::new();
        if lost > 0 {
            losses.push((since, lost));
        }
        let mut out = Vec::new();
        let mut buf = [0u8; 7];
        loop {
            match spool.read(stream, at, &mut buf).unwrap() {
                Chunk::Data(n) => {
                    assert!(n > 0);
                    out.extend_from_slice(&buf[..n]);
                    at += n as u64;
                }
                Chunk::Lost(n) => {
                    losses.push((at, n));
                    at += n;
                }
                Chunk::End => return (out, losses),
            }
        }
    }

    fn bytes(range: std::ops::Range<u64>) -> Vec<u8> {
        range.map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn everything_is_kept_until_head_and_ring_are_full() {
        let mut spool = Spool::new(10, 20).unwrap();
        spool.write(0, &bytes(0..30)).unwrap();
        assert_eq!(replay(&spool, 0, 0), (bytes(0..30), vec![]));
        assert_eq!(replay(&spool, 1, 0), (vec![], vec![]), "stderr is apart");
        assert_eq!(spool.resume(0, 30), (30, 0));
        assert_eq!(spool.resume(0, 99), (30, 0), "past the end: the end");
    }

    #[test]
    fn a_wrapped_ring_loses_exactly_the_middle() {
        for chunk in [1usize, 3, 7, 20, 21, 64, 1000] {
            let mut spool = Spool::new(10, 20).unwrap();
            let all = bytes(0..1000);
            for part in all.chunks(chunk) {
                spool.write(1, part).unwrap();
            }
            assert_eq!(spool.total(1), 1000);
            assert_eq!(spool.ring_start(1), 980);
            // From the start: the head, a loss of exactly 970 bytes at offset 10, the ring.
            let (out, losses) = replay(&spool, 1, 0);
            let mut expected = bytes(0..10);
            expected.extend(bytes(980..1000));
            assert_eq!(out, expected, "chunk {chunk}");
            assert_eq!(losses, vec![(10, 970)]);
            // From within the lost part: told at once, in the header's numbers.
            assert_eq!(spool.resume(1, 500), (980, 480));
            assert_eq!(replay(&spool, 1, 500), (bytes(980..1000), vec![(500, 480)]));
            // At the edges: the last lost byte, the first kept one, the head's last.
            assert_eq!(spool.resume(1, 979), (980, 1));
            assert_eq!(spool.resume(1, 980), (980, 0));
            assert_eq!(spool.resume(1, 9), (9, 0));
            assert_eq!(spool.resume(1, 10), (980, 970));
        }
    }

    #[test]
    fn exactly_full_loses_nothing_and_one_more_byte_loses_one() {
        let mut spool = Spool::new(4, 8).unwrap();
        spool.write(0, &bytes(0..12)).unwrap();
        assert_eq!(replay(&spool, 0, 0), (bytes(0..12), vec![]));
        spool.write(0, &bytes(12..13)).unwrap();
        let (out, losses) = replay(&spool, 0, 0);
        assert_eq!(losses, vec![(4, 1)]);
        let mut expected = bytes(0..4);
        expected.extend(bytes(5..13));
        assert_eq!(out, expected);
    }

    #[test]
    fn without_a_head_only_the_ring_is_kept() {
        let mut spool = Spool::new(0, 5).unwrap();
        spool.write(0, &bytes(0..3)).unwrap();
        assert_eq!(replay(&spool, 0, 0), (bytes(0..3), vec![]));
        spool.write(0, &bytes(3..11)).unwrap();
        assert_eq!(replay(&spool, 0, 0), (bytes(6..11), vec![(0, 6)]));
        assert_eq!(spool.resume(0, 0), (6, 6));
    }

    #[test]
    fn argv_is_kept_apart_from_the_streams() {
        let mut spool = Spool::new(2, 2).unwrap();
        spool.set_argv(b"sleep\x0010\x00").unwrap();
        spool.write(0, b"abcdef").unwrap();
        let mut argv = [0u8; 9];
        spool.argv(&mut argv).unwrap();
        assert_eq!(&argv, b"sleep\x0010\x00");
        assert_eq!(spool.write(2, b"x"), Err(Errno::INVAL));
    }
}
