//! The embedding example (`host/examples/epoll_exec.rs`) as a program: found or built once per
//! test binary, and run with its stdin fed from a thread.
//!
//! Std only, and self-contained: `host/tests/example.rs` includes this file on its own, without
//! the rest of the suite.

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::thread;

/// The environment variable that names a prebuilt example (`cargo xtask e2e` sets it, so the
/// guest does not idle through a compile).
pub const BINARY_VAR: &str = "FERRY_EXAMPLE_BIN";

/// The example: `FERRY_EXAMPLE_BIN`, or built here once per test binary, into a target dir of
/// its own (the outer `cargo test` holds the workspace's lock).
pub fn binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        if let Some(path) = std::env::var_os(BINARY_VAR) {
            return PathBuf::from(path);
        }
        // `host/` or `qemu-tests/`: either way the workspace is the parent.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let target_dir = root.join("target").join("test-example");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(root)
            .args(["build", "--quiet", "--package", "ferry-host"])
            .args(["--example", "epoll_exec", "--target-dir"])
            .arg(&target_dir)
            .status()
            .expect("running cargo to build the example");
        assert!(status.success(), "building the example failed");
        target_dir.join("debug/examples/epoll_exec")
    })
}

/// The environment variable the example reads the agent's secret file from.
pub const SECRET_VAR: &str = "FERRY_SECRET_FILE";

/// Runs the example with `args` and the agent's `secret_file` (in `FERRY_SECRET_FILE`; `None`:
/// unset, for an insecure agent), feeding `input` through a pipe (`None`: its stdin is
/// /dev/null), and returns its status and everything it printed.
pub fn run<S: AsRef<OsStr>>(
    secret_file: Option<&Path>,
    args: &[S],
    input: Option<&[u8]>,
) -> Output {
    let mut command = Command::new(binary());
    match secret_file {
        Some(path) => command.env(SECRET_VAR, path),
        None => command.env_remove(SECRET_VAR),
    };
    let mut child = command
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the example");
    thread::scope(|scope| {
        if let Some(input) = input {
            let mut stdin = child.stdin.take().unwrap();
            // A thread: the example reads its stdin only as the agent grants credit. An example
            // that stops reading early closes the pipe; its status tells why.
            scope.spawn(move || {
                let _ = stdin.write_all(input);
            });
        }
        child.wait_with_output().expect("waiting for the example")
    })
}
