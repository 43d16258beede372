//! The agent's one unsafe corner: the vsock address type, fork/exec and signal dispositions
//! (rustix's semver-exempt `runtime` module, pinned in the workspace manifest), `spawn` (a
//! `clone` sharing our memory, with its child stack), the kernel's argv/envp, the
//! per-connection buffers, and two things done here only to keep the binary small:
//! `clock_gettime` as a plain syscall (rustix's goes through a vDSO symbol parser) and C strings
//! checked by one small scan. Everything else in the agent is safe code.
#![allow(unsafe_code)]

use core::cell::UnsafeCell;
use core::ffi::c_void;
use core::ffi::CStr;
use core::mem::MaybeUninit;
use core::ptr;
use core::sync::atomic::{
    AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};

use ferry_wire::limits::{
    MAX_ARGS, MAX_ARGV_BYTES, MAX_DATA, MAX_ENV_BYTES, MAX_ENV_VARS, MAX_FRAME, MAX_PATH,
    STDIN_WINDOW,
};
use ferry_wire::DATA_HEADROOM;
use rustix::fd::{AsFd, FromRawFd, OwnedFd};
use rustix::io;
use rustix::net::addr::{SocketAddrArg, SocketAddrLen, SocketAddrOpaque};
use rustix::process::Pid;
use rustix::runtime::{self, KernelSigSet, KernelSigaction, KernelSigactionFlags, Signal};
use rustix::time::Timespec;

/// `struct sockaddr_vm` as the kernel defines it: 16 bytes. (linux-raw-sys' bindgen type is
/// padded to 128 bytes, which `bind` would reject as too long for the family.)
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VsockAddr {
    family: u16,
    reserved1: u16,
    port: u32,
    cid: u32,
    flags: u8,
    zero: [u8; 3],
}

impl VsockAddr {
    /// The address `cid:port`.
    pub const fn new(cid: u32, port: u32) -> Self {
        VsockAddr {
            family: linux_raw_sys::net::AF_VSOCK as u16,
            reserved1: 0,
            port,
            cid,
            flags: 0,
            zero: [0; 3],
        }
    }
}

// SAFETY: `VsockAddr` is `#[repr(C)]` with exactly the layout of the kernel's `sockaddr_vm`, its
// family field is AF_VSOCK, and the pointer handed to `f` lives as long as `self`, which outlives
// the call.
unsafe impl SocketAddrArg for VsockAddr {
    unsafe fn with_sockaddr<R>(
        &self,
        f: impl FnOnce(*const SocketAddrOpaque, SocketAddrLen) -> R,
    ) -> R {
        f(
            (self as *const Self).cast(),
            core::mem::size_of::<Self>() as SocketAddrLen,
        )
    }
}

impl VsockAddr {
    /// The vsock address in `addr`, as `accept` or `getpeername` returned it; `None` for
    /// another family or a truncated address.
    pub fn from_any(addr: &rustix::net::SocketAddrAny) -> Option<VsockAddr> {
        if addr.address_family() != rustix::net::AddressFamily::VSOCK
            || (addr.addr_len() as usize) < core::mem::size_of::<VsockAddr>()
        {
            return None;
        }
        // SAFETY: `SocketAddrAny` keeps its first `addr_len()` bytes initialized, and that is at
        // least `size_of::<VsockAddr>()`; every field of `VsockAddr` is an integer, so any bytes
        // are a valid value, and `read_unaligned` needs no alignment.
        Some(unsafe { ptr::read_unaligned(addr.as_ptr().cast::<VsockAddr>()) })
    }

    /// The context id (CID): 2 is the host, 1 this machine's loopback.
    pub fn cid(&self) -> u32 {
        self.cid
    }

    /// The port.
    pub fn port(&self) -> u32 {
        self.port
    }
}

/// `ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID)` on `/dev/vsock`: the guest's CID, once the vsock
/// transport has one.
pub fn vsock_local_cid(dev_vsock: impl AsFd) -> io::Result<u32> {
    const OPCODE: rustix::ioctl::Opcode =
        linux_raw_sys::ioctl::IOCTL_VM_SOCKETS_GET_LOCAL_CID as rustix::ioctl::Opcode;
    // SAFETY: IOCTL_VM_SOCKETS_GET_LOCAL_CID writes one `unsigned int` through its argument,
    // which is what `Getter<_, u32>` provides.
    unsafe { rustix::ioctl::ioctl(dev_vsock, rustix::ioctl::Getter::<OPCODE, u32>::new()) }
}

/// `ioctl(master, TIOCGPTN)`: the number `N` of a pseudo-terminal master's slave,
/// `/dev/pts/N` (for kernels before `TIOCGPTPEER`, Linux 4.13).
pub fn pty_number(master: impl AsFd) -> io::Result<u32> {
    const OPCODE: rustix::ioctl::Opcode = linux_raw_sys::ioctl::TIOCGPTN as rustix::ioctl::Opcode;
    // SAFETY: TIOCGPTN writes one `unsigned int` through its argument, which is what
    // `Getter<_, u32>` provides.
    unsafe { rustix::ioctl::ioctl(master, rustix::ioctl::Getter::<OPCODE, u32>::new()) }
}

/// `struct ifreq`: an interface's name and a 24-byte union, of which the agent uses the flags
/// (a `short` at its start) and an IPv4 `struct sockaddr_in` (the address at bytes 4..8).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct InterfaceRequest {
    pub name: [u8; 16],
    pub data: [u8; 24],
}

impl InterfaceRequest {
    /// A request naming the interface `name` (at most 15 bytes, no NUL).
    pub fn named(name: &[u8]) -> Option<InterfaceRequest> {
        let mut request = InterfaceRequest {
            name: [0; 16],
            data: [0; 24],
        };
        if name.len() >= request.name.len() || name.contains(&0) {
            return None;
        }
        request.name.get_mut(..name.len())?.copy_from_slice(name);
        Some(request)
    }
}

/// The interface requests the agent makes, each reading or writing one [`InterfaceRequest`].
#[derive(Clone, Copy)]
pub enum InterfaceOp {
    /// `SIOCGIFFLAGS`: the flags, a `short` at `data[0..2]`.
    GetFlags = linux_raw_sys::ioctl::SIOCGIFFLAGS as isize,
    /// `SIOCSIFFLAGS`: sets them.
    SetFlags = linux_raw_sys::ioctl::SIOCSIFFLAGS as isize,
    /// `SIOCGIFADDR`: the IPv4 address, a `sockaddr_in` (the address at `data[4..8]`).
    GetAddress = linux_raw_sys::ioctl::SIOCGIFADDR as isize,
    /// `SIOCGIFNETMASK`: its netmask, likewise.
    GetNetmask = linux_raw_sys::ioctl::SIOCGIFNETMASK as isize,
    /// `SIOCGIFMTU`: the MTU, an `int` at `data[0..4]`.
    GetMtu = linux_raw_sys::ioctl::SIOCGIFMTU as isize,
    /// `SIOCGIFHWADDR`: the hardware address, a `sockaddr` (its family at `data[0..2]`, the
    /// address from `data[2]`).
    GetHardwareAddress = linux_raw_sys::ioctl::SIOCGIFHWADDR as isize,
}

/// One [`InterfaceOp`] on its request (one function for all six: no copy per opcode).
struct InterfaceIoctl<'a> {
    op: InterfaceOp,
    request: &'a mut InterfaceRequest,
}

// SAFETY: every `InterfaceOp` reads and writes one `struct ifreq` (40 bytes on 64-bit Linux,
// `InterfaceRequest`'s layout) through its argument and nothing else; the pointer is to our
// own exclusively borrowed request, and no output is read but through it.
unsafe impl rustix::ioctl::Ioctl for InterfaceIoctl<'_> {
    type Output = ();
    const IS_MUTATING: bool = true;

    fn opcode(&self) -> rustix::ioctl::Opcode {
        self.op as rustix::ioctl::Opcode
    }

    fn as_ptr(&mut self) -> *mut c_void {
        ptr::from_mut(self.request).cast()
    }

    unsafe fn output_from_ptr(
        _: rustix::ioctl::IoctlOutput,
        _: *mut c_void,
    ) -> io::Result<Self::Output> {
        Ok(())
    }
}

/// `ioctl(sock, op, &ifreq)` on an `AF_INET` datagram socket.
pub fn interface_ioctl(
    sock: impl AsFd,
    op: InterfaceOp,
    request: &mut InterfaceRequest,
) -> io::Result<()> {
    // SAFETY: see the `Ioctl` impl: the request is what each of these opcodes takes.
    unsafe { rustix::ioctl::ioctl(sock, InterfaceIoctl { op, request }) }
}

/// Bytes as text when they are ASCII (what Linux's names are); empty otherwise. Cheaper than
/// `core::str::from_utf8`, which the agent needs nowhere else.
pub fn ascii_str(bytes: &[u8]) -> &str {
    // A plain loop: `<[u8]>::is_ascii`'s word-at-a-time one is larger.
    if bytes.iter().all(|b| *b < 0x80) {
        // SAFETY: ASCII is UTF-8.
        unsafe { core::str::from_utf8_unchecked(bytes) }
    } else {
        ""
    }
}

/// `struct rand_pool_info` with room for the most bytes a reseed carries.
#[repr(C)]
pub struct RandPoolInfo {
    /// Bits of entropy credited.
    pub entropy_count: i32,
    /// Bytes in `buf`.
    pub buf_size: i32,
    pub buf: [u8; ferry_wire::limits::MAX_RESEED],
}

/// `ioctl(random, RNDADDENTROPY, &info)` — mixes `info.buf_size` bytes into the kernel's pool
/// and credits `info.entropy_count` bits (needs `CAP_SYS_ADMIN`).
pub fn add_entropy(random: impl AsFd, info: &RandPoolInfo) -> io::Result<()> {
    const OPCODE: rustix::ioctl::Opcode =
        linux_raw_sys::ioctl::RNDADDENTROPY as rustix::ioctl::Opcode;
    if !(0..=ferry_wire::limits::MAX_RESEED as i32).contains(&info.buf_size) {
        return Err(io::Errno::INVAL);
    }
    // SAFETY: RNDADDENTROPY reads a `struct rand_pool_info` header and then `buf_size` bytes
    // after it; `buf_size` was just checked to lie within `buf`. (The opcode's size field says
    // 8, the header's: the kernel reads the rest by `buf_size`.)
    unsafe {
        let pointer = ptr::from_ref(info).cast_mut().cast::<c_void>();
        rustix::ioctl::ioctl(
            random,
            rustix::ioctl::IntegerSetter::<OPCODE>::new_pointer(pointer),
        )
    }
}

/// `kill(pid, number)` with any signal number 1..=[`MAX_SIGNAL`] (the service-mode agent asks
/// systemd to power off with `SIGRTMIN+4`, which rustix does not name).
pub fn kill_raw(pid: Pid, number: u8) -> io::Result<()> {
    if !(1..=MAX_SIGNAL).contains(&number) {
        return Err(io::Errno::INVAL);
    }
    // SAFETY: as in `kill_process_group_raw`: a valid signal number, sent once to another
    // process; the agent never makes musl use its reserved real-time signals.
    let signal = unsafe { Signal::from_raw_unchecked(i32::from(number)) };
    rustix::process::kill_process(pid, signal)
}

/// State every agent process shares: atomics in one `MAP_SHARED` anonymous page that the
/// listener maps before it forks, so its spares and connection processes (and theirs) all see
/// the same words. Until then (start-up), and should the mapping fail, a process-local copy
/// stands in.
pub struct SharedState {
    /// The log's token bucket, packed (see `log`).
    pub log_bucket: AtomicU64,
    /// Log lines dropped since the last one written.
    pub log_suppressed: AtomicU32,
}

impl SharedState {
    /// All zero: the value a fresh anonymous mapping holds.
    const fn new() -> Self {
        SharedState {
            log_bucket: AtomicU64::new(0),
            log_suppressed: AtomicU32::new(0),
        }
    }
}

/// The shared page, once [`map_shared_state`] has made it; null before.
static SHARED_STATE: AtomicPtr<SharedState> = AtomicPtr::new(ptr::null_mut());
/// The stand-in before (or without) the shared page.
static LOCAL_STATE: SharedState = SharedState::new();

/// Maps the [`SharedState`] page (once; later calls keep the first). Processes forked after
/// this share it.
pub fn map_shared_state() -> io::Result<()> {
    use rustix::mm::{MapFlags, ProtFlags};
    const LEN: usize = core::mem::size_of::<SharedState>();
    const { assert!(LEN <= 4096 && core::mem::align_of::<SharedState>() <= 4096) };
    if !SHARED_STATE.load(Ordering::Acquire).is_null() {
        return Ok(());
    }
    // SAFETY: a fresh anonymous mapping at an address the kernel picks aliases nothing.
    let page = unsafe {
        rustix::mm::mmap_anonymous(
            ptr::null_mut(),
            LEN,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::SHARED,
        )
    }?;
    SHARED_STATE.store(page.cast(), Ordering::Release);
    Ok(())
}

/// The state all agent processes share (see [`SharedState`]).
pub fn shared_state() -> &'static SharedState {
    let page = SHARED_STATE.load(Ordering::Acquire);
    if page.is_null() {
        return &LOCAL_STATE;
    }
    // SAFETY: a non-null pointer is the page `map_shared_state` mapped: page-aligned, readable
    // and writable, zero-filled by the kernel (all-zero bytes are a valid `SharedState`: it
    // holds only atomics), and never unmapped, so it lives for the rest of the process (and
    // of every process forked from it). Other processes change it only through the atomics.
    unsafe { &*page }
}

/// `kcmp(a, b, KCMP_VM, 0, 0)` — whether two processes share one address space (as a
/// [`spawn`]ed child does with us until its `execve` has switched to the new program's).
/// rustix has no wrapper for it.
#[doc(alias = "kcmp")]
pub fn shares_address_space(a: Pid, b: Pid) -> io::Result<bool> {
    /// `enum kcmp_type`'s `KCMP_VM`.
    const KCMP_VM: usize = 1;
    let nr = linux_raw_sys::general::__NR_kcmp as usize;
    let (a, b) = (
        a.as_raw_nonzero().get() as usize,
        b.as_raw_nonzero().get() as usize,
    );
    let ret: isize;
    // SAFETY: kcmp reads its five integer arguments and no memory of ours; the syscall
    // clobbers rcx and r11 only.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        core::arch::asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a,
            in("rsi") b,
            in("rdx") KCMP_VM,
            in("r10") 0usize,
            in("r8") 0usize,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    // SAFETY: as above; `svc` preserves every register but x0.
    #[cfg(target_arch = "aarch64")]
    unsafe {
        core::arch::asm!(
            "svc 0",
            inlateout("x0") a as isize => ret,
            in("x1") b,
            in("x2") KCMP_VM,
            in("x3") 0usize,
            in("x4") 0usize,
            in("x8") nr,
            options(nostack),
        );
    }
    match ret {
        0 => Ok(true),
        // Ordered one way or the other: different.
        1..=3 => Ok(false),
        _ => Err(io::Errno::from_raw_os_error(ret.unsigned_abs() as i32)),
    }
}

/// `CStr::from_bytes_with_nul` without its error type and its own scan (about 450 B of code): the
/// bytes as a C string when they end with their only NUL.
pub fn cstr_with_nul(bytes: &[u8]) -> Option<&CStr> {
    let (last, body) = bytes.split_last()?;
    if *last != 0 || body.contains(&0) {
        return None;
    }
    // SAFETY: `bytes` ends with a NUL and has no other, just checked.
    Some(unsafe { CStr::from_bytes_with_nul_unchecked(bytes) })
}

/// `clock_gettime(2)` as a plain syscall. rustix's version looks the function up in the vDSO
/// first, which links an ELF symbol-table parser (about 2.5 KB) into the agent; the agent reads
/// its clocks a few times per frame at most, so the syscall's cost does not matter.
pub fn clock_gettime(id: rustix::time::ClockId) -> Timespec {
    let nr = linux_raw_sys::general::__NR_clock_gettime as usize;
    let mut ts = MaybeUninit::<Timespec>::uninit();
    let ret: isize;
    // SAFETY: clock_gettime writes one `struct timespec` (rustix's `Timespec` has its layout)
    // to the pointer, which points at our own `ts`, and touches no other memory; the syscall
    // clobbers rcx and r11 only.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        core::arch::asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") id as usize,
            in("rsi") ts.as_mut_ptr(),
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    // SAFETY: as above; `svc` preserves every register but x0.
    #[cfg(target_arch = "aarch64")]
    unsafe {
        core::arch::asm!(
            "svc 0",
            inlateout("x0") id as usize as isize => ret,
            in("x1") ts.as_mut_ptr(),
            in("x8") nr,
            options(nostack),
        );
    }
    // The clocks the agent reads (monotonic, boot time) always exist, and the pointer is valid:
    // the kernel cannot fail this call.
    debug_assert_eq!(ret, 0);
    let _ = ret;
    // SAFETY: the syscall succeeded (see above), so it filled `ts`.
    unsafe { ts.assume_init() }
}

/// What [`fork`] returned in this process.
pub enum Forked {
    /// This is the new child.
    Child,
    /// This is the parent, of the child with this pid.
    Parent(rustix::process::Pid),
}

/// `fork()` — duplicate this process.
///
/// # Safety
/// The process must be single-threaded, with no signal handler installed: the child starts
/// from a copy of memory in which another thread could have held a lock or been halfway
/// through an update, and a handler could have been interrupted halfway through its own. With
/// neither, and no libc state (no allocator, no stdio buffers), the child's copy is consistent
/// and it may run any of the agent's code. In a process that breaks either rule, the child may
/// do only straight-line, async-signal-safe work (syscalls; no allocation, no locks) before
/// `execve` or `_exit`.
///
/// NOTE: the agent never creates threads and installs no handlers (only `SIG_IGN` and
/// `SIG_DFL`, see [`set_signal_ignored`]); keep it that way or every caller breaks.
pub unsafe fn fork() -> io::Result<Forked> {
    // SAFETY: the caller's contract is rustix's `kernel_fork`'s: a single-threaded process
    // without handlers has no lock or half-done update for the child to trip on.
    match unsafe { runtime::kernel_fork() }? {
        runtime::Fork::Child(_) => Ok(Forked::Child),
        runtime::Fork::ParentOf(pid) => Ok(Forked::Parent(pid)),
    }
}

/// A stack for a [`spawn`]ed child, with an inaccessible guard page below it so an overflow
/// faults instead of writing over our memory.
pub struct ChildStack {
    base: *mut c_void,
}

impl ChildStack {
    /// Room for `exec_child`'s frame (a `PATH_MAX` buffer) many times over.
    const LEN: usize = 64 * 1024;
    const GUARD: usize = 4096;

    /// Maps the stack; untouched pages cost nothing.
    pub fn new() -> io::Result<Self> {
        use rustix::mm::{MapFlags, MprotectFlags, ProtFlags};
        let flags = MapFlags::PRIVATE | MapFlags::NORESERVE | MapFlags::STACK;
        let prot = ProtFlags::READ | ProtFlags::WRITE;
        // SAFETY: a fresh anonymous mapping at an address the kernel picks aliases nothing.
        let base = unsafe { rustix::mm::mmap_anonymous(ptr::null_mut(), Self::LEN, prot, flags) }?;
        let stack = ChildStack { base };
        // SAFETY: the guard page is the lowest page of the mapping just made, which nothing
        // references yet.
        unsafe { rustix::mm::mprotect(base, Self::GUARD, MprotectFlags::empty()) }?;
        Ok(stack)
    }

    /// The initial stack pointer: the mapping's end, page-aligned and so 16-byte aligned.
    fn top(&mut self) -> *mut u8 {
        self.base.cast::<u8>().wrapping_add(Self::LEN)
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: `base` is this object's own mapping of `LEN` bytes; a child using it has left
        // our memory before `spawn` returned, so nothing references it any more.
        let _ = unsafe { rustix::mm::munmap(self.base, Self::LEN) };
    }
}

/// A child started by [`spawn`].
pub struct Spawned {
    pub pid: Pid,
    /// Close-on-exec, made by the same `clone` (no `pidfd_open` race with the pid).
    pub pidfd: OwnedFd,
}

/// While a spawned child still runs on our memory, this is how often the parent checks that
/// it has not died without the kernel clearing its tid (a core dump skips that).
const SPAWN_RECHECK: Timespec = Timespec {
    tv_sec: 0,
    tv_nsec: 100_000_000,
};

/// Starts a process that runs `child` on `stack` while sharing this process's memory
/// (`CLONE_VM`), the way `posix_spawn` does: no page tables are copied and no copy-on-write
/// faults follow, which makes this several times cheaper than `fork` on the exec path.
/// `meanwhile` runs here while the child starts; `spawn` returns once the child has called
/// `execve` successfully or exited, i.e. when it no longer uses our memory (the kernel clears
/// and wakes the `CLONE_CHILD_CLEARTID` word at exactly that point). The child has its own
/// descriptor table and signal dispositions (copies of ours), not our threads.
///
/// # Safety
/// Until it calls `execve` or exits, the child runs in our memory, beside `meanwhile`:
/// - The process must be single-threaded and have no signal handler installed: a handler
///   would run our code in the child, on its stack, against memory we are using, and another
///   thread could change what the child reads.
/// - `child` may do only straight-line, async-signal-safe work: syscalls, byte copies on its
///   own stack, reads of what it borrows, and writes to atomics it borrows to report back. No
///   allocation, no locks, no unwinding, and no access to memory this process may change
///   meanwhile.
/// - `child` should end in `execve` or `exit`; returning exits with 127.
pub unsafe fn spawn<F: Fn() + Sync>(
    stack: &mut ChildStack,
    child: &F,
    meanwhile: impl FnOnce(),
) -> io::Result<Spawned> {
    use linux_raw_sys::general::{CLONE_CHILD_CLEARTID, CLONE_PIDFD, CLONE_VM, SIGCHLD};
    let flags = (CLONE_VM | CLONE_PIDFD | CLONE_CHILD_CLEARTID | SIGCHLD) as usize;
    let in_our_memory = AtomicU32::new(u32::MAX);
    let mut pidfd: i32 = -1;
    // SAFETY: `stack.top()` is the end of a mapping reserved for the child, not used by anyone
    // else while it runs; `child_entry::<F>` gets `child`, which outlives the child's use of it
    // because we do not return (and so do not release `child` or `stack`) before the kernel has
    // cleared `in_our_memory`, at the child's execve or exit. `child` is `Sync`: `meanwhile`
    // may run beside it.
    let ret = unsafe {
        clone_on_stack(
            flags,
            stack.top(),
            &mut pidfd,
            &in_our_memory,
            child_entry::<F>,
            (child as *const F).cast_mut().cast(),
        )
    };
    if ret < 0 {
        return Err(io::Errno::from_raw_os_error(-ret as i32));
    }
    let pid = Pid::from_raw(ret as i32).ok_or(io::Errno::INVAL)?;
    // SAFETY: with CLONE_PIDFD the kernel stored a new descriptor that only we own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    meanwhile();
    loop {
        let word = in_our_memory.load(Ordering::Acquire);
        if word == 0 {
            break;
        }
        // The kernel's wake is a shared (not private) futex wake.
        let waited = rustix::thread::futex::wait(
            &in_our_memory,
            rustix::thread::futex::Flags::empty(),
            word,
            Some(&SPAWN_RECHECK),
        );
        if waited == Err(io::Errno::TIMEDOUT) {
            let mut fds = [rustix::event::PollFd::new(
                &pidfd,
                rustix::event::PollFlags::IN,
            )];
            if let Ok(1..) = rustix::event::poll(&mut fds, Some(&Timespec::default())) {
                break; // it died without clearing the word: it is gone from our memory
            }
        }
    }
    Ok(Spawned { pid, pidfd })
}

/// Where a [`spawn`]ed child starts, on its own stack.
extern "C" fn child_entry<F: Fn()>(arg: *mut c_void) -> ! {
    // SAFETY: `arg` is the `&F` that `spawn` passed, alive until this process leaves our memory.
    let child = unsafe { &*arg.cast_const().cast::<F>() };
    child();
    exit(127)
}

/// `clone(flags, stack_top, pidfd, child_tid, 0)`; the child calls `entry(arg)` on the new
/// stack. Returns the child's pid or `-errno`.
///
/// # Safety
/// `stack_top` must be the 16-byte-aligned top of memory that nothing else uses while the
/// child runs, and `entry(arg)` must be sound to call there (see [`spawn`]).
unsafe fn clone_on_stack(
    flags: usize,
    stack_top: *mut u8,
    pidfd: *mut i32,
    child_tid: *const AtomicU32,
    entry: extern "C" fn(*mut c_void) -> !,
    arg: *mut c_void,
) -> isize {
    let ret: isize;
    // SAFETY: the caller's contract. The syscall clobbers rcx and r11 only; r12 and r13 survive
    // it in the child, which calls `entry(arg)` with rsp at the aligned top of its stack and a
    // zeroed frame pointer, and never comes back here.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        core::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") linux_raw_sys::general::__NR_clone as isize => ret,
            in("rdi") flags,
            in("rsi") stack_top,
            in("rdx") pidfd,
            in("r10") child_tid,
            in("r8") 0usize,
            in("r12") arg,
            in("r13") entry,
            lateout("rcx") _,
            lateout("r11") _,
        );
    }
    // SAFETY: the caller's contract. arm64's `clone` takes `(flags, stack, parent_tid, tls,
    // child_tid)`, and `svc` preserves every register but x0; the child calls `entry(arg)` with
    // sp at the aligned top of its stack and zeroed frame and link registers, and never comes
    // back here.
    #[cfg(target_arch = "aarch64")]
    unsafe {
        core::arch::asm!(
            "svc 0",
            "cbnz x0, 2f",
            "mov x29, xzr",
            "mov x30, xzr",
            "mov x0, x9",
            "blr x10",
            "brk #1",
            "2:",
            inlateout("x0") flags as isize => ret,
            in("x1") stack_top,
            in("x2") pidfd,
            in("x3") 0usize,
            in("x4") child_tid,
            in("x8") linux_raw_sys::general::__NR_clone as usize,
            in("x9") arg,
            in("x10") entry,
        );
    }
    ret
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("ferry-agent's spawn supports x86_64 and aarch64");

/// Room for a [`PtrArray`] of up to `N - 1` entries and its NULL.
pub type PtrStorage<const N: usize> = heapless::Vec<*const u8, N>;

/// A NULL-terminated array of pointers to NUL-terminated strings, as `execve` takes them.
pub struct PtrArray<'a, const N: usize> {
    /// Always ends with the NULL.
    ptrs: &'a mut PtrStorage<N>,
}

// SAFETY: a `PtrArray` is, in effect, `&'a [&'a CStr]`: it only ever reads the strings its
// pointers borrow, so sharing it with a spawned child is as sound as sharing those references.
unsafe impl<const N: usize> Sync for PtrArray<'_, N> {}

impl<'a, const N: usize> PtrArray<'a, N> {
    /// An empty array over `storage` (one slot is always kept for the NULL).
    pub fn new(storage: &'a mut PtrStorage<N>) -> Self {
        const { assert!(N > 0, "no room for the NULL") };
        storage.clear();
        let _ = storage.push(ptr::null());
        PtrArray { ptrs: storage }
    }

    /// Appends a string; `false` when full.
    pub fn push(&mut self, entry: &'a CStr) -> bool {
        if self.ptrs.is_full() {
            return false;
        }
        self.ptrs.pop();
        let _ = self.ptrs.push(entry.as_ptr().cast());
        let _ = self.ptrs.push(ptr::null());
        true
    }

    /// The entries pushed so far.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.ptrs.len() - 1
    }

    /// The entries pushed so far, as strings.
    #[cfg(test)]
    pub fn entries(&self) -> impl Iterator<Item = &'a CStr> + '_ {
        self.ptrs.iter().take_while(|p| !p.is_null()).map(|p| {
            // SAFETY: every non-null pointer was pushed from a `&'a CStr` (see `push`), which
            // is still borrowed for `'a`.
            unsafe { CStr::from_ptr(p.cast()) }
        })
    }

    fn as_ptr(&self) -> *const *const u8 {
        self.ptrs.as_ptr()
    }
}

/// `execve(path, argv, envp)` — replace this process with a program. Returns only on failure.
pub fn execve<const A: usize, const E: usize>(
    path: &CStr,
    argv: &PtrArray<'_, A>,
    envp: &PtrArray<'_, E>,
) -> io::Errno {
    // SAFETY: both arrays are NULL-terminated (an invariant `PtrArray` maintains) and every entry
    // points into a `&CStr` that outlives the call.
    unsafe { runtime::execve(path, argv.as_ptr(), envp.as_ptr()) }
}

/// `exit_group(status)` — end this process at once, without running anything else.
pub fn exit(status: i32) -> ! {
    runtime::exit_group(status)
}

/// Sets `signal`'s disposition to ignored (`SIG_IGN`) or default (`SIG_DFL`).
///
/// NOTE: an ignored SIGCHLD makes the kernel reap children itself; the listener relies on that
/// and every process it forks must restore the default before waiting for a child of its own.
pub fn set_signal_ignored(signal: Signal, ignored: bool) -> io::Result<()> {
    let action = KernelSigaction {
        sa_handler_kernel: if ignored {
            runtime::kernel_sig_ign()
        } else {
            runtime::KERNEL_SIG_DFL
        },
        sa_flags: KernelSigactionFlags::empty(),
        sa_restorer: None,
        sa_mask: KernelSigSet::empty(),
    };
    // SAFETY: SIG_IGN and SIG_DFL install no handler, so no code runs asynchronously and no
    // restorer is needed.
    unsafe { runtime::kernel_sigaction(signal, Some(action)) }.map(|_| ())
}

/// The standard signals (bit `n - 1` for signal `n`) the agent was started with ignored, by a
/// launcher's `nohup` or `trap '' INT`: the agent keeps them ignored for itself, and every
/// command gets them back at their default (ignored dispositions survive `execve`).
static INHERITED_IGNORED: AtomicU32 = AtomicU32::new(0);

/// Records which standard signals the agent inherited as ignored. Call once, at start, before
/// the agent ignores any of its own. (Real-time signals are not looked at: a launcher that
/// ignores those is not worth a syscall per command.)
pub fn note_inherited_ignored_signals() {
    let mut mask = 0u32;
    for number in 1..32 {
        let Some(signal) = Signal::from_named_raw(number) else {
            continue;
        };
        // SAFETY: `None` only reads the current disposition; nothing is installed.
        let old = unsafe { runtime::kernel_sigaction(signal, None) };
        // SIG_IGN is the value 1 in the handler's slot, not a function: compare the values.
        let ignored = runtime::kernel_sig_ign().map(|handler| handler as usize);
        if old.is_ok_and(|old| old.sa_handler_kernel.map(|handler| handler as usize) == ignored) {
            mask |= 1 << (number - 1);
        }
    }
    INHERITED_IGNORED.store(mask, Ordering::Relaxed);
}

/// In a command's child: the default disposition for every signal the agent inherited ignored
/// (usually none: no syscall).
pub fn reset_inherited_ignored_signals() -> io::Result<()> {
    let mask = INHERITED_IGNORED.load(Ordering::Relaxed);
    for number in 1..32 {
        if mask & (1 << (number - 1)) == 0 {
            continue;
        }
        if let Some(signal) = Signal::from_named_raw(number) {
            set_signal_ignored(signal, false)?;
        }
    }
    Ok(())
}

/// The highest signal number Linux has (`_NSIG`); real-time signals run up to it.
pub const MAX_SIGNAL: u8 = 64;

/// Signal `number` (1..=[`MAX_SIGNAL`], real-time signals included) as rustix's `Signal`, to
/// send to another process; `None` for any other number. rustix names only the standard
/// signals safely, and a client may send any.
pub fn signal_to_send(number: u8) -> Option<Signal> {
    if !(1..=MAX_SIGNAL).contains(&number) {
        return None;
    }
    // SAFETY: 1..=64 are valid, non-zero signal numbers on Linux. rustix's other condition is
    // about the libc's reserved real-time signals (musl's 32–34): the `Signal` must not send,
    // block or handle them in a way that upsets the libc's own use. It is only sent to other
    // processes (a command's group or tree, never the agent's); the agent starts no threads and
    // so never makes musl install its handlers for them.
    Some(unsafe { Signal::from_raw_unchecked(i32::from(number)) })
}

/// `kill(-pgid, number)`: sends signal `number` ([`signal_to_send`]) to the process group
/// `pgid`; `EINVAL` for a number that is not a signal.
pub fn kill_process_group_raw(pgid: Pid, number: u8) -> io::Result<()> {
    let signal = signal_to_send(number).ok_or(io::Errno::INVAL)?;
    rustix::process::kill_process_group(pgid, signal)
}

/// Unblocks every signal: a blocked mask survives fork and exec, and a command must not inherit
/// one.
pub fn unblock_all_signals() -> io::Result<()> {
    // SAFETY: changing the mask of a single-threaded process has no memory-safety effect.
    unsafe { runtime::kernel_sigprocmask(runtime::How::SETMASK, Some(&KernelSigSet::empty())) }
        .map(|_| ())
}

/// A value set once, early, by the single-threaded listener before it forks anything, and
/// read for the rest of the process (and in every fork, which inherits a copy): what the
/// policy decided, the commands' cgroup. Never dropped: descriptors in it stay open for good.
pub struct SetOnce<T> {
    /// 0: empty; 1: being written; 2: set.
    state: AtomicU8,
    value: UnsafeCell<MaybeUninit<T>>,
}

// SAFETY: `value` is written exactly once, by whoever wins the 0 → 1 exchange, before `state`
// becomes 2 (Release); it is read only through `&T` after `state` was seen as 2 (Acquire), and
// never written again. So every thread sees either no value or the whole, immutable value.
unsafe impl<T: Sync + Send> Sync for SetOnce<T> {}

impl<T> SetOnce<T> {
    pub const fn new() -> Self {
        SetOnce {
            state: AtomicU8::new(0),
            value: UnsafeCell::new(MaybeUninit::uninit()),
        }
    }

    /// Sets the value; gives it back when one was set (or is being set) already.
    pub fn set(&self, value: T) -> Result<(), T> {
        if self
            .state
            .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return Err(value);
        }
        // SAFETY: winning the exchange makes this the one writer, and no reader looks at
        // `value` before `state` is 2.
        unsafe { (*self.value.get()).write(value) };
        self.state.store(2, Ordering::Release);
        Ok(())
    }

    /// The value, once set.
    pub fn get(&self) -> Option<&T> {
        if self.state.load(Ordering::Acquire) != 2 {
            return None;
        }
        // SAFETY: `state` 2 means `value` was fully written, and it is never written again.
        Some(unsafe { (*self.value.get()).assume_init_ref() })
    }
}

static ARGV: AtomicPtr<*const u8> = AtomicPtr::new(core::ptr::null_mut());
static ARGC: AtomicUsize = AtomicUsize::new(0);
static ENVP: AtomicPtr<*const u8> = AtomicPtr::new(core::ptr::null_mut());

/// Records the kernel's argv and envp, as `main` received them.
///
/// # Safety
/// `argv` must point to `argc` valid C strings and `envp` to a NULL-terminated array of C
/// strings, all living (unmodified) for the rest of the process, as the C runtime guarantees
/// for `main`'s arguments.
pub unsafe fn set_process_args(argc: usize, argv: *const *const u8, envp: *const *const u8) {
    ARGC.store(argc, Ordering::Relaxed);
    ARGV.store(argv.cast_mut(), Ordering::Relaxed);
    ENVP.store(envp.cast_mut(), Ordering::Relaxed);
}

/// The `i`th command-line argument.
pub fn arg(i: usize) -> Option<&'static CStr> {
    let argv = ARGV.load(Ordering::Relaxed);
    if argv.is_null() || i >= ARGC.load(Ordering::Relaxed) {
        return None;
    }
    // SAFETY: `set_process_args`' contract: `argv[..argc]` are valid C strings for the process's
    // life, and `i < argc`.
    unsafe {
        let ptr = *argv.add(i);
        (!ptr.is_null()).then(|| CStr::from_ptr(ptr.cast()))
    }
}

/// The command-line arguments after the program's name.
pub fn args() -> impl Iterator<Item = &'static CStr> {
    (1..ARGC.load(Ordering::Relaxed)).map_while(arg)
}

/// The environment the agent was started with, entry by entry.
pub fn environment() -> Environment {
    Environment {
        next: ENVP.load(Ordering::Relaxed).cast_const(),
    }
}

/// An iterator over the agent's own environment (see [`environment`]).
#[derive(Clone)]
pub struct Environment {
    /// The next entry's slot in `envp`; null once the terminator was reached.
    next: *const *const u8,
}

impl Iterator for Environment {
    type Item = &'static CStr;

    fn next(&mut self) -> Option<&'static CStr> {
        if self.next.is_null() {
            return None;
        }
        // SAFETY: `set_process_args`' contract: `envp` is NULL-terminated and every entry is a
        // valid C string for the process's life. `next` points into the array: it starts at
        // its first slot and stops at the terminator, never past it.
        unsafe {
            let entry = *self.next;
            if entry.is_null() {
                self.next = ptr::null();
                return None;
            }
            self.next = self.next.add(1);
            Some(CStr::from_ptr(entry.cast()))
        }
    }
}

/// Where a request that came in pieces (`ExecPart`) is put back together, and the index of a
/// large environment (see `spawn`): 3.25 MiB that only such requests touch.
pub struct AssemblyBuffers {
    /// The packed argv.
    pub argv: [u8; MAX_ARGV_BYTES],
    /// The packed environment overrides.
    pub env: [u8; MAX_ENV_BYTES],
    /// An open-addressing table over the environment's keys, twice their most.
    pub env_index: [u32; 2 * MAX_ENV_VARS],
}

/// [`AssemblyBuffers`], mapped on first use (anonymous, `MAP_NORESERVE`: only the pages
/// written cost memory) and unmapped when dropped; no connection that does not need them pays
/// for them, and none keeps them.
pub struct Assembly {
    /// Null until mapped.
    mapped: *mut AssemblyBuffers,
}

impl Assembly {
    pub const fn new() -> Self {
        Assembly {
            mapped: ptr::null_mut(),
        }
    }

    /// The buffers, mapped now if they are not yet.
    pub fn buffers(&mut self) -> io::Result<&mut AssemblyBuffers> {
        use rustix::mm::{MapFlags, ProtFlags};
        if self.mapped.is_null() {
            let len = core::mem::size_of::<AssemblyBuffers>();
            let prot = ProtFlags::READ | ProtFlags::WRITE;
            let flags = MapFlags::PRIVATE | MapFlags::NORESERVE;
            // SAFETY: a fresh anonymous mapping at an address the kernel picks aliases nothing.
            let base = unsafe { rustix::mm::mmap_anonymous(ptr::null_mut(), len, prot, flags) }?;
            self.mapped = base.cast();
        }
        // SAFETY: `mapped` is this object's own mapping of `size_of::<AssemblyBuffers>()`
        // bytes: page-aligned (beyond `u32`'s alignment), readable and writable, zero-filled by
        // the kernel (all-zero bytes are a valid `AssemblyBuffers`: arrays of integers), and
        // unmapped only by `drop`. The `&mut self` borrow makes the reference unique.
        Ok(unsafe { &mut *self.mapped })
    }
}

impl Drop for Assembly {
    fn drop(&mut self) {
        if !self.mapped.is_null() {
            let len = core::mem::size_of::<AssemblyBuffers>();
            // SAFETY: `mapped` is this object's own mapping of `len` bytes, and no reference
            // into it outlives the `&mut self` borrows that handed them out.
            let _ = unsafe { rustix::mm::munmap(self.mapped.cast(), len) };
        }
    }
}

/// Inherited environment entries beyond this many are not passed on.
pub const MAX_INHERITED_ENV: usize = 1024;

/// Room for argv's pointers and their NULL.
pub const ARGV_SLOTS: usize = MAX_ARGS + 1;
/// Room for envp's pointers (the inherited environment, the user's `HOME`, `USER`, `LOGNAME`
/// and `SHELL`, the request's, the default `PATH`) and their NULL.
pub const ENVP_SLOTS: usize = MAX_INHERITED_ENV + 4 + MAX_ENV_VARS + 1 + 1;

/// One data frame plus room for a control frame queued behind its unsent rest (an error frame
/// is at most 269 bytes; a hello, 60).
pub const OUT_BUFFER: usize = DATA_HEADROOM + MAX_DATA + 512;

/// The memory one connection needs, in `.bss`: untouched pages cost nothing, so a connection
/// that runs `/bin/true` faults in only what it uses.
pub struct ConnBuffers {
    /// Frames from the client, cut in place.
    pub recv: [u8; MAX_FRAME],
    /// The frames being sent to the client; data is read into it at `DATA_HEADROOM`.
    pub out: [u8; OUT_BUFFER],
    /// Stdin bytes received but not yet written to the command: bounded by the credit window.
    pub stdin: [u8; STDIN_WINDOW],
    /// The kept tails of stdout and stderr past their caps (touched only past a head).
    pub stdout_tail: crate::conn::Ring,
    pub stderr_tail: crate::conn::Ring,
    /// argv pointers for `execve`.
    pub argv: PtrStorage<ARGV_SLOTS>,
    /// envp pointers for `execve`.
    pub envp: PtrStorage<ENVP_SLOTS>,
    /// The working directory, NUL-terminated.
    pub cwd: [u8; MAX_PATH + 1],
}

static mut CONN_BUFFERS: ConnBuffers = ConnBuffers {
    recv: [0; MAX_FRAME],
    out: [0; OUT_BUFFER],
    stdin: [0; STDIN_WINDOW],
    stdout_tail: [0; crate::conn::MAX_TAIL],
    stderr_tail: [0; crate::conn::MAX_TAIL],
    argv: PtrStorage::new(),
    envp: PtrStorage::new(),
    cwd: [0; MAX_PATH + 1],
};
static CONN_BUFFERS_TAKEN: AtomicBool = AtomicBool::new(false);

/// The connection buffers, handed out once per process (`None` afterwards).
pub fn take_conn_buffers() -> Option<&'static mut ConnBuffers> {
    if CONN_BUFFERS_TAKEN.swap(true, Ordering::Relaxed) {
        return None;
    }
    // SAFETY: the flag above lets exactly one `&mut` exist in this process, and the process is
    // single-threaded. A forked child gets its own copy of both the memory and the flag.
    Some(unsafe { &mut *core::ptr::addr_of_mut!(CONN_BUFFERS) })
}

/// A value in the binary's zero-filled data (`.bss`, so its initial value must be all zeros or
/// uninitialized, like an empty `heapless::Vec`): its pages cost memory only once touched.
/// Handed out once per process as `&'static mut`. For large bounded tables that a stack frame
/// would keep resident whole (a frame's pages are probed on entry, used or not).
pub struct TakeOnce<T> {
    taken: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the value is reachable only through `take`, which hands out one `&mut` per process;
// `T: Send` because that one `&mut` may be taken on any thread.
unsafe impl<T: Send> Sync for TakeOnce<T> {}

impl<T> TakeOnce<T> {
    pub const fn new(value: T) -> Self {
        TakeOnce {
            taken: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// The value, the first time; `None` afterwards.
    // A `&mut` out of `&self` is the point: the flag makes it the only one.
    #[allow(clippy::mut_from_ref)]
    pub fn take(&'static self) -> Option<&'static mut T> {
        if self.taken.swap(true, Ordering::Relaxed) {
            return None;
        }
        // SAFETY: the flag above lets exactly one `&mut` exist in this process. A forked child
        // gets its own copy of both the memory and the flag.
        Some(unsafe { &mut *self.value.get() })
    }
}

const PAGE: usize = 4096;

/// Gives back the stack pages start-up left resident below the caller's frame (policy, passwd
/// and cgroup parsing used tens of KiB of stack once); the listener's loop never goes that deep.
#[inline(never)]
pub fn trim_resident_memory() {
    let marker = 0u8;
    let here = ptr::addr_of!(marker) as usize & !(PAGE - 1);
    // One page of margin below this frame; everything further down is dead stack.
    let top = here.saturating_sub(PAGE);
    let bottom = top.saturating_sub(1 << 20);
    // SAFETY: [bottom, top) lies below every live frame of this single-threaded process (the
    // stack grows down from `here`, and nothing runs on it below this call but the syscall,
    // which uses the kernel's stack); no signal handler is installed that could run there. Its
    // contents are dead, so zero-fill-on-next-touch is what the next deeper call would find
    // anyway. Parts of the range outside the stack mapping are skipped by the kernel (ENOMEM).
    unsafe {
        let _ = rustix::mm::madvise(
            bottom as *mut c_void,
            top - bottom,
            rustix::mm::Advice::LinuxDontNeed,
        );
    }
    core::hint::black_box(&marker);
}

/// In a spare, after [`trim_resident_memory`]: faults in the stack a connection will use (its
/// deepest path is the handshake, spawning and the pump), so those first writes cost no page
/// fault on the path a client waits on.
#[inline(never)]
pub fn prefault_stack() {
    const DEPTH: usize = 48 * 1024;
    let mut stack = [0u8; DEPTH];
    let mut at = 0;
    while at < DEPTH {
        if let Some(byte) = stack.get_mut(at) {
            // SAFETY: a write through a valid `&mut u8`; volatile, so it is not optimised away.
            unsafe { ptr::write_volatile(byte, 0) };
        }
        at += PAGE;
    }
    core::hint::black_box(&stack);
}

/// In a spare: maps the agent's code now, while it waits, rather than a page fault at a time
/// on the path a client waits on (a forked child starts with none of its parent's file-backed
/// pages mapped).
///
/// NOTE: only the executable segments, found through the agent's own program headers: the
/// image is not one mapping. A linker may leave unmapped gaps between segments (rust-lld aligns
/// each to arm64's 64 KiB maximum page size), and touching one is a segfault: a spare that
/// read from the image's start to `etext` died before every connection on arm64.
pub fn prefault_code() {
    extern "C" {
        /// This executable's ELF header (defined by GNU ld and lld whenever the first loadable
        /// segment maps it, which both do for the agent).
        static __ehdr_start: u8;
    }
    let ehdr = ptr::addr_of!(__ehdr_start);
    let mut header = [0u8; ELF64_EHDR_LEN];
    // SAFETY: `__ehdr_start` is the start of this executable's ELF header, 64 bytes that its
    // first loadable segment maps read-only for the life of the process; a copy is taken.
    unsafe { ptr::copy_nonoverlapping(ehdr, header.as_mut_ptr(), ELF64_EHDR_LEN) };
    let Some(table) = ProgramHeaders::parse(&header) else {
        return;
    };
    let mut phdrs = [0u8; ELF64_PHDR_LEN * MAX_PHDRS];
    let Some(phdrs) = phdrs.get_mut(..table.len()) else {
        return;
    };
    // SAFETY: the program header table lies at `e_phoff` in the same first segment (the
    // kernel's loader hands the same address to the process as `AT_PHDR`); `parse` checked its
    // length fits `MAX_PHDRS` entries. A copy is taken.
    unsafe {
        ptr::copy_nonoverlapping(
            ehdr.wrapping_add(table.offset),
            phdrs.as_mut_ptr(),
            phdrs.len(),
        )
    };
    for (start, len) in executable_segments(phdrs, ehdr as usize) {
        let mut at = start & !(PAGE - 1);
        let end = start.saturating_add(len);
        while at < end {
            // SAFETY: `at` is inside one of our executable segments, mapped readable for the
            // life of the process; a volatile read only faults the page in.
            unsafe { ptr::read_volatile(at as *const u8) };
            at = at.saturating_add(PAGE);
        }
    }
}

const ELF64_EHDR_LEN: usize = 64;
const ELF64_PHDR_LEN: usize = 56;
/// More program headers than a static executable has (the agent has 5 or 6).
const MAX_PHDRS: usize = 16;

/// Where the program header table is, from an ELF64 header.
struct ProgramHeaders {
    offset: usize,
    count: usize,
}

impl ProgramHeaders {
    fn parse(header: &[u8; ELF64_EHDR_LEN]) -> Option<ProgramHeaders> {
        if header.get(..5)? != b"\x7fELF\x02" {
            return None;
        }
        let offset = usize::try_from(u64::from_ne_bytes(*header.get(32..)?.first_chunk()?)).ok()?;
        let entry = u16::from_ne_bytes(*header.get(54..)?.first_chunk()?);
        let count = usize::from(u16::from_ne_bytes(*header.get(56..)?.first_chunk()?));
        (usize::from(entry) == ELF64_PHDR_LEN && count <= MAX_PHDRS)
            .then_some(ProgramHeaders { offset, count })
    }

    fn len(&self) -> usize {
        self.count * ELF64_PHDR_LEN
    }
}

/// The executable `PT_LOAD` segments of the image whose ELF header is mapped at `base`, as
/// `(address, length)`: their link-time addresses moved by the load bias (zero for the static,
/// non-PIE agent; `base` minus the address of the segment at file offset 0 in general).
fn executable_segments(phdrs: &[u8], base: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
    const PT_LOAD: u32 = 1;
    const PF_X: u32 = 1;
    fn word(phdr: &[u8], at: usize) -> u32 {
        phdr.get(at..)
            .and_then(|bytes| bytes.first_chunk())
            .map_or(0, |bytes| u32::from_ne_bytes(*bytes))
    }
    fn dword(phdr: &[u8], at: usize) -> usize {
        phdr.get(at..)
            .and_then(|bytes| bytes.first_chunk())
            .map_or(0, |bytes| u64::from_ne_bytes(*bytes) as usize)
    }
    // p_type at 0, p_flags at 4, p_offset at 8, p_vaddr at 16, p_memsz at 40.
    let loads = phdrs
        .chunks_exact(ELF64_PHDR_LEN)
        .filter(|phdr| word(phdr, 0) == PT_LOAD);
    let bias = loads
        .clone()
        .find(|phdr| dword(phdr, 8) == 0)
        .map(|phdr| base.wrapping_sub(dword(phdr, 16)));
    loads
        .filter(|phdr| word(phdr, 4) & PF_X != 0)
        .filter_map(move |phdr| Some((dword(phdr, 16).wrapping_add(bias?), dword(phdr, 40))))
}

/// Marks every descriptor above 2 close-on-exec. The agent's own are close-on-exec from the
/// start, but whoever started it may have leaked some into it (a shell's redirection, a
/// supervisor's pipe), and a command must inherit exactly 0, 1 and 2. They stay open for the
/// agent, which never uses them: only `execve` drops them. Listed from `/proc/self/fd`; without
/// procfs nothing is done (as PID 1 the kernel hands over 0, 1 and 2 only).
pub fn seal_inherited_fds() {
    use rustix::fd::AsRawFd;
    use rustix::fs::{Mode, OFlags, RawDir};

    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let Ok(dir) = rustix::fs::open(c"/proc/self/fd", flags, Mode::empty()) else {
        return;
    };
    let listing = dir.as_raw_fd();
    let mut buf = [core::mem::MaybeUninit::<u8>::uninit(); 512];
    let mut entries = RawDir::new(&dir, &mut buf);
    while let Some(Ok(entry)) = entries.next() {
        // "." and ".." are not numbers.
        let Some(fd) = crate::config::parse_u32(entry.file_name().to_bytes()) else {
            continue;
        };
        let Ok(fd) = i32::try_from(fd) else { continue };
        if fd <= 2 || fd == listing {
            continue;
        }
        // SAFETY: `fd` was just listed as open, and nothing closes it before this call (the
        // agent is single-threaded and owns none of these); it is borrowed for this call only.
        let fd = unsafe { rustix::fd::BorrowedFd::borrow_raw(fd) };
        let _ = io::fcntl_setfd(fd, io::FdFlags::CLOEXEC);
    }
}

/// Descriptor 1.
pub fn stdout() -> rustix::fd::BorrowedFd<'static> {
    // SAFETY: `init::ensure_std_fds` runs first thing and keeps 0, 1 and 2 open for good; the
    // agent never closes them.
    unsafe { rustix::stdio::stdout() }
}

/// Descriptor 2.
pub fn stderr() -> rustix::fd::BorrowedFd<'static> {
    // SAFETY: as for `stdout`.
    unsafe { rustix::stdio::stderr() }
}

// The C runtime (crt1.o and libc.a on musl) provides `_start`, `memcpy` & co. The agent calls
// nothing else of libc: every syscall goes through rustix's raw backend.
#[cfg(all(not(test), target_env = "musl"))]
#[link(name = "c", kind = "static")]
extern "C" {}
// A host (glibc) build links libc dynamically; it exists for `cargo build`, never ships.
#[cfg(all(not(test), not(target_env = "musl")))]
#[link(name = "c")]
extern "C" {}

/// Unoptimised builds of `core` reference the unwinder's personality routine even with
/// `panic = "abort"`; nothing ever unwinds, so it is never called.
#[cfg(not(test))]
#[no_mangle]
extern "C" fn rust_eh_personality() {}

/// The C runtime's entry point: musl's crt calls this with the kernel's argv and envp.
#[cfg(not(test))]
#[no_mangle]
extern "C" fn main(argc: i32, argv: *const *const u8, envp: *const *const u8) -> i32 {
    // SAFETY: these are the C runtime's `main` arguments, valid and unmodified for the life of
    // the process; nothing in the agent ever calls setenv or rewrites argv.
    unsafe { set_process_args(argc.max(0) as usize, argv, envp) };
    crate::run()
}

/// Zeroed bytes mapped on first use (anonymous, `MAP_NORESERVE`: only the pages written cost
/// memory) and unmapped when dropped, for bounds too large for a stack (`tar`'s extension
/// headers and deferred directory times). Like [`Assembly`], but plain bytes of any length.
pub struct ScratchPages {
    /// Null until mapped.
    base: *mut u8,
    len: usize,
}

impl ScratchPages {
    /// `len` bytes, not mapped yet.
    pub const fn new(len: usize) -> Self {
        ScratchPages {
            base: ptr::null_mut(),
            len,
        }
    }

    /// The bytes, mapped now if they are not yet (all zero when fresh).
    pub fn bytes(&mut self) -> io::Result<&mut [u8]> {
        use rustix::mm::{MapFlags, ProtFlags};
        if self.base.is_null() {
            let prot = ProtFlags::READ | ProtFlags::WRITE;
            let flags = MapFlags::PRIVATE | MapFlags::NORESERVE;
            // SAFETY: a fresh anonymous mapping at an address the kernel picks aliases nothing.
            let base =
                unsafe { rustix::mm::mmap_anonymous(ptr::null_mut(), self.len, prot, flags) }?;
            self.base = base.cast();
        }
        // SAFETY: `base` is this object's own mapping of `len` bytes, readable and writable,
        // initialized (zero-filled by the kernel, then only written through such slices), and
        // unmapped only by `drop`. The `&mut self` borrow makes the slice unique.
        Ok(unsafe { core::slice::from_raw_parts_mut(self.base, self.len) })
    }
}

// SAFETY: a `ScratchPages` owns its mapping alone; moving it moves that ownership.
unsafe impl Send for ScratchPages {}

impl Drop for ScratchPages {
    fn drop(&mut self) {
        if !self.base.is_null() {
            // SAFETY: `base` is this object's own mapping of `len` bytes, and no slice of it
            // outlives the `&mut self` borrows that handed them out.
            let _ = unsafe { rustix::mm::munmap(self.base.cast(), self.len) };
        }
    }
}

#[cfg(test)]
mod tests {
    /// One program header: type, flags, offset, address, size.
    fn phdr(kind: u32, flags: u32, offset: u64, vaddr: u64, memsz: u64) -> [u8; 56] {
        let mut bytes = [0u8; 56];
        bytes[0..4].copy_from_slice(&kind.to_ne_bytes());
        bytes[4..8].copy_from_slice(&flags.to_ne_bytes());
        bytes[8..16].copy_from_slice(&offset.to_ne_bytes());
        bytes[16..24].copy_from_slice(&vaddr.to_ne_bytes());
        bytes[40..48].copy_from_slice(&memsz.to_ne_bytes());
        bytes
    }

    #[test]
    fn only_executable_segments_are_prefaulted_gaps_skipped() {
        // rust-lld's arm64 layout: read-only data, then code 64 KiB further on, then data.
        let table = [
            phdr(6, 4, 0x40, 0x20_0040, 0x118), // PT_PHDR
            phdr(1, 4, 0, 0x20_0000, 0x2d82),
            phdr(1, 5, 0x2d90, 0x21_2d90, 0x2_1ea8),
            phdr(1, 6, 0x2_4c38, 0x24_4c38, 0x1b_8b89),
            phdr(0x6474_e551, 6, 0, 0, 0), // PT_GNU_STACK
        ]
        .concat();
        let static_exe: Vec<_> = super::executable_segments(&table, 0x20_0000).collect();
        assert_eq!(static_exe, [(0x21_2d90, 0x2_1ea8)]);
        // Loaded elsewhere (a PIE): moved by the same bias.
        let moved: Vec<_> = super::executable_segments(&table, 0x5555_0020_0000).collect();
        assert_eq!(moved, [(0x5555_0021_2d90, 0x2_1ea8)]);
        // No segment maps the header: nothing is known, nothing is touched.
        assert_eq!(super::executable_segments(&table[56 * 2..], 0).count(), 0);
        assert_eq!(super::executable_segments(&[], 0).count(), 0);
    }

    #[test]
    fn program_headers_are_found_in_the_elf_header() {
        let mut header = [0u8; super::ELF64_EHDR_LEN];
        header[..5].copy_from_slice(b"\x7fELF\x02");
        header[32..40].copy_from_slice(&64u64.to_ne_bytes());
        header[54..56].copy_from_slice(&56u16.to_ne_bytes());
        header[56..58].copy_from_slice(&5u16.to_ne_bytes());
        let table = super::ProgramHeaders::parse(&header).expect("valid");
        assert_eq!((table.offset, table.len()), (64, 5 * 56));
        header[56..58].copy_from_slice(&17u16.to_ne_bytes());
        assert!(super::ProgramHeaders::parse(&header).is_none(), "too many");
        header[4] = 1; // ELFCLASS32
        assert!(super::ProgramHeaders::parse(&header).is_none());
    }

    #[test]
    fn prefaulting_our_own_code_does_not_fault() {
        super::prefault_code();
    }

    use super::*;
    use rustix::process::{WaitId, WaitIdOptions};

    #[test]
    fn c_strings_end_with_their_only_nul() {
        for bytes in [&b"a\0"[..], b"\0", b"/bin/sh\0"] {
            assert_eq!(cstr_with_nul(bytes), CStr::from_bytes_with_nul(bytes).ok());
        }
        for bytes in [&b""[..], b"a", b"a\0b\0", b"\0\0", b"ab"] {
            assert_eq!(cstr_with_nul(bytes), None, "{bytes:?}");
        }
    }

    fn wait_exit_code(spawned: &Spawned) -> Option<i32> {
        let status =
            rustix::process::waitid(WaitId::PidFd(spawned.pidfd.as_fd()), WaitIdOptions::EXITED)
                .unwrap()
                .unwrap();
        status.exit_status()
    }

    #[test]
    fn ptr_arrays_stay_null_terminated() {
        let mut storage = PtrStorage::<3>::new();
        let mut array = PtrArray::new(&mut storage);
        assert!(array.push(c"a"));
        assert!(array.push(c"b"));
        assert!(!array.push(c"c"), "the last slot is the NULL's");
        assert_eq!(array.len(), 2);
        assert_eq!(storage.last(), Some(&ptr::null()));
        let array = PtrArray::new(&mut storage);
        assert_eq!(array.len(), 0);
    }

    #[test]
    fn spawn_returns_after_the_child_leaves_our_memory() {
        let mut stack = ChildStack::new().unwrap();
        let seen = AtomicU32::new(0);
        let mut meanwhile_ran = false;
        let child = || {
            // Give `meanwhile` time to run first: `spawn` must still wait for this write.
            crate::clock::sleep_ms(50);
            seen.store(7, Ordering::Release);
            exit(3)
        };
        // SAFETY: the child sleeps, stores to an atomic it borrows and exits. The test harness
        // has other threads and handlers, but none touches what the child uses.
        let spawned = unsafe { spawn(&mut stack, &child, || meanwhile_ran = true) }.unwrap();
        assert!(meanwhile_ran);
        assert_eq!(seen.load(Ordering::Acquire), 7);
        assert_eq!(wait_exit_code(&spawned), Some(3));
    }

    #[test]
    fn spawn_returns_at_execve_not_at_exit() {
        let mut stack = ChildStack::new().unwrap();
        let mut argv_storage = PtrStorage::<4>::new();
        let mut envp_storage = PtrStorage::<1>::new();
        let mut argv = PtrArray::new(&mut argv_storage);
        for arg in [c"/bin/sh", c"-c", c"sleep 5"] {
            assert!(argv.push(arg));
        }
        let envp = PtrArray::new(&mut envp_storage);
        let child = || {
            execve(c"/bin/sh", &argv, &envp);
            exit(127)
        };
        let started = std::time::Instant::now();
        // SAFETY: the child only calls execve and exit, reading the arrays it borrows.
        let spawned = unsafe { spawn(&mut stack, &child, || {}) }.unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(4));
        rustix::process::kill_process(spawned.pid, Signal::KILL).unwrap();
        assert_eq!(wait_exit_code(&spawned), None);
    }

    #[test]
    fn spawn_returns_when_the_child_dies_of_a_core_dumping_signal() {
        // A core-dumping death may skip clearing the tid word: the pidfd recheck catches it.
        let mut stack = ChildStack::new().unwrap();
        let child = || {
            // The test harness (std) handles SIGSEGV; the agent has no handlers.
            let _ = set_signal_ignored(Signal::SEGV, false);
            let _ = rustix::process::kill_process(rustix::process::getpid(), Signal::SEGV);
        };
        let started = std::time::Instant::now();
        // SAFETY: the child only makes syscalls; the harness's SIGSEGV handler is reset first.
        let spawned = unsafe { spawn(&mut stack, &child, || {}) }.unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        assert_eq!(wait_exit_code(&spawned), None);
    }
}
