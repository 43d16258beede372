//! Console messages without formatting machinery: pieces of bytes and numbers copied into a
//! small stack buffer and written to stderr in one `write`. What a client or the system can
//! provoke at will is rate-limited ([`Line::emit_limited`]): one token bucket shared by every
//! agent process, so a flood of connections cannot flood the console.

use core::sync::atomic::{AtomicU64, Ordering};

/// A message under construction; longer messages are cut, never split.
pub struct Line {
    /// The text so far; one byte is always left for the newline.
    buf: heapless::Vec<u8, { Line::CAPACITY }>,
}

impl Line {
    const CAPACITY: usize = 256;

    /// A line starting with the agent's name.
    pub fn new() -> Self {
        let mut line = Line {
            buf: heapless::Vec::new(),
        };
        line.push(b"ferry-agent: ");
        line
    }

    /// Appends bytes.
    pub fn push(&mut self, bytes: &[u8]) -> &mut Self {
        let room = (Self::CAPACITY - 1).saturating_sub(self.buf.len());
        let take = bytes.get(..room).unwrap_or(bytes);
        let _ = self.buf.extend_from_slice(take);
        self
    }

    /// Appends a number in decimal.
    pub fn num(&mut self, mut value: u64) -> &mut Self {
        // u64::MAX has 20 digits.
        let mut digits = [0u8; 20];
        let mut first = digits.len();
        for (at, digit) in digits.iter_mut().enumerate().rev() {
            *digit = b'0' + (value % 10) as u8;
            value /= 10;
            first = at;
            if value == 0 {
                break;
            }
        }
        self.push(digits.get(first..).unwrap_or(&[]))
    }

    /// Writes the line, newline-terminated, to stderr (the console when PID 1). Best effort:
    /// there is nowhere to report a failing console. Not limited: for start-up messages and
    /// others nobody outside can repeat at will.
    pub fn emit(&mut self) {
        let _ = self.buf.push(b'\n');
        let _ = rustix::io::write(crate::sys::stderr(), &self.buf);
        self.buf.pop();
    }

    /// Writes the line as [`emit`](Self::emit) does, unless every agent process together has
    /// already written its share ([`BURST`] lines at once, [`LINES_PER_SECOND`] after that): then
    /// it is counted, and the next line written is preceded by "N lines suppressed". For
    /// anything a client or the system can provoke over and over.
    pub fn emit_limited(&mut self) {
        let shared = crate::sys::shared_state();
        if !take_token(&shared.log_bucket, now_ms()) {
            shared.log_suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let suppressed = shared.log_suppressed.swap(0, Ordering::Relaxed);
        if suppressed > 0 {
            Line::new()
                .num(u64::from(suppressed))
                .push(b" lines suppressed")
                .emit();
        }
        self.emit();
    }
}

/// Lines every agent process together may write at once before the limit applies.
pub const BURST: u32 = 20;
/// Lines per second, all agent processes together, once the burst is spent.
pub const LINES_PER_SECOND: u32 = 5;

/// A line's cost in the bucket's units (a thousandth of a line: the refill is per millisecond).
const LINE_COST: u32 = 1000;
/// Units the bucket regains per millisecond.
const REFILL_PER_MS: u32 = LINES_PER_SECOND * LINE_COST / 1000;
/// The bucket's capacity in units.
const BURST_COST: u32 = BURST * LINE_COST;
const _: () = assert!(REFILL_PER_MS > 0 && BURST > 0);

/// Milliseconds of the monotonic clock, wrapping (the bucket looks only at differences).
fn now_ms() -> u32 {
    (crate::clock::monotonic_us() / 1000) as u32
}

/// Takes one line's token from `bucket`, refilled up to `now_ms`; `false` when it is empty.
///
/// The bucket is one word, so every process can update it with one compare-exchange: the
/// millisecond of the last update in the high half, and the units *spent* (not those left) in
/// the low half, so the all-zero word of a fresh page is a full bucket.
fn take_token(bucket: &AtomicU64, now_ms: u32) -> bool {
    let mut current = bucket.load(Ordering::Relaxed);
    loop {
        let last_ms = (current >> 32) as u32;
        let spent = current as u32;
        // Another process may have stamped a slightly later millisecond than the one we read:
        // a "negative" interval refills nothing and keeps the later stamp.
        let elapsed = now_ms.wrapping_sub(last_ms);
        // (A full bucket, like a fresh one, has nothing to refill: it takes the new stamp.)
        let (elapsed, stamp) = if elapsed > u32::MAX / 2 && spent > 0 {
            (0, last_ms)
        } else {
            (elapsed, now_ms)
        };
        let spent = spent.saturating_sub(elapsed.saturating_mul(REFILL_PER_MS));
        let taken = spent.saturating_add(LINE_COST) <= BURST_COST;
        let spent = if taken { spent + LINE_COST } else { spent };
        let next = (u64::from(stamp) << 32) | u64::from(spent);
        match bucket.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return taken,
            Err(seen) => current = seen,
        }
    }
}

/// Writes `what: errno N` as one line, rate-limited ([`Line::emit_limited`]): a failure can
/// repeat as often as something provokes it.
pub fn error(what: &[u8], err: rustix::io::Errno) {
    Line::new()
        .push(what)
        .push(b": errno ")
        .num(err.raw_os_error().unsigned_abs() as u64)
        .emit_limited();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_truncation() {
        let mut line = Line::new();
        line.num(0).push(b" ").num(18446744073709551615);
        assert_eq!(&line.buf[..], b"ferry-agent: 0 18446744073709551615");
        let long = [b'x'; 400];
        let mut line = Line::new();
        line.push(&long);
        assert_eq!(line.buf.len(), 255);
        line.num(7);
        assert_eq!(line.buf.len(), 255, "cut, never split");
    }

    #[test]
    fn the_bucket_allows_a_burst_then_its_rate() {
        // A fresh (all-zero) bucket is full, whatever the clock says.
        for start in [0, 5, 4_000_000_000, u32::MAX] {
            let bucket = AtomicU64::new(0);
            let taken = (0..100).filter(|_| take_token(&bucket, start)).count();
            assert_eq!(taken, BURST as usize, "at {start}");
            // One second later, the rate's worth (the clock may wrap meanwhile).
            let later = start.wrapping_add(1000);
            let taken = (0..100).filter(|_| take_token(&bucket, later)).count();
            assert_eq!(taken, LINES_PER_SECOND as usize, "after {start}");
            // Just short of a line's refill: nothing.
            let soon = later.wrapping_add(1000 / LINES_PER_SECOND - 1);
            assert!(!take_token(&bucket, soon));
            assert!(take_token(&bucket, soon.wrapping_add(1)));
            // A long pause refills up to the burst, never beyond.
            let much_later = later.wrapping_add(3_600_000);
            let taken = (0..100).filter(|_| take_token(&bucket, much_later)).count();
            assert_eq!(taken, BURST as usize);
        }
    }

    #[test]
    fn a_clock_read_behind_the_stamp_refills_nothing() {
        let bucket = AtomicU64::new(0);
        while take_token(&bucket, 10_000) {}
        // Another process stamped 10_000; this one read 9_999: not a wrap-around's refill.
        assert!(!take_token(&bucket, 9_999));
        assert!(!take_token(&bucket, 10_000 + 1000 / LINES_PER_SECOND - 1));
        assert!(take_token(&bucket, 10_000 + 1000 / LINES_PER_SECOND));
    }
}
