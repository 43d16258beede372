//! PID 1 duties: standard descriptors, the filesystems an empty rootfs lacks, kernel modules,
//! the kernel command line, and the readiness announcement to the host.

use core::ffi::CStr;

use ferry_wire::session::encode_ready_announcement;
use ferry_wire::ReadyReport;
use rustix::fd::OwnedFd;
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::mount::MountFlags;
use rustix::net::{AddressFamily, SocketFlags, SocketType};

use crate::config::{KernelParams, ListenAddr};
use crate::sys::{self, VsockAddr};
use crate::{clock, cstr, log, users};

/// Makes sure descriptors 0, 1 and 2 are open, so no socket or pipe of ours is ever mistaken
/// for a standard stream (and `dup2` onto them never aliases).
pub fn ensure_std_fds() {
    for _ in 0..3 {
        let fd = rustix::fs::open(
            c"/dev/console",
            OFlags::RDWR | OFlags::NOCTTY,
            Mode::empty(),
        )
        .or_else(|_| rustix::fs::open(c"/dev/null", OFlags::RDWR, Mode::empty()))
        .or_else(|_| rustix::pipe::pipe().map(|(r, _)| r));
        match fd {
            Ok(fd) if rustix::fd::AsRawFd::as_raw_fd(&fd) <= 2 => core::mem::forget(fd),
            // Already at 3 or above: 0..2 were open all along.
            _ => break,
        }
    }
}

/// Mounts what an empty rootfs lacks, where it is not mounted already.
pub fn mount_filesystems() {
    // Terminals belong to the `tty` group (root's without one), mode 0620; `/dev/ptmx` may be
    // opened by anyone.
    let mut digits = [0u8; 20];
    let gid = crate::cgroup::decimal(&mut digits, u64::from(users::system_tty_gid().unwrap_or(0)));
    let mut devpts = [0u8; 64];
    let devpts = cstr::join(&mut devpts, &[b"gid=", gid, b",mode=0620,ptmxmode=0666"]);
    let mounts: [(&CStr, &CStr, &CStr, MountFlags, Option<&CStr>); 7] = [
        (
            c"proc",
            c"/proc",
            c"proc",
            MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            None,
        ),
        (
            c"sysfs",
            c"/sys",
            c"sysfs",
            MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            None,
        ),
        (
            c"devtmpfs",
            c"/dev",
            c"devtmpfs",
            MountFlags::NOSUID,
            Some(c"mode=0755"),
        ),
        (
            c"devpts",
            c"/dev/pts",
            c"devpts",
            MountFlags::NOSUID | MountFlags::NOEXEC,
            // Always fits: 4 + 10 digits + 24 bytes.
            devpts,
        ),
        (
            c"tmpfs",
            c"/dev/shm",
            c"tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            Some(c"mode=1777"),
        ),
        (
            c"tmpfs",
            c"/run",
            c"tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            Some(c"mode=0755"),
        ),
        (
            c"tmpfs",
            c"/tmp",
            c"tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            Some(c"mode=1777"),
        ),
    ];
    for (source, target, fstype, flags, data) in mounts {
        let _ = rustix::fs::mkdir(target, Mode::from_raw_mode(0o755));
        if is_mount_point(target) {
            continue;
        }
        if let Err(errno) = rustix::mount::mount(source, target, fstype, flags, data) {
            log::Line::new()
                .push(b"mount ")
                .push(target.to_bytes())
                .push(b": errno ")
                .num(errno.raw_os_error().unsigned_abs() as u64)
                .emit();
        }
    }
    // After sysfs, which holds its mount point.
    crate::cgroup::mount_hierarchy();
}

/// The links udev or mdev would make and devtmpfs does not: `tee /dev/stderr`, bash's
/// `<(...)` and friends need them. Existing entries are left alone.
pub fn link_standard_devices() {
    let links: [(&CStr, &CStr); 5] = [
        // devtmpfs has its own `/dev/ptmx`, which opens the devpts at `/dev/pts`; without one,
        // the devpts' own.
        (c"pts/ptmx", c"/dev/ptmx"),
        (c"/proc/self/fd", c"/dev/fd"),
        (c"/proc/self/fd/0", c"/dev/stdin"),
        (c"/proc/self/fd/1", c"/dev/stdout"),
        (c"/proc/self/fd/2", c"/dev/stderr"),
    ];
    for (target, link) in links {
        match rustix::fs::symlink(target, link) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(errno) => log::Line::new()
                .push(b"symlink ")
                .push(link.to_bytes())
                .push(b": errno ")
                .num(errno.raw_os_error().unsigned_abs() as u64)
                .emit(),
        }
    }
}

/// A directory is a mount point when it lives on another device than its parent.
fn is_mount_point(dir: &CStr) -> bool {
    let mut buf = [0u8; 64];
    let Some(parent) = cstr::join(&mut buf, &[parent_dir(dir.to_bytes())]) else {
        return false;
    };
    match (rustix::fs::stat(dir), rustix::fs::stat(parent)) {
        (Ok(a), Ok(b)) => a.st_dev != b.st_dev,
        _ => false,
    }
}

/// The directory holding `path` (`/` for anything at the top, or without a slash).
fn parent_dir(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|b| *b == b'/') {
        Some(0) | None => b"/",
        Some(slash) => path.get(..slash).unwrap_or(b"/"),
    }
}

/// What the kernel command line configured.
pub struct BootConfig {
    pub listen: Option<ListenAddr>,
    pub ready_port: Option<u32>,
    /// Time spent loading modules, in microseconds.
    pub modules_us: u64,
    /// Each module's time: `NAME=MICROSECONDS` entries, NUL-terminated, packed (what does not
    /// fit is left out).
    pub module_times: ModuleTimes,
}

impl BootConfig {
    /// Nothing configured, nothing loaded (the agent is not PID 1).
    pub fn empty() -> BootConfig {
        BootConfig {
            listen: None,
            ready_port: None,
            modules_us: 0,
            module_times: ModuleTimes::new(),
        }
    }
}

/// The readiness report's per-module times.
pub type ModuleTimes = heapless::Vec<u8, { ferry_wire::limits::MAX_MODULE_TIMES }>;

/// Reads `/proc/cmdline` for `ferry.listen=`, `ferry.ready=` and `ferry.modules=` (falling back
/// to `/etc/ferry/modules`, one name per line) and loads the modules, in order.
// Kept out of line: its large stack frame must not be probed into the caller's.
#[inline(never)]
pub fn read_kernel_cmdline() -> BootConfig {
    let mut config = BootConfig::empty();
    // x86's COMMAND_LINE_SIZE is 2048.
    let mut buf = [0u8; 2048];
    let params = KernelParams::parse(read_file(c"/proc/cmdline", &mut buf));
    match params.listen {
        Some(Ok(listen)) => config.listen = Some(listen),
        Some(Err(value)) => log::Line::new()
            .push(b"bad ferry.listen=")
            .push(value)
            .emit(),
        None => {}
    }
    config.ready_port = params.ready_port;
    match params.hostname {
        Some(Ok(name)) => {
            if let Err(errno) = rustix::system::sethostname(name) {
                log::error(b"cannot set the hostname", errno);
            }
        }
        Some(Err(value)) => log::Line::new()
            .push(b"bad ferry.hostname=")
            .push(value)
            .emit(),
        None => {}
    }
    bring_up_loopback();
    let started = clock::monotonic_us();
    let times = &mut config.module_times;
    match params.modules {
        Some(list) => load_modules(list.split(|b| *b == b','), times),
        None => {
            let mut file = [0u8; 2048];
            let list = read_file(c"/etc/ferry/modules", &mut file);
            load_modules(list.split(|b| *b == b'\n').map(|l| l.trim_ascii()), times);
        }
    }
    config.modules_us = clock::monotonic_us().saturating_sub(started);
    config
}

/// Reads as much of the file at `path` as fits `buf`; nothing when it cannot be read.
fn read_file<'b>(path: &CStr, buf: &'b mut [u8]) -> &'b [u8] {
    crate::file::read(path, buf).map_or(&[], |read| read.text)
}

/// Brings the loopback interface up, so 127.0.0.1 works (the kernel gives `lo` its address
/// when it goes up).
fn bring_up_loopback() {
    use crate::sys::{InterfaceOp, InterfaceRequest};
    let flags = SocketFlags::CLOEXEC;
    let Ok(sock) = rustix::net::socket_with(AddressFamily::INET, SocketType::DGRAM, flags, None)
    else {
        return;
    };
    let Some(mut request) = InterfaceRequest::named(b"lo") else {
        return;
    };
    let up = sys::interface_ioctl(&sock, InterfaceOp::GetFlags, &mut request).and_then(|()| {
        // IFF_UP, in the flags' low byte.
        request.data[0] |= 1;
        sys::interface_ioctl(&sock, InterfaceOp::SetFlags, &mut request)
    });
    if let Err(errno) = up {
        log::error(b"cannot bring lo up", errno);
    }
}

/// Loads `/lib/modules/NAME.ko` for each name with `finit_module`, naming any that fails, and
/// notes each one's time in `times`.
fn load_modules<'a>(names: impl Iterator<Item = &'a [u8]>, times: &mut ModuleTimes) {
    for name in names {
        load_module(name, times);
    }
}

/// Appends `NAME=MICROSECONDS` and its NUL to `times`, if it fits whole.
fn note_module_time(times: &mut ModuleTimes, name: &[u8], us: u64) {
    let mut digits = [0u8; 20];
    let us = crate::cgroup::decimal(&mut digits, us);
    let len = name.len() + 1 + us.len() + 1;
    if times.len() + len <= times.capacity() {
        for part in [name, b"=", us, b"\0"] {
            let _ = times.extend_from_slice(part);
        }
    }
}

/// One of [`load_modules`]' names. Out of line: `load_modules` is instantiated twice (the kernel
/// command line's list and the file's), and this body need not be.
#[inline(never)]
fn load_module(name: &[u8], times: &mut ModuleTimes) {
    if name.is_empty() || name.starts_with(b"#") {
        return;
    }
    let started = clock::monotonic_us();
    let mut buf = [0u8; 128];
    let Some(path) = module_path(&mut buf, name) else {
        log::Line::new()
            .push(b"module name too long: ")
            .push(name)
            .emit();
        return;
    };
    let result = rustix::fs::open(path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
        .and_then(|fd| rustix::system::finit_module(&fd, c"", 0));
    match result {
        Ok(()) | Err(Errno::EXIST) => {
            note_module_time(times, name, clock::monotonic_us().saturating_sub(started));
        }
        Err(errno) => {
            log::Line::new()
                .push(b"module ")
                .push(name)
                .push(b" failed to load: errno ")
                .num(errno.raw_os_error().unsigned_abs() as u64)
                .emit();
        }
    }
}

/// `/lib/modules/NAME.ko` in `buf`; `None` when it does not fit (or `name` holds a NUL).
fn module_path<'b>(buf: &'b mut [u8], name: &[u8]) -> Option<&'b CStr> {
    cstr::join(buf, &[b"/lib/modules/", name, b".ko"])
}

/// Waits (bounded) until the vsock transport has given this guest a CID.
fn wait_for_cid(timeout_ms: u64) -> Option<u32> {
    let deadline = clock::monotonic_us().saturating_add(timeout_ms.saturating_mul(1000));
    loop {
        if let Ok(dev) = rustix::fs::open(
            c"/dev/vsock",
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            if let Ok(cid) = sys::vsock_local_cid(&dev) {
                if cid != linux_raw_sys::vm_sockets::VMADDR_CID_ANY as u32 && cid > 2 {
                    return Some(cid);
                }
            }
        }
        if clock::monotonic_us() >= deadline {
            return None;
        }
        clock::sleep_ms(5);
    }
}

/// Tells the host the agent is up: connects to CID 2 on `port` and sends a hello and a
/// [`ReadyReport`]. Runs in a forked process so a host that never answers cannot stall PID 1.
// Kept out of line: its large stack frame must not be probed into the caller's.
#[inline(never)]
pub fn announce_ready(
    port: u32,
    listen: &ListenAddr,
    init_started_us: u64,
    boot: &BootConfig,
    serving: &crate::auth::Serving,
) {
    // SAFETY: the agent is single-threaded and installs no signal handlers; the child runs the
    // agent's own code (see `sys::fork`).
    #[allow(unsafe_code)]
    let forked = unsafe { sys::fork() };
    match forked {
        Ok(sys::Forked::Child) => {}
        Ok(sys::Forked::Parent(_)) => return,
        Err(errno) => return log::error(b"cannot fork readiness announcer", errno),
    }
    // Listening on vsock means nothing until the transport has a CID (bind succeeds without a
    // device): readiness is declared only then.
    let cid = if listen.vsock_port().is_some() {
        match wait_for_cid(30_000) {
            Some(cid) => cid,
            None => {
                log::Line::new()
                    .push(b"no vsock CID after 30 s; not announcing")
                    .emit();
                sys::exit(1)
            }
        }
    } else {
        0
    };
    let listening_us = clock::boottime_us();
    let report = ReadyReport {
        cid,
        init_started_us,
        modules_us: boot.modules_us,
        listening_us,
        module_times: ferry_wire::StrList::new(&boot.module_times),
    };
    let mut buf = [0u8; 512 + ferry_wire::limits::MAX_MODULE_TIMES];
    let announced =
        encode_ready_announcement(&serving.config, serving.security(), report, &mut buf);
    let Ok(len) = announced else { sys::exit(1) };
    let announcement = buf.get(..len).unwrap_or(&[]);
    for attempt in 0..50u32 {
        match connect_host(port) {
            Ok(sock) => {
                if send_all(&sock, announcement) {
                    sys::exit(0)
                }
            }
            Err(errno) if attempt == 49 => {
                log::error(b"cannot reach the host for readiness", errno)
            }
            Err(_) => {}
        }
        clock::sleep_ms(100);
    }
    sys::exit(1)
}

/// Writes all of `bytes` (blocking); whether they all went out.
fn send_all(sock: &OwnedFd, mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        match rustix::io::write(sock, bytes) {
            Ok(n) => bytes = bytes.get(n..).unwrap_or(&[]),
            Err(Errno::INTR) => {}
            Err(_) => return false,
        }
    }
    true
}

fn connect_host(port: u32) -> Result<OwnedFd, Errno> {
    let sock = rustix::net::socket_with(
        AddressFamily::VSOCK,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    let host = linux_raw_sys::vm_sockets::VMADDR_CID_HOST;
    rustix::net::connect(&sock, &VsockAddr::new(host, port))?;
    Ok(sock)
}

/// Replaces this process with a fresh copy of the agent (PID 1's last resort after a panic).
pub fn reexec_self() {
    let Some(program) = sys::arg(0) else { return };
    let mut argv_storage = sys::PtrStorage::<2>::new();
    let mut argv = sys::PtrArray::new(&mut argv_storage);
    argv.push(program);
    let mut envp_storage = sys::PtrStorage::<1>::new();
    let envp = sys::PtrArray::new(&mut envp_storage);
    let _ = sys::execve(program, &argv, &envp);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_of_paths() {
        assert_eq!(parent_dir(b"/proc"), b"/");
        assert_eq!(parent_dir(b"/dev/pts"), b"/dev");
        assert_eq!(parent_dir(b"/dev/shm/"), b"/dev/shm");
        assert_eq!(parent_dir(b"relative"), b"/");
        assert_eq!(parent_dir(b""), b"/");
        assert_eq!(parent_dir(b"/"), b"/");
    }

    #[test]
    fn module_paths() {
        let mut buf = [0u8; 128];
        assert_eq!(
            module_path(&mut buf, b"vsock"),
            Some(c"/lib/modules/vsock.ko")
        );
        // 13 + 111 + 3 + NUL = 128 fits; one more byte does not.
        let longest = [b'm'; 111];
        assert!(module_path(&mut buf, &longest).is_some());
        assert!(module_path(&mut buf, &[b'm'; 112]).is_none());
        assert!(module_path(&mut buf, &[b'm'; 5000]).is_none());
        assert!(module_path(&mut buf, b"a\0b").is_none());
    }

    #[test]
    fn module_times_are_packed_and_bounded() {
        let mut times = ModuleTimes::new();
        note_module_time(&mut times, b"virtio_mmio", 1234);
        note_module_time(&mut times, b"vsock", 0);
        assert_eq!(times.as_slice(), b"virtio_mmio=1234\0vsock=0\0");
        // What does not fit whole is left out; the list stays well-formed.
        let long = [b'm'; 1000];
        note_module_time(&mut times, &long, u64::MAX);
        assert_eq!(times.as_slice(), b"virtio_mmio=1234\0vsock=0\0");
        for _ in 0..200 {
            note_module_time(&mut times, b"module", 99999);
        }
        assert!(times.len() <= ferry_wire::limits::MAX_MODULE_TIMES);
        assert_eq!(times.last(), Some(&0));
    }

    #[test]
    fn read_file_fills_at_most_the_buffer() {
        let mut buf = [0u8; 4];
        assert_eq!(read_file(c"/proc/self/cmdline", &mut buf).len(), 4);
        assert!(read_file(c"/no/such/file", &mut buf).is_empty());
        let mut empty = [0u8; 0];
        assert!(read_file(c"/proc/self/cmdline", &mut empty).is_empty());
    }
}
