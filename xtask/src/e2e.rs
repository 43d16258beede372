//! The commands that drive a booted guest: `cargo xtask vm` (the README's demo) and
//! `cargo xtask e2e` (the QEMU suite, as CI runs it).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::arch::Arch;
use crate::deps::ensure_tools;
use crate::kernel::arch_dir;
use crate::machine::Machine;
use crate::util::{cargo, project_root, run};
use crate::vm::{
    die_with_parent, install_signal_handlers, interrupted, shell_code, signal_group, Vm, VmOptions,
    CONSOLE_TAIL_LINES,
};

/// `cargo xtask e2e`'s default wall-clock limit.
pub const DEFAULT_E2E_TIMEOUT: Duration = Duration::from_secs(1500);

/// Knobs for [`run_e2e`].
#[derive(Debug, Clone)]
pub struct E2eOptions {
    /// The guests' architecture.
    pub arch: Arch,
    /// The whole run, builds included; on expiry the tests are killed and the guest torn down.
    pub timeout: Duration,
    /// The QEMU machine every guest of the run boots on.
    pub machine: Machine,
}

impl Default for E2eOptions {
    fn default() -> Self {
        E2eOptions {
            arch: Arch::default(),
            timeout: DEFAULT_E2E_TIMEOUT,
            machine: Machine::default(),
        }
    }
}

/// Builds the `ferry` CLI (release) and returns its path.
pub fn build_ferry_cli() -> Result<PathBuf> {
    run(cargo().args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "ferry-host",
        "--bin",
        "ferry",
    ]))
    .context("building the ferry CLI")?;
    Ok(project_root().join("target").join("release").join("ferry"))
}

/// Builds the embedding example (`host/examples/epoll_exec.rs`, dev profile), one of the QEMU
/// suite's drivers, and returns its path.
fn build_epoll_example() -> Result<PathBuf> {
    run(cargo().args([
        "build",
        "--quiet",
        "-p",
        "ferry-host",
        "--example",
        "epoll_exec",
    ]))
    .context("building the epoll_exec example")?;
    Ok(project_root().join("target/debug/examples/epoll_exec"))
}

/// `cargo xtask vm [--minimal] [-- PROG ARGS...]`. Returns the exit code for the process: the
/// command's status, or 0 after an interactive session ends with Ctrl-C/SIGTERM.
pub fn run_vm(options: &VmOptions, argv: &[String]) -> Result<i32> {
    let ferry = if argv.is_empty() {
        None
    } else {
        // Built before the boot, so the guest does not idle through a compile.
        Some(build_ferry_cli()?)
    };
    let mut vm = Vm::boot(options)?;
    eprintln!("{}", vm.ready().summary());
    eprintln!(
        "guest console: {} (QEMU pid {})",
        vm.console_log().display(),
        vm.qemu_pid().unwrap_or_default()
    );

    let Some(ferry) = ferry else {
        println!("FERRY_CONNECT={}", vm.target());
        println!("FERRY_SECRET_FILE={}", vm.secret_path().display());
        let _ = std::io::stdout().flush();
        eprintln!("the guest runs until Ctrl-C or SIGTERM");
        while !interrupted() && vm.running() {
            thread::sleep(Duration::from_millis(50));
        }
        if !vm.running() {
            let tail = vm.console_tail(CONSOLE_TAIL_LINES);
            vm.shutdown()?;
            bail!("the guest stopped by itself; its console:\n{tail}");
        }
        eprintln!("powering the guest off");
        vm.poweroff();
        vm.shutdown()?;
        return Ok(0);
    };

    let mut command = Command::new(&ferry);
    command
        .arg("--connect")
        .arg(vm.target())
        .arg("--secret-file")
        .arg(vm.secret_path())
        .arg("exec")
        .arg("--")
        .args(argv);
    // Same process group: a terminal's Ctrl-C reaches ferry directly, as with ssh.
    die_with_parent(&mut command, false);
    let child = command
        .spawn()
        .with_context(|| format!("starting {}", ferry.display()))?;
    let status = wait_child(child, None, "ferry exec")?;
    if !options.minimal {
        power_off_through_cli(&ferry, &vm);
    }
    vm.shutdown()?;
    match status {
        Some(status) => Ok(shell_code(status)),
        None => {
            eprintln!("interrupted: the guest is shut down");
            // 128 + SIGINT, as a shell reports a command stopped with Ctrl-C.
            Ok(130)
        }
    }
}

/// `ferry exec -- poweroff -f`, bounded; failure is expected (the guest dies mid-connection)
/// and ignored.
fn power_off_through_cli(ferry: &Path, vm: &Vm) {
    let mut command = Command::new(ferry);
    command
        .args(["--connect", &vm.target(), "--connect-timeout", "2"])
        .arg("--secret-file")
        .arg(vm.secret_path())
        .args(["exec", "--user", "root", "--", "poweroff", "-f"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    die_with_parent(&mut command, true);
    if let Ok(child) = command.spawn() {
        let _ = wait_child(
            child,
            Some(Instant::now() + Duration::from_secs(5)),
            "poweroff",
        );
    }
}

/// Waits for a child, killing its process group at the deadline or on Ctrl-C/SIGTERM. `None`
/// when it was interrupted; an error at the deadline.
fn wait_child(
    mut child: Child,
    deadline: Option<Instant>,
    what: &str,
) -> Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let expired = deadline.is_some_and(|d| Instant::now() >= d);
        if expired || interrupted() {
            // Group first (cargo's test binaries are its children), then the child itself in case
            // it shares our group.
            signal_group(child.id(), libc::SIGKILL);
            let _ = child.kill();
            let _ = child.wait();
            if expired {
                bail!("{what} ran past its deadline and was killed");
            }
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `cargo xtask e2e`: checks or installs the tools, boots the full image, runs the `qemu-tests`
/// suite against it, then boots the agent-only image and checks `ferry health`; all within
/// `options.timeout`. On failure the guest console is saved and its tail printed.
pub fn run_e2e(options: &E2eOptions) -> Result<()> {
    let started = Instant::now();
    let deadline = started + options.timeout;
    install_signal_handlers();
    ensure_tools(options.arch)?;
    let ferry = build_ferry_cli()?;
    // Built before the boot, so the guest does not idle through a compile.
    let example = build_epoll_example()?;

    // The full image: busybox is there for the scenarios that run sh, cat, uname...
    let arch = options.arch;
    let machine = options.machine.check_arch(arch)?;
    let vm = Vm::boot(&VmOptions {
        arch: options.arch,
        machine,
        ready_timeout: remaining(deadline)?.min(VmOptions::default().ready_timeout),
        ..VmOptions::default()
    })?;
    eprintln!("e2e ({arch}, {machine}): {}", vm.ready().summary());
    let full_ready = vm.ready().clone();
    let suite = run_suite(&vm, options.arch, &example, &ferry, deadline);
    if let Err(err) = suite {
        let err = anyhow!(
            "{err:#}\n{}",
            save_console(&vm, options.arch, "e2e-console.log")
        );
        let _ = vm.shutdown();
        return Err(err);
    }
    vm.poweroff();
    vm.shutdown()?;

    // The agent-only image must boot and answer on its own.
    let vm = Vm::boot(&VmOptions {
        arch: options.arch,
        minimal: true,
        machine,
        ready_timeout: remaining(deadline)?.min(VmOptions::default().ready_timeout),
        ..VmOptions::default()
    })?;
    eprintln!(
        "e2e ({arch}, {machine}, minimal image): {}",
        vm.ready().summary()
    );
    let health = check_health(&ferry, &vm, deadline);
    if let Err(err) = health {
        let err = anyhow!(
            "{err:#}\n{}",
            save_console(&vm, options.arch, "e2e-minimal-console.log")
        );
        let _ = vm.shutdown();
        return Err(err);
    }
    let minimal_ready = vm.ready().clone();
    vm.shutdown()?;

    // A guest of its own for what reboots and powers off (the suite's guest is shared).
    let ready_timeout = remaining(deadline)?.min(VmOptions::default().ready_timeout);
    crate::e2e_system::run(&ferry, machine, ready_timeout)?;
    eprintln!(
        "e2e ({arch}, {machine}): passed in {:.0} s; boot-to-ready {:.0} ms (full), {:.0} ms (minimal); /init → listening {:.1} ms ({:.1} ms without modules)",
        started.elapsed().as_secs_f64(),
        full_ready.boot_to_ready.as_secs_f64() * 1e3,
        minimal_ready.boot_to_ready.as_secs_f64() * 1e3,
        full_ready.init_to_listening().as_secs_f64() * 1e3,
        full_ready.init_to_listening_without_modules().as_secs_f64() * 1e3,
    );
    Ok(())
}

fn remaining(deadline: Instant) -> Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        bail!("the e2e wall-clock limit expired");
    }
    Ok(left)
}

/// `cargo test -p qemu-tests --features qemu` against the booted guest, with the prebuilt
/// example for the suite's example driver and the prebuilt CLI for its CLI scenarios.
fn run_suite(vm: &Vm, arch: Arch, example: &Path, ferry: &Path, deadline: Instant) -> Result<()> {
    let mut command = cargo();
    command
        .args(["test", "-p", "qemu-tests", "--features", "qemu"])
        // What the scenarios check against (`uname -m`, architecture-specific numbers).
        .env("FERRY_GUEST_ARCH", arch.name())
        .env("FERRY_CONNECT", vm.target())
        .env("FERRY_SECRET_FILE", vm.secret_path())
        .env("FERRY_EXAMPLE_BIN", example)
        // The CLI scenarios (`suite/interactive.rs`) run the release CLI built above.
        .env("FERRY_CLI_BIN", ferry)
        // The peer-check scenario looks for the agent's refusal lines in it.
        .env("FERRY_GUEST_CONSOLE", vm.console_log());
    // Its own group, so the deadline kills the test binaries cargo started too.
    die_with_parent(&mut command, true);
    let child = command.spawn().context("starting cargo test")?;
    match wait_child(child, Some(deadline), "the QEMU test suite")? {
        Some(status) if status.success() => Ok(()),
        Some(status) => bail!("the QEMU test suite failed: {status}"),
        None => bail!("interrupted"),
    }
}

/// `ferry health` must succeed against the guest.
fn check_health(ferry: &Path, vm: &Vm, deadline: Instant) -> Result<()> {
    let mut command = Command::new(ferry);
    command
        .args(["--connect", &vm.target(), "health"])
        .env("FERRY_SECRET_FILE", vm.secret_path())
        .stdin(Stdio::null());
    die_with_parent(&mut command, true);
    let child = command
        .spawn()
        .with_context(|| format!("starting {}", ferry.display()))?;
    let health_deadline = deadline.min(Instant::now() + Duration::from_secs(60));
    match wait_child(child, Some(health_deadline), "ferry health")? {
        Some(status) if status.success() => Ok(()),
        Some(status) => bail!("ferry health failed on the minimal image: {status}"),
        None => bail!("interrupted"),
    }
}

/// Copies the guest console next to the other VM files and returns a message with its tail.
fn save_console(vm: &Vm, arch: Arch, name: &str) -> String {
    let saved = arch_dir(arch).join(name);
    let path = match std::fs::copy(vm.console_log(), &saved) {
        Ok(_) => saved,
        Err(_) => vm.console_log().to_path_buf(),
    };
    format!(
        "guest console saved to {}; last {CONSOLE_TAIL_LINES} lines:\n{}",
        path.display(),
        vm.console_tail(CONSOLE_TAIL_LINES)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    #[test]
    fn deadline_kills_the_whole_group() {
        let mut command = Command::new("sh");
        command
            .args(["-c", "sleep 30 & echo $!; wait"])
            .stdout(Stdio::piped());
        die_with_parent(&mut command, true);
        let mut child = command.spawn().expect("sh");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("the grandchild's pid");
        let grandchild = line.trim().to_owned();
        let started = Instant::now();
        let err = wait_child(child, Some(started + Duration::from_millis(100)), "sh")
            .expect_err("killed at the deadline");
        assert!(err.to_string().contains("deadline"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        // The grandchild was in the group: gone (or a zombie awaiting init) shortly after.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{grandchild}/stat"));
            match stat {
                Err(_) => break,
                Ok(stat) if stat.contains(") Z") => break,
                Ok(_) => {}
            }
            assert!(Instant::now() < deadline, "sleep {grandchild} survived");
            thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn exit_status_is_passed_through() {
        let mut command = Command::new("sh");
        command.args(["-c", "exit 3"]);
        die_with_parent(&mut command, false);
        let child = command.spawn().expect("sh");
        let status = wait_child(child, None, "sh")
            .expect("exits")
            .expect("not interrupted");
        assert_eq!(shell_code(status), 3);
    }
}
