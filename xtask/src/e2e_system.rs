//! The e2e scenarios on the guest itself, in a guest of their own (they reboot and power it
//! off, so the suite's shared guest cannot serve): `ferry info` against what the guest's own
//! files say, PID 1's hostname and loopback, `time-sync` from 2001, `reseed`, a reboot that
//! comes back, and a power-off that ends QEMU within its grace.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::str::FromStr;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};

use crate::arch::Arch;
use crate::machine::Machine;
use crate::vm::{Vm, VmOptions};

/// The hostname the guest is booted with (`ferry.hostname=`).
const HOSTNAME: &str = "ferry-e2e-guest";

/// Boots a guest on `machine` (of the machine's architecture) and runs the scenarios; the
/// console is in the error on failure.
pub fn run(ferry: &Path, machine: Machine, ready_timeout: Duration) -> Result<()> {
    let arch = machine.arch();
    let mut vm = Vm::boot(&VmOptions {
        arch,
        machine,
        reboot: true,
        kernel_args: vec![format!("ferry.hostname={HOSTNAME}")],
        ready_timeout,
        ..VmOptions::default()
    })?;
    eprintln!("e2e ({arch}, {machine}, system): {}", vm.ready().summary());
    let result = scenarios(&mut vm, arch, ferry);
    if let Err(err) = result {
        let tail = vm.console_tail(crate::vm::CONSOLE_TAIL_LINES);
        let _ = vm.shutdown();
        bail!("{err:#}\nguest console, last lines:\n{tail}");
    }
    vm.shutdown()
}

fn scenarios(vm: &mut Vm, arch: Arch, ferry: &Path) -> Result<()> {
    info_agrees_with_the_guest(vm, arch, ferry).context("info")?;
    loopback_answers(vm, ferry).context("loopback")?;
    time_sync_from_2001(vm, ferry).context("time-sync")?;
    reseed_keeps_the_pool(vm, ferry).context("reseed")?;
    reboot_comes_back(vm, ferry).context("reboot")?;
    power_off_ends_qemu(vm, ferry).context("shutdown")?;
    eprintln!(
        "e2e (system): info, hostname, loopback, time-sync, reseed, reboot, power-off passed"
    );
    Ok(())
}

/// `ferry ARGS` against the guest.
fn ferry_output(vm: &Vm, ferry: &Path, args: &[&str]) -> Result<Output> {
    Command::new(ferry)
        .args(["--connect", &vm.target()])
        .arg("--secret-file")
        .arg(vm.secret_path())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running ferry {args:?}"))
}

/// `ferry ARGS`, which must succeed; its stdout.
fn ferry_ok(vm: &Vm, ferry: &Path, args: &[&str]) -> Result<String> {
    let output = ferry_output(vm, ferry, args)?;
    ensure!(
        output.status.success(),
        "ferry {args:?}: {}; stderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A command's stdout in the guest, as root.
fn guest(vm: &Vm, ferry: &Path, argv: &[&str]) -> Result<String> {
    let mut args = vec!["exec", "-u", "root", "--"];
    args.extend_from_slice(argv);
    ferry_ok(vm, ferry, &args)
}

fn client(vm: &Vm) -> Result<ferry_host::Client> {
    let target = ferry_host::Target::from_str(&vm.target())?;
    Ok(ferry_host::Client::new(
        &target,
        vm.connect_options(Duration::from_secs(10))?,
    ))
}

fn info_agrees_with_the_guest(vm: &Vm, arch: Arch, ferry: &Path) -> Result<()> {
    let report = client(vm)?.info()?;
    ensure!(report.machine == arch.name(), "machine {}", report.machine);
    ensure!(guest(vm, ferry, &["uname", "-m"])?.trim() == arch.name());
    ensure!(report.hostname == HOSTNAME, "hostname {}", report.hostname);
    ensure!(guest(vm, ferry, &["hostname"])?.trim() == HOSTNAME);
    ensure!(report.agent.pid == 1 && report.agent.mode == "init");
    let meminfo = guest(vm, ferry, &["cat", "/proc/meminfo"])?;
    let total_kib: u64 = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .context("MemTotal in the guest's /proc/meminfo")?;
    ensure!(
        report.memory_total == total_kib * 1024,
        "memory_total {} vs MemTotal {total_kib} kB",
        report.memory_total
    );
    let cpus = guest(vm, ferry, &["grep", "-c", "^processor", "/proc/cpuinfo"])?;
    ensure!(
        report.cpus.to_string() == cpus.trim(),
        "cpus {}",
        report.cpus
    );
    let release = guest(vm, ferry, &["uname", "-r"])?;
    ensure!(report.kernel_release == release.trim());
    let root = report
        .mounts
        .iter()
        .find(|mount| mount.target == "/")
        .context("/ among the mounts")?;
    let stat = guest(vm, ferry, &["stat", "-f", "-c", "%S %b", "/"])?;
    let numbers: Vec<u64> = stat
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    ensure!(
        numbers.len() == 2 && root.total == numbers[0] * numbers[1],
        "/ total {} vs stat -f {stat:?}",
        root.total
    );
    let lo = report
        .interfaces
        .iter()
        .find(|interface| interface.name == "lo")
        .context("lo among the interfaces")?;
    ensure!(lo.up && lo.addresses == ["127.0.0.1/8"], "lo: {lo:?}");
    ensure!(report.uptime_ms > 0 && report.agent.rss > 0);
    let json = ferry_ok(vm, ferry, &["info", "--json"])?;
    for field in [
        format!("\"hostname\":\"{HOSTNAME}\""),
        "\"mode\":\"init\"".into(),
        format!("\"memory_total\":{}", total_kib * 1024),
    ] {
        ensure!(json.contains(&field), "{field} not in {json}");
    }
    Ok(())
}

fn loopback_answers(vm: &Vm, ferry: &Path) -> Result<()> {
    let ping = guest(vm, ferry, &["ping", "-c", "1", "-W", "2", "127.0.0.1"])?;
    ensure!(ping.contains("1 packets received"), "{ping}");
    Ok(())
}

fn host_seconds() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn time_sync_from_2001(vm: &Vm, ferry: &Path) -> Result<()> {
    guest(vm, ferry, &["date", "-s", "@978307200"])?;
    let before = guest(vm, ferry, &["date", "+%s"])?;
    ensure!(
        before.trim().starts_with("9783072"),
        "the clock was not set back: {before}"
    );
    let said = ferry_ok(vm, ferry, &["time-sync"])?;
    ensure!(
        said.starts_with("guest clock was 2001-01-01T00:00:0") && said.contains("step +"),
        "{said}"
    );
    let earliest = host_seconds();
    let guest_now: i64 = guest(vm, ferry, &["date", "+%s"])?.trim().parse()?;
    let latest = host_seconds();
    ensure!(
        guest_now >= earliest - 1 && guest_now <= latest + 1,
        "the guest says {guest_now}, the host {earliest}..{latest}"
    );
    Ok(())
}

fn reseed_keeps_the_pool(vm: &Vm, ferry: &Path) -> Result<()> {
    let read = || -> Result<u64> {
        Ok(
            guest(vm, ferry, &["cat", "/proc/sys/kernel/random/entropy_avail"])?
                .trim()
                .parse()?,
        )
    };
    let before = read()?;
    ferry_ok(vm, ferry, &["reseed", "--bytes", "512"])?;
    let after = read()?;
    ensure!(after >= before, "entropy_avail {before} → {after}");
    Ok(())
}

fn reboot_comes_back(vm: &mut Vm, ferry: &Path) -> Result<()> {
    let asked = Instant::now();
    ferry_ok(vm, ferry, &["shutdown", "--reboot", "--grace", "1s"])?;
    let ready = vm.wait_rebooted(Duration::from_secs(60))?;
    eprintln!(
        "e2e (system): rebooted in {:.1} s: {}",
        asked.elapsed().as_secs_f64(),
        ready.summary()
    );
    let health = ferry_ok(vm, ferry, &["health"])?;
    ensure!(health.contains("protocol"), "{health}");
    let report = client(vm)?.info()?;
    ensure!(
        u128::from(report.uptime_ms) < asked.elapsed().as_millis(),
        "uptime {} ms: the guest did not reboot",
        report.uptime_ms
    );
    ensure!(report.hostname == HOSTNAME);
    Ok(())
}

fn power_off_ends_qemu(vm: &mut Vm, ferry: &Path) -> Result<()> {
    // A process that ignores SIGTERM: only the SIGKILL after the grace ends it.
    guest(
        vm,
        ferry,
        &[
            "sh",
            "-c",
            "trap '' TERM; sleep 1000 </dev/null >/dev/null 2>&1 &",
        ],
    )?;
    let grace = Duration::from_secs(2);
    let asked = Instant::now();
    ferry_ok(vm, ferry, &["shutdown", "--grace", "2s"])?;
    let limit = grace + Duration::from_secs(2);
    while vm.running() {
        if asked.elapsed() > limit {
            bail!(
                "QEMU still runs {:.1} s after the shutdown",
                limit.as_secs_f64()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    let took = asked.elapsed();
    eprintln!(
        "e2e (system): powered off in {:.2} s (grace {} s)",
        took.as_secs_f64(),
        grace.as_secs()
    );
    ensure!(
        took >= grace,
        "powered off before the grace passed: the TERM-ignoring process was not waited for"
    );
    Ok(())
}
