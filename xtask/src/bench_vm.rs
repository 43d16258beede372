//! `cargo xtask bench --vm`: boot figures, and exec, stream and transfers over the real
//! virtio-vsock path, with the agent as PID 1 in QEMU.
//!
//! The transfer rows (put, get, stdin) move 256 MiB, not the local rows' 1 GiB: the TCG guest
//! moves tens of MB/s. Each is measured against a raw vsock copy of the same bytes between the
//! host and `vsock-probe send|recv` in the guest (qemu-tests' `src/bin/vsock-probe.rs`), started
//! through ferry before its clock starts, the host connecting the way the client connects to the
//! agent.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_host::{Client, Command, ConnectOptions, Event, Target};

use crate::bench::{
    bytes, micros, percentiles, stdin_upload_rate, stream_rate, transfer_row, BenchOptions,
    IdleMemory, Rollup, Row, Verdict,
};
use crate::bench_files;
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
    measured?;
    transfer_rows(rows)
}

/// Guest memory for the transfer rows: the tmpfs root holds a get source and a put destination of
/// [`VM_STREAM_BYTES`] each, besides the kernel and the image.
const TRANSFER_VM_MEMORY_MB: u32 = 1024;

/// Put, get and stdin of [`VM_STREAM_BYTES`] over vsock, each next to a raw vsock copy of the
/// same bytes between the host and `vsock-probe` in the guest, trials interleaved, best of 3. A
/// guest of its own: the files need more memory than the other rows' guests have.
fn transfer_rows(rows: &mut Vec<Row>) -> Result<()> {
    let vm = Vm::boot(&VmOptions {
        memory_mb: TRANSFER_VM_MEMORY_MB,
        ..VmOptions::default()
    })?;
    let measured = guest_transfer_rows(&vm, rows);
    vm.poweroff();
    vm.shutdown()?;
    measured
}

/// The guest's files for the transfer rows (its root is tmpfs; /tmp is everyone's, sticky).
const GUEST_PUT: &str = "/tmp/bench-put";
const GUEST_RAW_PUT: &str = "/tmp/bench-raw-put";
const GUEST_GET: &str = "/tmp/bench-get";

fn guest_transfer_rows(vm: &Vm, rows: &mut Vec<Row>) -> Result<()> {
    let client = guest_client(vm)?;
    let mut raw = RawVsock::new(vm, &client)?;
    let size = bytes(VM_STREAM_BYTES);
    let pattern = bench_files::pattern(1 << 20);
    let remove = |path: &str| -> Result<()> {
        let output = client.output(Command::new("rm").arg(path))?;
        if !output.success() {
            bail!("rm {path} in the guest: {:?}", output.status);
        }
        Ok(())
    };

    let (mut ferry_rates, mut raw_rates) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        ferry_rates.push(bench_files::ferry_put(
            &client,
            GUEST_PUT,
            &pattern,
            VM_STREAM_BYTES,
        )?);
        remove(GUEST_PUT)?;
        raw_rates.push(raw.upload(GUEST_RAW_PUT, "", VM_STREAM_BYTES)?);
        remove(GUEST_RAW_PUT)?;
    }
    rows.push(transfer_row(
        &format!("VM put {size} to a file on the guest's tmpfs, vsock"),
        &ferry_rates,
        &raw_rates,
        "raw vsock → `vsock-probe recv` → file, fsynced",
    ));

    // The get source, put once (untimed).
    bench_files::ferry_put(&client, GUEST_GET, &pattern, VM_STREAM_BYTES)?;
    let (mut ferry_rates, mut raw_rates) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        ferry_rates.push(bench_files::ferry_get(&client, GUEST_GET, VM_STREAM_BYTES)?);
        raw_rates.push(raw.download(GUEST_GET, VM_STREAM_BYTES)?);
    }
    remove(GUEST_GET)?;
    rows.push(transfer_row(
        &format!("VM get {size} of a file on the guest's tmpfs, vsock"),
        &ferry_rates,
        &raw_rates,
        "file → `vsock-probe send` → raw vsock",
    ));

    let (mut ferry_rates, mut raw_rates) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        ferry_rates.push(stdin_upload_rate(&client, VM_STREAM_BYTES)?);
        raw_rates.push(raw.upload("-", " | cat >/dev/null", VM_STREAM_BYTES)?);
    }
    rows.push(transfer_row(
        &format!("VM stdin upload {size} through `exec -i -- cat >/dev/null`, vsock"),
        &ferry_rates,
        &raw_rates,
        "raw vsock → `vsock-probe recv` → pipe → `cat`",
    ));
    Ok(())
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

/// The first guest port the raw vsock baselines listen on; each trial takes the next one, so no
/// trial meets a connection the daemon still tears down from the one before.
const RAW_PORT_BASE: u32 = 20000;

/// The raw vsock copies: `vsock-probe` (the full image's `/bin/vsock-probe`) listening in the
/// guest, started through ferry before the clock starts, and the host connecting to it the way
/// the client connects to the agent (the hybrid-vsock `CONNECT` or AF_VSOCK).
struct RawVsock<'a> {
    client: &'a Client,
    target: Target,
    options: ConnectOptions,
    next_port: u32,
}

impl<'a> RawVsock<'a> {
    fn new(vm: &Vm, client: &'a Client) -> Result<RawVsock<'a>> {
        Ok(RawVsock {
            client,
            target: vm.target().parse()?,
            options: vm.connect_options(ConnectOptions::default().connect_timeout)?,
            next_port: RAW_PORT_BASE,
        })
    }

    /// Starts `sh -c SCRIPT` in the guest, with `{port}` in it replaced by a fresh port, and
    /// waits for `vsock-probe` to say `listening` on stderr. Returns the execution and a stream
    /// connected to the port.
    fn start(&mut self, script: &str) -> Result<(ferry_host::Execution, UnixStream, Instant)> {
        let port = self.next_port;
        self.next_port += 1;
        let mut command = Command::new("sh");
        command.args(["-c", &script.replace("{port}", &port.to_string())]);
        let mut execution = self.client.spawn(&command)?;
        let mut stderr = Vec::new();
        while !stderr.ends_with(b"listening\n") {
            match execution.next_event()? {
                Some(Event::Stderr(data)) => stderr.extend_from_slice(data),
                Some(Event::Stdout(_)) => {}
                other => bail!(
                    "vsock-probe did not listen: {other:?}; stderr {}",
                    String::from_utf8_lossy(&stderr)
                ),
            }
        }
        let started = Instant::now();
        let target = match &self.target {
            Target::Hvsock { path, .. } => Target::Hvsock {
                path: path.clone(),
                port,
            },
            Target::Vsock { cid, .. } => Target::Vsock { cid: *cid, port },
            Target::Unix(_) => bail!("a guest's target is vsock"),
        };
        let stream = target.open_stream(&self.options)?;
        stream.set_read_timeout(Some(TRANSFER_TIMEOUT))?;
        stream.set_write_timeout(Some(TRANSFER_TIMEOUT))?;
        Ok((execution, stream, started))
    }

    /// `total` pattern bytes to `vsock-probe recv PORT DESTINATION` (`-` for its stdout, piped as
    /// `script_tail` says): bytes per second from the connect until the guest answered that
    /// everything was written (and fsynced, for a file).
    fn upload(&mut self, destination: &str, script_tail: &str, total: u64) -> Result<f64> {
        let pattern = bench_files::pattern(1 << 20);
        let (execution, mut stream, started) = self.start(&format!(
            "/bin/vsock-probe recv {{port}} {destination}{script_tail}"
        ))?;
        stream.write_all(&total.to_le_bytes())?;
        bench_files::write_pattern(&mut stream, &pattern, total)?;
        let mut answer = [0u8; 8];
        stream
            .read_exact(&mut answer)
            .context("the guest's count")?;
        let elapsed = started.elapsed();
        drop(stream);
        finish(execution)?;
        if u64::from_le_bytes(answer) != total {
            bail!(
                "the guest received {} of {total} bytes",
                u64::from_le_bytes(answer)
            );
        }
        Ok(total as f64 / elapsed.as_secs_f64())
    }

    /// `vsock-probe send PORT SOURCE`'s bytes, counted and dropped: bytes per second from the
    /// connect until EOF.
    fn download(&mut self, source: &str, total: u64) -> Result<f64> {
        let (execution, mut stream, started) =
            self.start(&format!("exec /bin/vsock-probe send {{port}} {source}"))?;
        let mut buf = vec![0u8; bench_files::CHUNK];
        let mut received = 0u64;
        loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                break;
            }
            received += n as u64;
        }
        let elapsed = started.elapsed();
        finish(execution)?;
        if received != total {
            bail!("received {received} of {total} bytes from the guest");
        }
        Ok(total as f64 / elapsed.as_secs_f64())
    }
}

/// How long one raw transfer may stall before the trial fails.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(120);

/// Waits for a guest-side `vsock-probe` to exit, successfully.
fn finish(mut execution: ferry_host::Execution) -> Result<()> {
    let mut stderr = Vec::new();
    loop {
        match execution.next_event()? {
            Some(Event::Stderr(data)) => stderr.extend_from_slice(data),
            Some(Event::Stdout(_)) => {}
            Some(Event::Exited(end)) if end.success() => return Ok(()),
            Some(Event::Exited(end)) => bail!(
                "vsock-probe failed ({:?}): {}",
                end.status,
                String::from_utf8_lossy(&stderr)
            ),
            None => bail!("no termination record from vsock-probe"),
        }
    }
}
