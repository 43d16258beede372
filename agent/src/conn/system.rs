//! The operations on the guest itself rather than a command: info (what the guest is), and the
//! privileged ones the policy's `allow_shutdown` gates: shutdown, time sync and reseed. Each is
//! answered at once, with a handful of frames; nothing here waits on a command.
//!
//! Info reads the kernel's own files into small buffers on the stack, so everything it reports
//! is bounded: the first 8 KiB of the mount table, at most [`MAX_INFO_ITEMS`] mounts and
//! interfaces together, each interface's first IPv4 address.

use core::ffi::CStr;

use ferry_wire::limits::{MAX_INFO_ITEMS, MAX_RESEED};
use ferry_wire::session::{AgentEvent, AgentSession, Refusal};
use ferry_wire::{
    AgentFrame, Bytes, ErrorCode, InterfaceInfo, MountInfo, ShutdownRequest, StrList, SystemInfo,
    Timestamp,
};

use rustix::event::PollFlags;
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::net::{AddressFamily, SocketFlags, SocketType};
use rustix::thread::CpuSet;
use rustix::time::{ClockId, Timespec};

use super::io::Link;
use crate::successor::Successor;
use crate::sys::{self, InterfaceOp, InterfaceRequest, RandPoolInfo};
use crate::{clock, cstr, policy};

/// The audit line's name for one of these operations.
pub fn name(event: &AgentEvent<'_>) -> &'static [u8] {
    match event {
        AgentEvent::Shutdown(request) if request.reboot => b"reboot",
        AgentEvent::Shutdown(_) => b"shutdown",
        AgentEvent::TimeSync(_) => b"time-sync",
        AgentEvent::Reseed(_) => b"reseed",
        _ => b"info",
    }
}

/// How long one frame may wait for the client to take it.
const SEND_TIMEOUT_US: u64 = 30_000_000;

const NOT_ALLOWED: Refusal = Refusal::new(
    ErrorCode::PermissionDenied,
    "not allowed by the agent's policy (allow_shutdown)",
);

/// What is left to do once the receive buffer is released.
pub enum FollowUp {
    Info,
    Shutdown(ShutdownRequest),
}

/// Answers `event` (info, shutdown, time sync or reseed) as far as it can while the event
/// borrows the receive buffer: the clock and the pool are done here; what needs the socket is
/// returned. Otherwise the session has its last frame queued.
pub fn answer(event: &AgentEvent<'_>, session: &mut AgentSession) -> Option<FollowUp> {
    let privileged = !matches!(event, AgentEvent::Info);
    if privileged && !policy::current().allows_shutdown() {
        let _ = session.refuse(NOT_ALLOWED, now());
        return None;
    }
    let done = match *event {
        AgentEvent::Shutdown(request) => return Some(FollowUp::Shutdown(request)),
        AgentEvent::TimeSync(time) => {
            let previous = sys::clock_gettime(ClockId::Realtime);
            let next = Timespec {
                tv_sec: time.secs,
                tv_nsec: i64::from(time.nanos),
            };
            rustix::time::clock_settime(ClockId::Realtime, next)
                .map_err(|errno| refusal(errno, "cannot set the clock"))
                .map(|()| {
                    let previous = Timestamp {
                        secs: previous.tv_sec,
                        nanos: previous.tv_nsec.clamp(0, 999_999_999) as u32,
                    };
                    session.clock_set(previous, now())
                })
        }
        AgentEvent::Reseed(bytes) => {
            // The session checked 1..=MAX_RESEED bytes.
            let len = bytes.len().min(MAX_RESEED);
            let mut info = RandPoolInfo {
                // Full credit: the host's getrandom bytes are as good as ours.
                entropy_count: (len as i32).saturating_mul(8),
                buf_size: len as i32,
                buf: [0; MAX_RESEED],
            };
            for (slot, byte) in info.buf.iter_mut().zip(bytes) {
                *slot = *byte;
            }
            let flags = OFlags::WRONLY | OFlags::CLOEXEC;
            rustix::fs::open(c"/dev/urandom", flags, Mode::empty())
                .and_then(|random| sys::add_entropy(random, &info))
                .map_err(|errno| refusal(errno, "cannot add to the entropy pool"))
                .map(|()| session.done(len as u32, now()))
        }
        _ => return Some(FollowUp::Info),
    };
    if let Err(refusal) = done {
        let _ = session.refuse(refusal, now());
    }
    None
}

/// Does what [`answer`] left: sends the info, or acknowledges the shutdown and then asks the
/// listener for it. The session then has its last frame queued, or nothing is owed.
// Out of line: info's buffers must not be probed into the caller's frame.
#[inline(never)]
pub fn follow_up(
    follow_up: FollowUp,
    link: &mut Link<'_, '_>,
    session: &mut AgentSession,
    successor: &mut Successor,
) {
    match follow_up {
        FollowUp::Info => match info(link, session) {
            Ok(count) => {
                let _ = session.done(count, now());
            }
            Err(refusal) => {
                let _ = session.refuse(refusal, now());
            }
        },
        FollowUp::Shutdown(request) => {
            let _ = session.done(0, now());
            // The client hears the acknowledgement before anything stops; a client gone
            // before it could hear it shuts nothing down.
            if drain(link, session) {
                successor.request_power(request.reboot, request.grace_ms);
            }
        }
    }
}

fn now() -> u64 {
    clock::monotonic_us()
}

fn refusal(errno: Errno, message: &'static str) -> Refusal {
    let code = match errno {
        Errno::PERM | Errno::ACCESS => ErrorCode::PermissionDenied,
        Errno::INVAL => ErrorCode::InvalidRequest,
        _ => ErrorCode::Io,
    };
    Refusal::os(code, errno.raw_os_error().unsigned_abs(), message)
}

/// Sends everything queued and in the outbox, waiting for the client within
/// [`SEND_TIMEOUT_US`]; whether it all went.
fn drain(link: &mut Link<'_, '_>, session: &mut AgentSession) -> bool {
    let deadline = clock::monotonic_us().saturating_add(SEND_TIMEOUT_US);
    while link.outbox.refill(session) {
        if link.flush().is_err() || clock::monotonic_us() >= deadline {
            return false;
        }
        if !link.outbox.is_empty() && link.wait(PollFlags::OUT, Some(deadline)).is_err() {
            return false;
        }
    }
    true
}

/// Sends one info frame behind whatever is queued; whether it went.
fn send_info(link: &mut Link<'_, '_>, session: &mut AgentSession, frame: &AgentFrame<'_>) -> bool {
    drain(link, session)
        && link.outbox.put(|out| session.encode_info(frame, out))
        && drain(link, session)
}

/// Sends the system, its mounts and its interfaces; the count of mounts and interfaces, or
/// nothing more is owed (the client is gone: the session's `done` is then refused too).
fn info(link: &mut Link<'_, '_>, session: &mut AgentSession) -> Result<u32, Refusal> {
    const GONE: Refusal = Refusal::new(ErrorCode::Io, "client stopped reading");
    if !send_system(link, session) {
        return Err(GONE);
    }
    let mut count = 0u32;
    let mut table = [0u8; 8192];
    let mounts = crate::file::read(c"/proc/self/mounts", &mut table).map_or(&[][..], |f| f.text);
    for line in mounts.split(|b| *b == b'\n') {
        let [source, target, fstype, options] = [0, 1, 2, 3].map(|n| field(line, n));
        if options.is_empty() {
            continue;
        }
        let mut path = [0u8; 256];
        let space = cstr::join(&mut path, &[target]).and_then(|p| rustix::fs::statfs(p).ok());
        let (total, free, available) = space.map_or((0, 0, 0), |s| {
            let unit = if s.f_frsize > 0 {
                s.f_frsize
            } else {
                s.f_bsize
            } as u64;
            (
                s.f_blocks.saturating_mul(unit),
                s.f_bfree.saturating_mul(unit),
                s.f_bavail.saturating_mul(unit),
            )
        });
        let mount = MountInfo {
            source: Bytes(source),
            target: Bytes(target),
            fstype: sys::ascii_str(fstype),
            read_only: options.split(|b| *b == b',').next() == Some(b"ro"),
            total,
            free,
            available,
        };
        // Beyond the bound the rest is left out (the count says how many came).
        if count as usize >= MAX_INFO_ITEMS {
            break;
        }
        if !send_info(link, session, &AgentFrame::Mount(mount)) {
            return Err(GONE);
        }
        count += 1;
    }
    // Every interface with its byte counters, one line each after two lines of headings:
    // `  eth0: RX_BYTES packets … (8 receive fields) TX_BYTES …`.
    let mut dev = [0u8; 4096];
    let dev = crate::file::read(c"/proc/net/dev", &mut dev).map_or(&[][..], |f| f.text);
    let inet = rustix::net::socket_with(
        AddressFamily::INET,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        None,
    );
    for line in dev.split(|b| *b == b'\n').skip(2) {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, counters) = line.split_at(colon);
        let counters = counters.get(1..).unwrap_or(&[]);
        let rx_bytes = number(field(counters, 0), 10);
        let tx_bytes = number(field(counters, 8), 10);
        let name = name.trim_ascii();
        let (mut up, mut mtu) = (false, 0);
        let mut mac = [0u8; 6];
        let mut mac_len = 0;
        let mut addresses = [0u8; 24];
        let mut addresses_len = 0;
        if let (Ok(inet), Some(mut request)) = (&inet, InterfaceRequest::named(name)) {
            let mut ask = |op| {
                sys::interface_ioctl(inet, op, &mut request)
                    .ok()
                    .map(|()| request.data)
            };
            if let Some(data) = ask(InterfaceOp::GetFlags) {
                // IFF_UP.
                up = data[0] & 1 != 0;
            }
            if let Some(data) = ask(InterfaceOp::GetMtu) {
                mtu = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]);
            }
            if let Some(data) = ask(InterfaceOp::GetHardwareAddress) {
                // ARPHRD_NONE (tunnels) has no address.
                if u16::from_ne_bytes([data[0], data[1]]) != 0xfffe {
                    mac = [data[2], data[3], data[4], data[5], data[6], data[7]];
                    mac_len = mac.len();
                }
            }
            if let Some(data) = ask(InterfaceOp::GetAddress) {
                let netmask = ask(InterfaceOp::GetNetmask).unwrap_or([0xff; 24]);
                let prefix = u32::from_be_bytes([netmask[4], netmask[5], netmask[6], netmask[7]])
                    .count_ones();
                let address = [data[4], data[5], data[6], data[7]];
                addresses_len = format_ipv4(address, prefix, &mut addresses).len();
            }
        }
        let interface = InterfaceInfo {
            name: sys::ascii_str(name),
            up,
            mtu,
            mac: Bytes(mac.get(..mac_len).unwrap_or(&[])),
            addresses: StrList::new(addresses.get(..addresses_len).unwrap_or(&[])),
            rx_bytes,
            tx_bytes,
        };
        if count as usize >= MAX_INFO_ITEMS {
            break;
        }
        if !send_info(link, session, &AgentFrame::Interface(interface)) {
            return Err(GONE);
        }
        count += 1;
    }
    Ok(count)
}

/// Sends the first info frame: uname, sysinfo, the clocks, CPUs, memory, the agent.
fn send_system(link: &mut Link<'_, '_>, session: &mut AgentSession) -> bool {
    let uname = rustix::system::uname();
    let sysinfo = rustix::system::sysinfo();
    let now = sys::clock_gettime(ClockId::Realtime);
    let mut cpuinfo = [0u8; 2048];
    let cpuinfo = crate::file::read(c"/proc/cpuinfo", &mut cpuinfo).map_or(&[][..], |f| f.text);
    let mut meminfo = [0u8; 256];
    let meminfo = crate::file::read(c"/proc/meminfo", &mut meminfo).map_or(&[][..], |f| f.text);
    let kib = |text: &[u8], key: &[u8]| number(proc_field(text, key), 10).saturating_mul(1024);
    // The listener is this connection process's parent.
    let listener = rustix::process::getppid().map_or(0, |pid| pid.as_raw_nonzero().get());
    let mut digits = [0u8; 20];
    let mut path = [0u8; 40];
    let mut status = [0u8; 2048];
    let pid = crate::cgroup::decimal(&mut digits, u64::from(listener.unsigned_abs()));
    let status = cstr::join(&mut path, &[b"/proc/", pid, b"/status"])
        .map_or(&[][..], |path| read_text(path, &mut status));
    // Bit by bit: `CpuSet::count`'s software popcount is 64 bytes more.
    let cpus = rustix::thread::sched_getaffinity(None).map_or(1, |set| {
        (0..CpuSet::MAX_CPU).filter(|cpu| set.is_set(*cpu)).count() as u32
    });
    let load = sysinfo
        .loads
        .map(|load| ((load * 100) >> 16).min(u64::from(u32::MAX)) as u32);
    let info = SystemInfo {
        kernel_release: sys::ascii_str(uname.release().to_bytes()),
        kernel_version: sys::ascii_str(uname.version().to_bytes()),
        machine: sys::ascii_str(uname.machine().to_bytes()),
        hostname: sys::ascii_str(uname.nodename().to_bytes()),
        uptime_ms: clock::boottime_us() / 1000,
        now: Timestamp {
            secs: now.tv_sec,
            nanos: now.tv_nsec.clamp(0, 999_999_999) as u32,
        },
        cpus,
        cpu_model: sys::ascii_str(proc_field(cpuinfo, b"model name")),
        load,
        memory_total: kib(meminfo, b"MemTotal"),
        memory_available: kib(meminfo, b"MemAvailable"),
        processes: u32::from(sysinfo.procs),
        agent_pid: listener.unsigned_abs(),
        agent_rss: kib(status, b"VmRSS"),
    };
    send_info(link, session, &AgentFrame::SystemInfo(info))
}

/// The value of `key` in a `/proc` file of `key<blanks>: value` lines (its first line with
/// that key), trimmed; empty when it has none.
fn proc_field<'t>(text: &'t [u8], key: &[u8]) -> &'t [u8] {
    for line in text.split(|b| *b == b'\n') {
        let Some(rest) = line.strip_prefix(key) else {
            continue;
        };
        let rest = rest.trim_ascii_start();
        if let Some(value) = rest.strip_prefix(b":") {
            return value.trim_ascii();
        }
    }
    &[]
}

/// A small sysfs or procfs file's text, its trailing newline cut.
fn read_text<'b>(path: &CStr, buf: &'b mut [u8]) -> &'b [u8] {
    let text = crate::file::read(path, buf).map_or(&[][..], |f| f.text);
    text.trim_ascii_end()
}

/// The `n`th field of `line`, fields separated by runs of spaces; empty past the last.
fn field(line: &[u8], n: usize) -> &[u8] {
    let mut rest = line;
    for _ in 0..n {
        rest = rest.trim_ascii_start();
        let end = rest.iter().position(|b| *b == b' ').unwrap_or(rest.len());
        rest = rest.get(end..).unwrap_or(&[]);
    }
    let rest = rest.trim_ascii_start();
    let end = rest.iter().position(|b| *b == b' ').unwrap_or(rest.len());
    rest.get(..end).unwrap_or(&[])
}

/// Leading digits in `radix` (10 or 16); 0 when there are none.
fn number(digits: &[u8], radix: u32) -> u64 {
    let mut value = 0u64;
    for digit in digits {
        let Some(d) = char::from(*digit).to_digit(radix) else {
            break;
        };
        value = value
            .saturating_mul(u64::from(radix))
            .saturating_add(u64::from(d));
    }
    value
}

/// `A.B.C.D/PREFIX\0` in `out` (at most 19 bytes).
fn format_ipv4(address: [u8; 4], prefix: u32, out: &mut [u8; 24]) -> &[u8] {
    let mut len = 0;
    let mut push = |bytes: &[u8]| {
        for byte in bytes {
            if let Some(slot) = out.get_mut(len) {
                *slot = *byte;
                len += 1;
            }
        }
    };
    for (i, octet) in address.iter().enumerate() {
        let mut digits = [0u8; 20];
        push(crate::cgroup::decimal(&mut digits, u64::from(*octet)));
        push(if i == 3 { b"/" } else { b"." });
    }
    let mut digits = [0u8; 20];
    push(crate::cgroup::decimal(&mut digits, u64::from(prefix)));
    push(b"\0");
    let out: &[u8] = out;
    out.get(..len).unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_macs_and_addresses() {
        assert_eq!(number(b"1500", 10), 1500);
        let line = b"  12824     117    0 x";
        assert_eq!(field(line, 0), b"12824");
        assert_eq!(field(line, 1), b"117");
        assert_eq!(field(line, 3), b"x");
        assert_eq!(field(line, 4), b"");
        assert_eq!(field(b"", 0), b"");
        assert_eq!(field(b"rootfs / rootfs rw 0 0", 2), b"rootfs");
        assert_eq!(number(b"1009", 16), 0x1009);
        assert_eq!(number(b"", 10), 0);
        assert_eq!(number(b"12x3", 10), 12);
        assert_eq!(number(&[b'9'; 40], 10), u64::MAX);
        let mut out = [0u8; 24];
        assert_eq!(format_ipv4([127, 0, 0, 1], 8, &mut out), b"127.0.0.1/8\0");
        assert_eq!(
            format_ipv4([255, 255, 255, 255], 32, &mut out),
            b"255.255.255.255/32\0"
        );
        assert!(InterfaceRequest::named(b"lo").is_some());
        assert!(InterfaceRequest::named(&[b'x'; 15]).is_some());
        assert!(InterfaceRequest::named(&[b'x'; 16]).is_none());
        assert!(InterfaceRequest::named(b"a\0").is_none());
        let meminfo = b"MemTotal:       24672780 kB\nMemFree:  1 kB\nMemAvailable:   20 kB\n";
        assert_eq!(proc_field(meminfo, b"MemTotal"), b"24672780 kB");
        assert_eq!(number(proc_field(meminfo, b"MemAvailable"), 10), 20);
        assert_eq!(proc_field(meminfo, b"Mem"), b"");
        let cpuinfo = b"processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: x\n";
        assert_eq!(proc_field(cpuinfo, b"model name"), b"AMD EPYC 7B13");
        assert_eq!(proc_field(b"", b"model name"), b"");
    }
}
