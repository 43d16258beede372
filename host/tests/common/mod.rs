//! Starting the real, shipped agent binary on a Unix socket for integration tests.
#![allow(dead_code)] // each test binary uses its own subset
#![allow(clippy::unwrap_used)] // test support: a panic is how a test fails

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ferry_host::{Client, ConnectOptions, Target};

/// The JSON reader the scenario suite uses too (`host/tests/agent.rs` loads both copies).
#[allow(clippy::duplicate_mod)]
#[path = "../../../qemu-tests/tests/suite/json.rs"]
pub mod json;

pub mod jobs;

/// The static musl agent: `FERRY_AGENT_BIN` (set by `cargo xtask test`), or built here once.
pub fn agent_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        if let Some(path) = std::env::var_os("FERRY_AGENT_BIN") {
            return PathBuf::from(path);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        // A target dir of its own: the outer `cargo test` may hold the workspace's lock.
        let target_dir = root.join("target").join("test-agent");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(root)
            .args([
                "build",
                "--quiet",
                "--release",
                "--package",
                "ferry-agent",
                "--target",
                "x86_64-unknown-linux-musl",
                "--target-dir",
            ])
            .arg(&target_dir)
            .status()
            .expect("running cargo to build the agent");
        assert!(status.success(), "building the agent failed");
        target_dir.join("x86_64-unknown-linux-musl/release/ferry-agent")
    })
}

/// A new, empty directory of this test's own under the temp dir: `PREFIX-PID-N`.
pub fn fresh_dir(prefix: &str) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The secret every test agent of this process is started with: a 0600 file of 32 random
/// bytes, made once.
pub fn secret_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = fresh_dir("ferry-secret").join("secret");
        let mut bytes = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut random| std::io::Read::read_exact(&mut random, &mut bytes))
            .unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut file| file.write_all(&bytes))
            .unwrap();
        path
    })
}

/// Connect options that prove [`secret_path`]'s secret.
pub fn secret_options() -> ConnectOptions {
    ConnectOptions {
        secret: Some(ferry_host::read_secret_file(secret_path()).unwrap()),
        ..ConnectOptions::default()
    }
}

/// What every test agent's shutdown runs (see `Agent::start_with`): nothing.
pub const SAFE_POWER_COMMAND: &str = "power_command=/nonexistent/ferry-test-power-command";

/// A running agent on a private Unix socket, killed (with everything it started) on drop.
pub struct Agent {
    child: Child,
    dir: PathBuf,
    pub socket: PathBuf,
}

impl Agent {
    pub fn start() -> Agent {
        Agent::start_with(&[])
    }

    /// An agent started with these arguments after `--listen`.
    pub fn start_with(args: &[&str]) -> Agent {
        let dir = fresh_dir("ferry-it");
        let socket = dir.join("agent.sock");
        let mut command = Command::new(agent_binary());
        command
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            // Commands run as the agent (root here, writing to the tests' temporary
            // directories), not as the policy's default user `65534:65534`.
            .arg("--run-as-agent-user");
        if !args.contains(&"--insecure") && !args.contains(&"--secret-file") {
            command.arg("--secret-file").arg(secret_path());
        }
        // NOTE: tests run as root on the CI machine: a test agent's shutdown must never reach
        // the real `poweroff` or signal the machine's PID 1. A test that means to see a
        // shutdown passes its own `power_command` (later flags win).
        command.args(["--set", SAFE_POWER_COMMAND]);
        let child = command
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .expect("starting the agent");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !is_listening(&socket) {
            assert!(
                Instant::now() < deadline,
                "the agent did not start listening"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Agent { child, dir, socket }
    }

    /// An agent started with these arguments after `--listen` but without
    /// `--run-as-agent-user`: commands run as the policy's `user` (`65534:65534` by default).
    pub fn start_unprivileged(args: &[&str]) -> Agent {
        Agent::start_unprivileged_with(args, |_| {})
    }

    /// [`Agent::start_unprivileged`], with `configure` applied to the agent's command before
    /// it is spawned (its environment, a piped stderr for [`Agent::take_stderr`]).
    pub fn start_unprivileged_with(args: &[&str], configure: impl FnOnce(&mut Command)) -> Agent {
        let dir = fresh_dir("ferry-it");
        let socket = dir.join("agent.sock");
        let mut command = Command::new(agent_binary());
        command
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()));
        if !args.contains(&"--insecure") && !args.contains(&"--secret-file") {
            command.arg("--secret-file").arg(secret_path());
        }
        // NOTE: tests run as root on the CI machine: a test agent's shutdown must never reach
        // the real `poweroff` or signal the machine's PID 1. A test that means to see a
        // shutdown passes its own `power_command` (later flags win).
        command.args(["--set", SAFE_POWER_COMMAND]);
        command.args(args).stdin(Stdio::null());
        configure(&mut command);
        let child = command.spawn().expect("starting the agent");
        let mut agent = Agent { child, dir, socket };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !is_listening(&agent.socket) {
            assert!(agent.is_alive(), "the agent exited before listening");
            assert!(
                Instant::now() < deadline,
                "the agent did not start listening"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        agent
    }

    /// The agent's stderr, when it was started with a piped one.
    pub fn take_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child.stderr.take()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The agent's private directory (it holds the socket), canonical, removed on drop.
    pub fn scratch_dir(&self) -> PathBuf {
        self.dir.canonicalize().unwrap()
    }

    pub fn target(&self) -> Target {
        Target::Unix(self.socket.clone())
    }

    pub fn target_url(&self) -> String {
        self.target().to_string()
    }

    pub fn client(&self) -> Client {
        Client::connect_with(&self.target(), secret_options()).expect("connecting")
    }

    /// The options a client of this agent needs (its secret).
    pub fn connect_options(&self) -> ConnectOptions {
        secret_options()
    }

    /// The agent's secret file, for the CLI (`FERRY_SECRET_FILE`) and the example.
    pub fn secret_path(&self) -> &'static Path {
        secret_path()
    }

    /// Whether the agent process is still alive (not exited, not a zombie).
    pub fn is_alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether a Unix socket bound to `path` is listening (`__SO_ACCEPTCON` in `/proc/net/unix`).
/// The socket file appears at `bind`, before `listen`, and a connect in between is refused; a
/// probe connection would use up one of the agent's spares.
pub fn is_listening(path: &Path) -> bool {
    const ACCEPTING: &str = "00010000";
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let path = path.to_string_lossy();
    table.lines().any(|line| {
        // Num RefCount Protocol Flags Type St Inode Path
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(3) == Some(&ACCEPTING) && fields.get(7) == Some(&path.as_ref())
    })
}

/// The direct children of `pid`; of an agent, its spares and connection processes (its jobs'
/// supervisor, `ferry-jobs`, is not counted: see [`jobs_supervisor`]).
pub fn children(pid: u32) -> Vec<u32> {
    all_children(pid)
        .into_iter()
        .filter(|child| !is_jobs_supervisor(*child))
        .collect()
}

/// Every direct child of `pid`.
pub fn all_children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn is_jobs_supervisor(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|comm| comm.trim() == "ferry-jobs")
}

/// The agent's jobs' supervisor (named `ferry-jobs`), once it runs.
pub fn jobs_supervisor(agent: u32) -> Option<u32> {
    all_children(agent)
        .into_iter()
        .find(|child| is_jobs_supervisor(*child))
}

/// Every process (zombies included) whose process group is `pgid`, with its state letter.
pub fn group_members(pgid: u32) -> Vec<(u32, char)> {
    let mut members = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the parenthesised command name: state, ppid, pgrp, …
        let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(pgid) {
            let state = fields[0].chars().next().unwrap_or('?');
            members.push((pid, state));
        }
    }
    members
}

/// Waits until no process (zombie or not) is left in group `pgid`.
pub fn wait_group_gone(pgid: u32, within: Duration) -> Result<(), Vec<(u32, char)>> {
    let deadline = Instant::now() + within;
    loop {
        let members = group_members(pgid);
        if members.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(members);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The `ferry` CLI pointed at `agent` (its socket and secret); stdin is left to the caller.
/// Only the test binaries that build it (feature `cli`) may call this.
// `option_env!`: this module is compiled into every test binary, built with the CLI or not.
#[allow(clippy::option_env_unwrap)]
pub fn ferry(agent: &Agent) -> Command {
    let binary = option_env!("CARGO_BIN_EXE_ferry").expect("the ferry binary (feature cli)");
    let mut command = Command::new(binary);
    command.env("FERRY_CONNECT", agent.target_url());
    command.env("FERRY_SECRET_FILE", agent.secret_path());
    command
}

/// `ferry cp ARGS` against `agent`, stdin closed.
pub fn cp(agent: &Agent, args: &[&str]) -> Output {
    ferry(agent)
        .arg("cp")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A command's stderr, as text.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A local path as a CLI argument.
pub fn text(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A path as the CLI's guest path (`:PATH`): the test agent's guest is this machine.
pub fn guest(path: &Path) -> String {
    format!(":{}", path.display())
}

/// The names in `dir`, sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}
