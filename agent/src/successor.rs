//! A connection process's promise to the listener: "I have taken my connection; fork my
//! replacement."

use rustix::fd::OwnedFd;

/// A connection process's promise to tell the listener it has taken its connection, so the
/// listener forks the next spare. Kept as late as possible, to be done while the command
/// starts (waking the listener is a cross-CPU wake-up, and its fork competes for a CPU), but
/// never past anything that waits on a client: the next client must never wait on this one.
pub struct Successor(Option<OwnedFd>);

impl Successor {
    /// The promise, kept by writing a byte to `report` (the write end of the spare's pipe).
    pub fn new(report: OwnedFd) -> Self {
        Successor(Some(report))
    }

    /// Sends the byte (once); the listener also takes EOF, should this process die first.
    pub fn release(&mut self) {
        if let Some(report) = self.0.take() {
            let _ = rustix::io::write(&report, &[1]);
        }
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        self.release();
    }
}
