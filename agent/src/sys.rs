//! The agent's one unsafe corner: the vsock address type, fork/exec and signal dispositions
//! (rustix's semver-exempt `runtime` module, pinned in the workspace manifest), the kernel's
//! argv/envp, and the per-connection buffers. Everything else in the agent is safe code.
#![allow(unsafe_code)]

use core::ffi::CStr;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};

use ferry_wire::limits::{MAX_ARGS, MAX_DATA, MAX_ENV_VARS, MAX_FRAME, MAX_PATH, STDIN_WINDOW};
use ferry_wire::DATA_HEADROOM;
use rustix::fd::AsFd;
use rustix::io;
use rustix::net::addr::{SocketAddrArg, SocketAddrLen, SocketAddrOpaque};
use rustix::process::Pid;
use rustix::runtime::{self, KernelSigSet, KernelSigaction, KernelSigactionFlags, Signal};

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

/// `ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID)` on `/dev/vsock`: the guest's CID, once the vsock
/// transport has one.
pub fn vsock_local_cid(dev_vsock: impl AsFd) -> io::Result<u32> {
    const OPCODE: rustix::ioctl::Opcode =
        linux_raw_sys::ioctl::IOCTL_VM_SOCKETS_GET_LOCAL_CID as rustix::ioctl::Opcode;
    // SAFETY: IOCTL_VM_SOCKETS_GET_LOCAL_CID writes one `unsigned int` through its argument,
    // which is what `Getter<_, u32>` provides.
    unsafe { rustix::ioctl::ioctl(dev_vsock, rustix::ioctl::Getter::<OPCODE, u32>::new()) }
}

/// What [`fork`] returned in this process.
pub enum Forked {
    /// This is the new child.
    Child,
    /// This is the parent of the given child.
    Parent(Pid),
}

/// `fork()` — duplicate this process.
///
/// Sound because the agent is single-threaded and keeps no libc state (no allocator, no stdio
/// buffers): the child's copy of memory is consistent. Code in the child before `execve` stays
/// async-signal-safe anyway (see `spawn.rs`).
pub fn fork() -> io::Result<Forked> {
    // SAFETY: see above; rustix's `kernel_fork` requires no other threads that could hold locks,
    // and the agent never creates threads.
    match unsafe { runtime::kernel_fork() }? {
        runtime::Fork::Child(_) => Ok(Forked::Child),
        runtime::Fork::ParentOf(pid) => Ok(Forked::Parent(pid)),
    }
}

/// A NULL-terminated array of pointers to NUL-terminated strings, as `execve` takes them.
pub struct PtrArray<'a, const N: usize> {
    ptrs: &'a mut [*const u8; N],
    len: usize,
}

impl<'a, const N: usize> PtrArray<'a, N> {
    /// An empty array over `storage` (one slot is always kept for the NULL).
    pub fn new(storage: &'a mut [*const u8; N]) -> Self {
        storage[0] = core::ptr::null();
        PtrArray {
            ptrs: storage,
            len: 0,
        }
    }

    /// Appends a string; `false` when full.
    pub fn push(&mut self, entry: &'a CStr) -> bool {
        if self.len + 1 >= N {
            return false;
        }
        self.ptrs[self.len] = entry.as_ptr().cast();
        self.len += 1;
        self.ptrs[self.len] = core::ptr::null();
        true
    }

    /// The entries pushed so far.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
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

/// Unblocks every signal: a blocked mask survives fork and exec, and a command must not inherit
/// one.
pub fn unblock_all_signals() -> io::Result<()> {
    // SAFETY: changing the mask of a single-threaded process has no memory-safety effect.
    unsafe { runtime::kernel_sigprocmask(runtime::How::SETMASK, Some(&KernelSigSet::empty())) }
        .map(|_| ())
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

/// The `i`th entry of the environment the agent was started with.
pub fn env_entry(i: usize) -> Option<&'static CStr> {
    let envp = ENVP.load(Ordering::Relaxed);
    if envp.is_null() {
        return None;
    }
    let mut j = 0;
    // SAFETY: `set_process_args`' contract: `envp` is NULL-terminated, so walking up to `i` stops
    // at the terminator at the latest, and each entry is a valid C string for the process's life.
    unsafe {
        while j < i {
            if (*envp.add(j)).is_null() {
                return None;
            }
            j += 1;
        }
        let ptr = *envp.add(i);
        (!ptr.is_null()).then(|| CStr::from_ptr(ptr.cast()))
    }
}

/// Inherited environment entries beyond this many are not passed on.
pub const MAX_INHERITED_ENV: usize = 1024;

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
    /// argv pointers for `execve`.
    pub argv: [*const u8; MAX_ARGS + 1],
    /// envp pointers for `execve`.
    pub envp: [*const u8; MAX_INHERITED_ENV + MAX_ENV_VARS + 1],
    /// The working directory, NUL-terminated.
    pub cwd: [u8; MAX_PATH + 1],
}

static mut CONN_BUFFERS: ConnBuffers = ConnBuffers {
    recv: [0; MAX_FRAME],
    out: [0; OUT_BUFFER],
    stdin: [0; STDIN_WINDOW],
    argv: [core::ptr::null(); MAX_ARGS + 1],
    envp: [core::ptr::null(); MAX_INHERITED_ENV + MAX_ENV_VARS + 1],
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
