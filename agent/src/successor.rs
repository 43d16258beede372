//! A connection process's promise to the listener: "I have taken my connection; fork my
//! replacement", and its presence: the listener counts the connection until the pipe closes.

use rustix::fd::OwnedFd;

/// The bytes a connection process writes to its report pipe; the pipe's EOF (its exit) ends
/// what it says.
pub mod report {
    /// "I have taken my connection": the listener forks the next spare.
    pub const TAKEN: u8 = 1;
    /// "My conversation ended as it should, after its last frame": the command's tree is left
    /// alone (an exec that ended normally keeps its daemons). An EOF without this byte is a
    /// connection process that died (crashed, or was killed by its own command): the listener
    /// kills its exec cgroup.
    pub const ENDED_CLEANLY: u8 = 2;
    /// "Power the guest off": an authorized shutdown was acknowledged to its client. Followed
    /// by the grace in milliseconds (`u32`, little-endian), in the same write.
    pub const POWER_OFF: u8 = 3;
    /// "Reboot the guest", as [`POWER_OFF`], grace included.
    pub const REBOOT: u8 = 4;
    /// The longest message: a power request.
    pub const MAX_MESSAGE: usize = 5;
}

/// A connection process's promise to tell the listener it has taken its connection, so the
/// listener forks the next spare. Kept as late as possible, to be done while the command
/// starts (waking the listener is a cross-CPU wake-up, and its fork competes for a CPU), but
/// never past anything that waits on a client: the next client must never wait on this one.
///
/// The pipe stays open after the byte, for as long as this process lives: its end (at exit,
/// whatever the cause, a crash included) is how the listener learns the connection is over and
/// counts it no more against `max_connections`.
///
/// NOTE: the pipe is close-on-exec, so the command never holds it (a `spawn`ed child holds a
/// copy only until its `execve`); nothing here may dup it or clear that flag, or a command could
/// keep a connection counted long after it ended.
pub struct Successor {
    /// The write end of the spare's report pipe.
    report: OwnedFd,
    released: bool,
}

impl Successor {
    /// The promise, kept by writing a byte to `report` (the write end of the spare's pipe).
    pub fn new(report: OwnedFd) -> Self {
        Successor {
            report,
            released: false,
        }
    }

    /// Sends the byte (once); the listener also takes EOF, should this process die first.
    pub fn release(&mut self) {
        if !self.released {
            self.released = true;
            let _ = rustix::io::write(&self.report, &[report::TAKEN]);
        }
    }

    /// Asks the listener to power off (or reboot) after `grace_ms`: only after the client was
    /// sent its acknowledgement. One write of 5 bytes, which a pipe never splits.
    pub fn request_power(&mut self, reboot: bool, grace_ms: u32) {
        self.release();
        let [a, b, c, d] = grace_ms.to_le_bytes();
        let kind = if reboot {
            report::REBOOT
        } else {
            report::POWER_OFF
        };
        let _ = rustix::io::write(&self.report, &[kind, a, b, c, d]);
    }

    /// Tells the listener the conversation ended normally (see [`report::ENDED_CLEANLY`]):
    /// the last thing before this process exits.
    pub fn end_cleanly(&mut self) {
        self.release();
        let _ = rustix::io::write(&self.report, &[report::ENDED_CLEANLY]);
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        self.release();
    }
}
