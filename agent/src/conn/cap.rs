//! A per-stream output cap that keeps the head and a tail window (issue 10): the first bytes
//! of a stream pass live, the last ones are kept in a ring until the stream ends, and what fell
//! between them is counted, never silently lost.
//!
//! With a cap of `C` bytes kept, the tail window is `T = min(C / 2, MAX_TAIL)` and the head
//! `H = C - T`:
//! - the first `H` bytes are read into the outbox and sent as they come ([`Next::Live`]);
//! - every later byte is read straight into the ring ([`Next::Tail`]), which keeps the most
//!   recent `T` of them; whatever the ring let go of is counted ([`Cap::dropped`]);
//! - at the stream's end the driver sends `OutputDropped { bytes: dropped }` when anything
//!   was dropped, then the ring's contents in order ([`Cap::take_tail`]).
//!
//! So a stream that overflows keeps exactly `C` bytes (`H + T`), and one that does not loses
//! nothing: its bytes past the head only arrive at its end (a tail cannot be known before
//! then), without an `OutputDropped`.
//!
//! A cap of 0 keeps nothing: every byte is drained and counted as dropped (a command whose
//! output nobody wants still runs at pipe speed and is never blocked). A cap of 1 keeps one
//! byte of head and no tail. `u64::MAX` is in effect no cap.
//!
//! The command is never blocked by the cap: past the head, reads go into the ring whatever
//! the socket does, at pipe speed (one read per contiguous part of the ring, at least half of
//! it on average), and cost no copy. The ring is always [`MAX_TAIL`] bytes so reads stay large
//! however small `T` is; only the last `T` of what it holds count.
//!
//! Pure: no I/O; the driver reads the pipe into the slices this hands out.

/// The largest tail window, and the size of the ring that holds it.
pub const MAX_TAIL: usize = 64 * 1024;

/// One stream's ring: [`MAX_TAIL`] bytes, in untouched `.bss` until a stream passes its head.
pub type Ring = [u8; MAX_TAIL];

/// Where the next read of a stream goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Next<'a> {
    /// Into the outbox, framed and sent now: at most this many bytes (at least 1). Report it
    /// with [`Cap::commit_live`].
    Live(u64),
    /// Into this part of the ring (never empty). Report it with [`Cap::commit_tail`].
    Tail(&'a mut [u8]),
}

/// One stream's cap (see the module's documentation).
pub struct Cap<'r> {
    ring: &'r mut Ring,
    /// Head bytes still to pass live.
    head_left: u64,
    /// `T`: how many of the most recent tail bytes are kept.
    keep: usize,
    /// Bytes read into the ring so far; the next one goes to `written % MAX_TAIL`.
    written: u64,
    /// Every byte of the stream, head and tail.
    produced: u64,
    /// Bytes of the kept window already handed out by [`Cap::take_tail`].
    flushed: usize,
}

impl<'r> Cap<'r> {
    /// A cap keeping `cap` bytes of the stream, with `ring` for its tail.
    pub fn new(cap: u64, ring: &'r mut Ring) -> Self {
        let keep = usize::try_from(cap / 2).map_or(MAX_TAIL, |half| half.min(MAX_TAIL));
        Cap {
            ring,
            head_left: cap.saturating_sub(keep as u64),
            keep,
            written: 0,
            produced: 0,
            flushed: 0,
        }
    }

    /// Where the next read goes.
    pub fn next(&mut self) -> Next<'_> {
        if self.head_left > 0 {
            return Next::Live(self.head_left);
        }
        let at = self.position();
        // `at < MAX_TAIL`, so the part is never empty (an empty read would look like EOF).
        Next::Tail(self.ring.get_mut(at..).unwrap_or_default())
    }

    /// `n` bytes were read live (within [`Next::Live`]'s bound).
    pub fn commit_live(&mut self, n: usize) {
        let n = n as u64;
        self.head_left = self.head_left.saturating_sub(n);
        self.produced = self.produced.saturating_add(n);
    }

    /// `n` bytes were read into the part of the ring [`Next::Tail`] handed out.
    pub fn commit_tail(&mut self, n: usize) {
        let n = n as u64;
        self.written = self.written.saturating_add(n);
        self.produced = self.produced.saturating_add(n);
    }

    /// Every byte the stream produced so far.
    pub fn produced(&self) -> u64 {
        self.produced
    }

    /// Bytes dropped so far: read into the ring and pushed out of the tail window since.
    pub fn dropped(&self) -> u64 {
        self.written.saturating_sub(self.kept() as u64)
    }

    /// How much of the tail window is still to be sent by [`Cap::take_tail`].
    pub fn tail_pending(&self) -> usize {
        self.kept().saturating_sub(self.flushed)
    }

    /// Copies the next part of the tail window (oldest first) into `out`; how many bytes (0
    /// once it is all out). Call once the stream has ended: every read after the first call
    /// would shift the window.
    pub fn take_tail(&mut self, out: &mut [u8]) -> usize {
        let pending = self.tail_pending();
        // The window's oldest byte sits `kept` bytes behind the write position, in the ring.
        let start = (self.position() + MAX_TAIL - self.kept()) % MAX_TAIL;
        let at = (start + self.flushed) % MAX_TAIL;
        let len = pending.min(MAX_TAIL - at).min(out.len());
        let (Some(from), Some(to)) = (self.ring.get(at..at + len), out.get_mut(..len)) else {
            return 0;
        };
        to.copy_from_slice(from);
        self.flushed += len;
        len
    }

    /// The tail bytes in the ring that count: the last `T` of those written.
    fn kept(&self) -> usize {
        usize::try_from(self.written).map_or(self.keep, |written| written.min(self.keep))
    }

    /// Where the next tail byte goes in the ring.
    fn position(&self) -> usize {
        (self.written % MAX_TAIL as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> Box<Ring> {
        vec![0u8; MAX_TAIL].into_boxed_slice().try_into().unwrap()
    }

    /// What a driver makes of `input` under `cap`, read in chunks of at most `chunk(i)` bytes
    /// (a pipe's reads): the bytes sent live, the dropped count reported at the end (if any),
    /// and the tail sent after it, taken in pieces of `out` bytes.
    fn drive(
        cap: u64,
        input: &[u8],
        mut chunk: impl FnMut(usize) -> usize,
        out: usize,
    ) -> (Vec<u8>, Option<u64>, Vec<u8>) {
        let mut ring = ring();
        let mut cap = Cap::new(cap, &mut ring);
        let mut live = Vec::new();
        let mut at = 0;
        let mut reads = 0;
        while at < input.len() {
            let want = chunk(reads).max(1);
            reads += 1;
            match cap.next() {
                Next::Live(left) => {
                    let n = want.min(input.len() - at).min(left as usize);
                    assert!(n > 0);
                    live.extend_from_slice(&input[at..at + n]);
                    cap.commit_live(n);
                    at += n;
                }
                Next::Tail(part) => {
                    assert!(!part.is_empty());
                    let n = want.min(input.len() - at).min(part.len());
                    part[..n].copy_from_slice(&input[at..at + n]);
                    cap.commit_tail(n);
                    at += n;
                }
            }
        }
        assert_eq!(cap.produced(), input.len() as u64);
        let dropped = Some(cap.dropped()).filter(|d| *d > 0);
        let mut tail = Vec::new();
        let mut buf = vec![0u8; out];
        loop {
            let pending = cap.tail_pending();
            let n = cap.take_tail(&mut buf);
            assert_eq!(cap.tail_pending(), pending - n);
            if n == 0 {
                break;
            }
            tail.extend_from_slice(&buf[..n]);
        }
        (live, dropped, tail)
    }

    /// What the module's documentation promises, from the input alone.
    fn model(cap: u64, input: &[u8]) -> (Vec<u8>, Option<u64>, Vec<u8>) {
        let keep = (cap / 2).min(MAX_TAIL as u64) as usize;
        let head = (cap - keep as u64).min(input.len() as u64) as usize;
        let rest = &input[head..];
        let kept = rest.len().min(keep);
        let dropped = (rest.len() - kept) as u64;
        (
            input[..head].to_vec(),
            Some(dropped).filter(|d| *d > 0),
            rest[rest.len() - kept..].to_vec(),
        )
    }

    fn bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    #[test]
    fn an_overflowing_stream_keeps_its_head_and_tail_exactly() {
        let input = b"0123456789ABCDEF";
        let (live, dropped, tail) = drive(10, input, |_| 3, 4);
        assert_eq!(live, b"01234");
        assert_eq!(dropped, Some(6));
        assert_eq!(tail, b"BCDEF");
        assert_eq!(live.len() + tail.len(), 10, "head + tail is the cap");
    }

    #[test]
    fn a_stream_within_its_cap_loses_nothing() {
        let input = b"0123456789";
        for cap in [10, 11, 1000] {
            let (live, dropped, tail) = drive(cap, input, |_| 4, 64);
            assert_eq!(dropped, None, "cap {cap}");
            assert_eq!([live, tail].concat(), input, "cap {cap}");
        }
        let (live, dropped, tail) = drive(10, input, |_| 100, 64);
        assert_eq!(
            (live.as_slice(), dropped, tail.as_slice()),
            (&b"01234"[..], None, &b"56789"[..])
        );
    }

    #[test]
    fn a_cap_of_0_drops_everything_and_counts_it() {
        let input = bytes(200_000, 1);
        let (live, dropped, tail) = drive(0, &input, |_| 65536, 1024);
        assert!(live.is_empty() && tail.is_empty());
        assert_eq!(dropped, Some(200_000));
        // Nothing at all: nothing to report either.
        assert_eq!(drive(0, b"", |_| 1, 1), (vec![], None, vec![]));
    }

    #[test]
    fn small_caps() {
        assert_eq!(drive(1, b"abc", |_| 8, 8), (b"a".to_vec(), Some(2), vec![]));
        assert_eq!(
            drive(2, b"abc", |_| 8, 8),
            (b"a".to_vec(), Some(1), b"c".to_vec())
        );
        assert_eq!(
            drive(3, b"abcdef", |_| 1, 1),
            (b"ab".to_vec(), Some(3), b"f".to_vec())
        );
    }

    #[test]
    fn no_cap_passes_everything_live() {
        let input = bytes(300_000, 2);
        let (live, dropped, tail) = drive(u64::MAX, &input, |_| 65536, 64);
        assert_eq!((live.len(), dropped, tail.len()), (300_000, None, 0));
        let mut ring = ring();
        assert_eq!(
            Cap::new(u64::MAX, &mut ring).next(),
            Next::Live(u64::MAX - MAX_TAIL as u64)
        );
    }

    #[test]
    fn a_large_stream_drains_in_large_reads() {
        // 1 MiB kept of 3 MiB: 960 KiB of head, 64 KiB of tail.
        let input = bytes(3 << 20, 3);
        let mut reads = 0;
        let (live, dropped, tail) = drive(
            1 << 20,
            &input,
            |_| {
                reads += 1;
                65536
            },
            65536,
        );
        assert_eq!(live, &input[..(1 << 20) - MAX_TAIL]);
        assert_eq!(tail, &input[input.len() - MAX_TAIL..]);
        assert_eq!(dropped, Some(2 << 20));
        // Pipe-sized reads throughout: the ring's parts are whole (64 KiB aligned here).
        assert_eq!(reads, (3 << 20) / 65536);
    }

    #[test]
    fn a_small_tail_still_reads_the_whole_ring() {
        // T = 50: the reads past the head still fill up to the ring's end.
        let mut ring = ring();
        let mut cap = Cap::new(100, &mut ring);
        assert_eq!(cap.next(), Next::Live(50));
        cap.commit_live(50);
        match cap.next() {
            Next::Tail(part) => assert_eq!(part.len(), MAX_TAIL),
            Next::Live(_) => panic!("the head is done"),
        }
        cap.commit_tail(MAX_TAIL - 1);
        match cap.next() {
            Next::Tail(part) => assert_eq!(part.len(), 1, "up to the ring's end"),
            Next::Live(_) => panic!("the head is done"),
        }
        cap.commit_tail(1);
        match cap.next() {
            Next::Tail(part) => assert_eq!(part.len(), MAX_TAIL, "wrapped"),
            Next::Live(_) => panic!("the head is done"),
        }
        assert_eq!(cap.dropped(), MAX_TAIL as u64 - 50);
    }

    #[test]
    fn matches_the_model_on_random_caps_chunkings_and_lengths() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut random = move |bound: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % bound.max(1)
        };
        for case in 0..300 {
            let len = match case % 3 {
                0 => random(64) as usize,
                1 => random(4096) as usize,
                _ => random(400_000) as usize,
            };
            let cap = match random(4) {
                0 => random(16),
                1 => random(300_000),
                2 => len as u64 + random(3),
                _ => random(2 * MAX_TAIL as u64 + 10),
            };
            let input = bytes(len, case);
            let sizes: Vec<usize> = (0..64).map(|_| 1 + random(70_000) as usize).collect();
            let out = 1 + random(70_000) as usize;
            let got = drive(cap, &input, |i| sizes[i % sizes.len()], out);
            assert_eq!(got, model(cap, &input), "case {case}: cap {cap}, len {len}");
        }
    }
}
