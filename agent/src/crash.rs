//! What a crash of this process must take down with it: the process group of the command it
//! runs (see the panic contract in `main.rs`).

use core::sync::atomic::{AtomicI32, Ordering};

use rustix::process::{Pid, Signal};

/// The process group of the command this process is running; 0 for none.
static CURRENT_COMMAND: AtomicI32 = AtomicI32::new(0);

/// Records (or clears) the command whose group a crash of this process must kill.
pub fn set_current_command(pid: Option<Pid>) {
    let raw = pid.map_or(0, |p| p.as_raw_nonzero().get());
    CURRENT_COMMAND.store(raw, Ordering::Relaxed);
}

/// Kills the recorded command's process group, if there is one.
pub fn kill_current_command() {
    if let Some(pid) = Pid::from_raw(CURRENT_COMMAND.load(Ordering::Relaxed)) {
        let _ = rustix::process::kill_process_group(pid, Signal::KILL);
    }
}
