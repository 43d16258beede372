//! Small helpers shared by the subcommands: the project root, running processes.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The workspace root (the parent of this crate's manifest directory).
pub fn project_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// The cargo that invoked us, so toolchain overrides carry through.
pub fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(project_root());
    cmd
}

/// Runs a command to completion, failing loudly with the command line on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Opens (creating it if missing) a lock file, for `flock`-style locks through
/// [`std::fs::File::lock`]: the kernel drops them with the process, however it ends.
pub fn open_lock_file(path: &Path) -> Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Runs `f` holding an exclusive lock on the file `path`, waiting for another xtask that holds
/// it: for work two at once would break, such as two first runs fetching the same packages into
/// the same directory.
pub fn with_lock<T>(path: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let file = open_lock_file(path)?;
    if let Err(std::fs::TryLockError::WouldBlock) = file.try_lock() {
        eprintln!("waiting for another xtask (it holds {})", path.display());
        file.lock()
            .with_context(|| format!("locking {}", path.display()))?;
    }
    let result = f();
    drop(file);
    result
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn with_lock_waits_for_the_holder() {
        let dir = std::env::temp_dir().join(format!("ferry-lock-{}", std::process::id()));
        let path = dir.join("fetch.lock");
        let holder = super::open_lock_file(&path).expect("open");
        holder.lock().expect("lock");
        let released = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (path, released) = (path.clone(), Arc::clone(&released));
            std::thread::spawn(move || {
                super::with_lock(&path, || Ok(released.load(Ordering::SeqCst))).expect("with_lock")
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        released.store(true, Ordering::SeqCst);
        drop(holder);
        assert!(
            waiter.join().expect("thread"),
            "ran before the holder let go"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
