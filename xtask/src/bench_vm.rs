//! `cargo xtask bench --vm`: boot figures, and exec and stream over the real virtio-vsock path,
//! with the agent as PID 1 in QEMU.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_host::{Client, Command, ConnectOptions, Target};

use crate::bench::{
    bytes, micros, percentiles, stream_rate, BenchOptions, IdleMemory, Rollup, Row, Verdict,
};
use crate::ready::ReadyInfo;
use crate::vm::{Vm, VmOptions};

/// Boots per image for the boot figures (medians are reported).
const BOOTS: usize = 3;
/// Exec round trips over vsock: TCG makes each one cost milliseconds.
const VM_RUNS: usize = 200;
/// Bytes per stream trial over vsock (the TCG guest moves tens of MB/s).
const VM_STREAM_BYTES: u64 = 256 << 20;

pub fn vm_rows(_options: &BenchOptions, rows: &mut Vec<Row>) -> Result<()> {
    // The agent-only image first: what an appliance guest costs to bring up.
    let mut minimal = Vec::new();
    for _ in 0..BOOTS {
        let vm = Vm::boot(&VmOptions {
            minimal: true,
            ..VmOptions::default()
        })?;
        minimal.push(vm.ready().clone());
        vm.shutdown()?;
    }
    let mut full = Vec::new();
    for _ in 0..BOOTS - 1 {
        let vm = Vm::boot(&VmOptions::default())?;
        full.push(vm.ready().clone());
        vm.poweroff();
        vm.shutdown()?;
    }
    // The last full boot stays up for the exec and stream figures.
    let vm = Vm::boot(&VmOptions::default())?;
    full.push(vm.ready().clone());
    boot_rows(&minimal, &full, rows);
    let measured = guest_rows(&vm, rows).and_then(|()| exec_cgroup_rows(&vm, rows));
    vm.poweroff();
    vm.shutdown()?;
    measured
}

/// What a per-exec cgroup costs an exec: the same `/bin/true` round trip against this guest and
/// a second one whose agent makes none (`ferry.exec_cgroups=false`), interleaved run by run so
/// noise hits both alike (each guest has a vCPU of its own).
fn exec_cgroup_rows(vm: &Vm, rows: &mut Vec<Row>) -> Result<()> {
    let plain = Vm::boot(&VmOptions {
        kernel_args: vec!["ferry.exec_cgroups=false".into()],
        ..VmOptions::default()
    })?;
    let measured = (|| {
        let with = guest_client(vm)?;
        let without = guest_client(&plain)?;
        let command = Command::new("/bin/true");
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for i in 0..VM_RUNS + 10 {
            for (client, samples) in [(&with, &mut a), (&without, &mut b)] {
                let started = Instant::now();
                let output = client.output(&command)?;
                let took = started.elapsed();
                if !output.success() {
                    bail!("/bin/true failed in the guest: {:?}", output.status);
                }
                if i >= 10 {
                    samples.push(took);
                }
            }
        }
        let (a, b) = (percentiles(a), percentiles(b));
        for (label, with, without) in [("p50", a.p50, b.p50), ("p99", a.p99, b.p99)] {
            rows.push(Row {
                metric: format!("VM exec with its own cgroup {label} ({VM_RUNS} runs)"),
                ferry: micros(with),
                baseline: format!("{} without (`exec_cgroups=false`)", micros(without)),
                ratio: format!("{:.2}×", with.as_secs_f64() / without.as_secs_f64()),
                target: String::new(),
                verdict: Verdict::Info,
            });
        }
        Ok(())
    })();
    plain.poweroff();
    plain.shutdown()?;
    measured
}

fn guest_client(vm: &Vm) -> Result<Client> {
    let target: Target = vm.target().parse()?;
    Ok(Client::new(
        &target,
        vm.connect_options(ConnectOptions::default().connect_timeout)?,
    ))
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn millis(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn boot_rows(minimal: &[ReadyInfo], full: &[ReadyInfo], rows: &mut Vec<Row>) {
    for (image, boots) in [("agent-only image", minimal), ("image with busybox", full)] {
        rows.push(Row::info(
            format!("VM boot-to-ready, {image} (QEMU start → agent hello, median of {BOOTS})"),
            millis(median(boots.iter().map(|b| b.boot_to_ready).collect())),
            format!(
                "kernel → /init {}",
                millis(median(
                    boots
                        .iter()
                        .map(|b| Duration::from_micros(b.report.init_started_us))
                        .collect()
                ))
            ),
        ));
    }
    let all: Vec<&ReadyInfo> = minimal.iter().chain(full).collect();
    let without_modules = median(
        all.iter()
            .map(|b| b.init_to_listening_without_modules())
            .collect(),
    );
    let modules = median(
        all.iter()
            .map(|b| Duration::from_micros(b.report.modules_us))
            .collect(),
    );
    rows.push(Row {
        metric: format!(
            "VM /init → listening, without module loading (median of {})",
            all.len()
        ),
        ferry: millis(without_modules),
        baseline: format!("+ {} loading the vsock modules", millis(modules)),
        ratio: String::new(),
        target: "≤ 50 ms".into(),
        verdict: Verdict::from(without_modules <= Duration::from_millis(50)),
    });
}

fn guest_rows(vm: &Vm, rows: &mut Vec<Row>) -> Result<()> {
    let target: Target = vm.target().parse()?;
    let client = Client::new(
        &target,
        vm.connect_options(ConnectOptions::default().connect_timeout)?,
    );

    // Idle memory: PID 1 (the listener) and the spare connection processes waiting in accept.
    let idle = guest_idle_memory(&client)?;
    let listener_kib = idle.listener_rss;
    rows.push(idle.row("VM agent idle RSS, PID 1 (listener)"));

    // Transport alone (connect + hello) next to a whole exec of /bin/true, interleaved.
    let command = Command::new("/bin/true");
    let mut hellos = Vec::with_capacity(VM_RUNS);
    let mut execs = Vec::with_capacity(VM_RUNS);
    let mut lifetimes = Vec::with_capacity(VM_RUNS);
    for i in 0..VM_RUNS + 10 {
        let started = Instant::now();
        client.health()?;
        let hello = started.elapsed();
        let started = Instant::now();
        let output = client.output(&command)?;
        let exec = started.elapsed();
        if !output.success() {
            bail!("/bin/true failed in the guest: {:?}", output.status);
        }
        if i >= 10 {
            hellos.push(hello);
            execs.push(exec);
            lifetimes.push(output.duration);
        }
    }
    let (hello, exec, lifetime) = (
        percentiles(hellos),
        percentiles(execs),
        percentiles(lifetimes),
    );
    for (label, e, h, l) in [
        ("p50", exec.p50, hello.p50, lifetime.p50),
        ("p99", exec.p99, hello.p99, lifetime.p99),
    ] {
        rows.push(Row {
            metric: format!("VM exec /bin/true {label} ({VM_RUNS} runs, vsock)"),
            ferry: micros(e),
            baseline: format!(
                "{} connect+hello; {} fork → exit in the guest",
                micros(h),
                micros(l)
            ),
            ratio: format!("{:.2}×", e.as_secs_f64() / h.as_secs_f64()),
            target: String::new(),
            verdict: Verdict::Info,
        });
    }

    // Stream: ferry's rate next to what the same producer manages inside the guest alone.
    let blocks = VM_STREAM_BYTES / 65536;
    let mut producer = Command::new("dd");
    producer.args([
        "if=/dev/zero",
        "bs=65536",
        &format!("count={blocks}"),
        "status=none",
    ]);
    let mut in_guest = Command::new("sh");
    in_guest.args([
        "-c",
        &format!("dd if=/dev/zero bs=65536 count={blocks} status=none | cat > /dev/null"),
    ]);
    let mut ferry_rates = Vec::new();
    let mut guest_rates = Vec::new();
    for _ in 0..3 {
        ferry_rates.push(stream_rate(&client, &producer, VM_STREAM_BYTES)?);
        let output = client.output(&in_guest)?;
        if !output.success() {
            bail!("the in-guest pipe copy failed: {:?}", output.status);
        }
        guest_rates.push(VM_STREAM_BYTES as f64 / output.duration.as_secs_f64());
    }
    let ferry_best = ferry_rates.iter().cloned().fold(0.0, f64::max);
    let guest_best = guest_rates.iter().cloned().fold(0.0, f64::max);
    rows.push(Row {
        metric: format!(
            "VM stdout stream {} (best of 3, vsock)",
            bytes(VM_STREAM_BYTES)
        ),
        ferry: format!("{:.0} MB/s", ferry_best / 1e6),
        baseline: format!("{:.0} MB/s dd \\| cat inside the guest", guest_best / 1e6),
        ratio: format!("{:.0}%", ferry_best / guest_best * 100.0),
        target: String::new(),
        verdict: Verdict::Info,
    });

    rows.push(crate::bench::terminal_echo_row(&client, 200, "VM ")?);

    // Streams ran in connection processes: PID 1 must not have grown.
    let after_kib = guest_idle_memory(&client)?.listener_rss;
    rows.push(Row::not_grown(
        "VM agent PID 1 RSS after the run",
        after_kib,
        listener_kib,
    ));
    Ok(())
}

/// Idle memory of PID 1 and of the spares (the agent's children of PID 1 other than the one
/// serving this very request), from `smaps_rollup`: it walks the page tables, where the 6.1
/// guest kernel's `VmRSS` lags behind by up to 64 page faults per task.
fn guest_idle_memory(client: &Client) -> Result<IdleMemory> {
    // $PPID is the connection process serving this exec.
    let script = "for p in 1 $(cat /proc/1/task/1/children); do \
                  [ \"$p\" = \"$PPID\" ] && continue; \
                  [ \"$p\" != 1 ] && [ \"$(cat /proc/$p/comm)\" != \"$(cat /proc/1/comm)\" ] && continue; \
                  echo \"== $p\"; cat /proc/$p/smaps_rollup; done";
    // Another user's smaps_rollup is root's to read (the bench guest's policy allows root).
    let output = client.output(Command::new("sh").args(["-c", script]).user("root"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut rollups = Vec::new();
    for section in text.split("== ").filter(|s| !s.trim().is_empty()) {
        let (pid, rollup) = section.split_once('\n').unwrap_or((section, ""));
        let pid: u32 = pid
            .trim()
            .parse()
            .with_context(|| format!("pid in {section:?}"))?;
        rollups.push((pid, Rollup::parse(rollup)?));
    }
    if rollups.first().map(|(pid, _)| *pid) != Some(1) {
        bail!("no smaps_rollup for PID 1 in {text:?}");
    }
    IdleMemory::from_rollups(&rollups)
}
