//! Time as microseconds of a kernel clock: monotonic for durations and deadlines, boot time for
//! the readiness report.

use rustix::time::{ClockId, Timespec};

use crate::sys::clock_gettime;

/// Microseconds of `CLOCK_MONOTONIC`.
pub fn monotonic_us() -> u64 {
    to_us(clock_gettime(ClockId::Monotonic))
}

/// Microseconds of `CLOCK_BOOTTIME`: time since the kernel started, suspend included.
pub fn boottime_us() -> u64 {
    to_us(clock_gettime(ClockId::Boottime))
}

fn to_us(t: Timespec) -> u64 {
    (t.tv_sec as u64)
        .saturating_mul(1_000_000)
        .saturating_add(t.tv_nsec as u64 / 1_000)
}

/// A poll timeout from now until `deadline_us` (monotonic); zero once it has passed.
pub fn timeout_until(deadline_us: u64) -> Timespec {
    timeout_between(monotonic_us(), deadline_us)
}

/// A poll timeout from `now_us` until `deadline_us`; zero once it has passed.
pub fn timeout_between(now_us: u64, deadline_us: u64) -> Timespec {
    let left = deadline_us.saturating_sub(now_us);
    Timespec {
        tv_sec: (left / 1_000_000) as i64,
        tv_nsec: ((left % 1_000_000) * 1_000) as i64,
    }
}

/// Sleeps for `ms` milliseconds (a poll on nothing).
pub fn sleep_ms(ms: u64) {
    let deadline = monotonic_us().saturating_add(ms.saturating_mul(1_000));
    while monotonic_us() < deadline {
        let _ = rustix::event::poll(&mut [], Some(&timeout_until(deadline)));
    }
}
