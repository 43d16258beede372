//! Powering the guest off or rebooting it, once a connection process acknowledged an authorized
//! shutdown (see `successor::report::POWER_OFF`). As PID 1 the agent does what an init does:
//! every process gets `SIGTERM`, then `SIGKILL` after the grace, file systems are synced and
//! unmounted (or remounted read-only), and the kernel is told to power off or restart. In
//! service mode it asks the system's own init instead.

use core::ffi::CStr;

use rustix::io::Errno;
use rustix::mount::{MountFlags, UnmountFlags};
use rustix::process::{Pid, Signal, WaitOptions};

use crate::policy::Policy;
use crate::{clock, cstr, log, sys};

/// What a connection process asked the listener for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PowerRequest {
    pub reboot: bool,
    /// Milliseconds between `SIGTERM` and `SIGKILL`.
    pub grace_ms: u32,
}

/// How long PID 1 waits for processes to go after `SIGKILL` (one in uninterruptible sleep
/// may never go; the file systems are then remounted read-only under it).
const KILL_WAIT_MS: u64 = 2_000;

/// PID 1's shutdown sequence; never returns. The listening socket is already closed.
pub fn halt(request: PowerRequest) -> ! {
    log::Line::new()
        .push(if request.reboot {
            b"rebooting".as_slice()
        } else {
            b"powering off"
        })
        .push(b": grace ms=")
        .num(u64::from(request.grace_ms))
        .emit();
    // Children are waited for from here on (they were reaped by the kernel so far).
    let _ = sys::set_signal_ignored(Signal::CHILD, false);
    // `kill(-1)` reaches every process but PID 1 itself (and kernel threads).
    let _ = rustix::process::kill_process_group(Pid::INIT, Signal::TERM);
    let gone = reap_until(u64::from(request.grace_ms));
    if !gone {
        let _ = rustix::process::kill_process_group(Pid::INIT, Signal::KILL);
        reap_until(KILL_WAIT_MS);
    }
    rustix::fs::sync();
    unmount_all();
    rustix::fs::sync();
    let command = if request.reboot {
        rustix::system::RebootCommand::Restart
    } else {
        rustix::system::RebootCommand::PowerOff
    };
    let errno = rustix::system::reboot(command)
        .err()
        .unwrap_or(Errno::INVAL);
    // PID 1 must not exit: say why and stay.
    log::error(b"reboot(2) failed", errno);
    loop {
        clock::sleep_ms(60_000);
    }
}

/// Reaps children until none is left (`true`) or `ms` pass (`false`).
fn reap_until(ms: u64) -> bool {
    let deadline = clock::monotonic_us().saturating_add(ms.saturating_mul(1000));
    loop {
        match rustix::process::wait(WaitOptions::NOHANG) {
            // One reaped: look again at once.
            Ok(Some(_)) => continue,
            Err(Errno::CHILD) => return true,
            Err(Errno::INTR) => continue,
            Ok(None) | Err(_) => {}
        }
        if clock::monotonic_us() >= deadline {
            return false;
        }
        clock::sleep_ms(10);
    }
}

/// The most mounts unmounted at shutdown (the rest stay as they are, synced).
const MAX_MOUNTS: usize = 64;

/// Unmounts everything in `/proc/self/mounts`, last mounted first, but the root; what cannot
/// be unmounted (busy: the console on `/dev`) is remounted read-only.
fn unmount_all() {
    let mut buf = [0u8; 8192];
    let text = crate::file::read(c"/proc/self/mounts", &mut buf).map_or(&[][..], |f| f.text);
    let mut targets = heapless::Vec::<&[u8], MAX_MOUNTS>::new();
    for line in text.split(|b| *b == b'\n') {
        let mut fields = line.split(|b| *b == b' ');
        let target = fields.nth(1).unwrap_or(&[]);
        // The root stays; a name with an escape (`\040` for a space) is not unescaped.
        if target.len() > 1 && !target.contains(&b'\\') && targets.push(target).is_err() {
            break;
        }
    }
    for target in targets.iter().rev() {
        let mut path = [0u8; 256];
        let Some(path) = cstr::join(&mut path, &[target]) else {
            continue;
        };
        if rustix::mount::unmount(path, UnmountFlags::empty()).is_err() {
            remount_read_only(path);
        }
    }
}

fn remount_read_only(path: &CStr) {
    let _ = rustix::mount::mount_remount(path, MountFlags::RDONLY, c"");
}

/// The service-mode agent's shutdown: the system's init does it. With `power_command`, that
/// program is run as `PROGRAM poweroff` (or `reboot`) and nothing else is tried; otherwise
/// `poweroff` (`reboot`) from the system's directories, and without one, PID 1 is signalled
/// as systemd expects (`SIGRTMIN+4` powers off, `SIGINT` reboots). The grace is the system's.
pub fn ask_system(request: PowerRequest, policy: &Policy) {
    log::Line::new()
        .push(b"shutdown requested: asking the system to ")
        .push(action(request).to_bytes())
        .emit();
    // SAFETY: the agent is single-threaded and installs no signal handlers; the child runs the
    // agent's own code (see `sys::fork`).
    #[allow(unsafe_code)]
    let forked = unsafe { sys::fork() };
    match forked {
        Ok(sys::Forked::Child) => {}
        Ok(sys::Forked::Parent(_)) => return,
        Err(errno) => return log::error(b"cannot fork for the shutdown", errno),
    }
    // The listener ignores SIGCHLD; `poweroff` and `systemctl` wait for their own children.
    let _ = sys::set_signal_ignored(Signal::CHILD, false);
    let _ = sys::reset_inherited_ignored_signals();
    let errno = match &policy.power_command {
        Some(program) => {
            let mut path = [0u8; crate::policy::MAX_POLICY_PATH + 1];
            match cstr::join(&mut path, &[program]) {
                Some(path) => run(path, Some(action(request))),
                None => Errno::INVAL,
            }
        }
        None => {
            let programs: [&CStr; 4] = if request.reboot {
                [
                    c"/sbin/reboot",
                    c"/usr/sbin/reboot",
                    c"/bin/reboot",
                    c"/usr/bin/reboot",
                ]
            } else {
                [
                    c"/sbin/poweroff",
                    c"/usr/sbin/poweroff",
                    c"/bin/poweroff",
                    c"/usr/bin/poweroff",
                ]
            };
            for program in programs {
                run(program, None);
            }
            // systemd's SIGRTMIN+4 is glibc's real-time base (34) + 4.
            let signal = if request.reboot { 2 } else { 38 };
            match sys::kill_raw(Pid::INIT, signal) {
                Ok(()) => sys::exit(0),
                Err(errno) => errno,
            }
        }
    };
    log::error(b"shutdown: the system refused", errno);
    sys::exit(1)
}

fn action(request: PowerRequest) -> &'static CStr {
    if request.reboot {
        c"reboot"
    } else {
        c"poweroff"
    }
}

/// `execve(program, [program, argument])` with a plain `PATH`; returns only on failure.
fn run(program: &CStr, argument: Option<&CStr>) -> Errno {
    let mut argv_storage = sys::PtrStorage::<3>::new();
    let mut argv = sys::PtrArray::new(&mut argv_storage);
    argv.push(program);
    if let Some(argument) = argument {
        argv.push(argument);
    }
    let mut envp_storage = sys::PtrStorage::<2>::new();
    let mut envp = sys::PtrArray::new(&mut envp_storage);
    envp.push(c"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    sys::execve(program, &argv, &envp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions() {
        let request = PowerRequest {
            reboot: true,
            grace_ms: 0,
        };
        assert_eq!(action(request), c"reboot");
        assert_eq!(
            action(PowerRequest {
                reboot: false,
                ..request
            }),
            c"poweroff"
        );
    }
}
