//! `cargo xtask bench`: ferry's figures next to their baselines, measured in the same run, printed
//! as one table and written to `BENCHMARKS.md`.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_host::{Client, ConnectOptions, Event, Target};

use crate::build_agent::{build_agent, TARGET_BYTES};
use crate::util::project_root;

/// Knobs for one benchmark run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Exec round trips per side (ferry and the local baseline).
    pub runs: usize,
    /// Bytes streamed per throughput trial.
    pub stream_bytes: u64,
    /// Also boot the guest and measure over real virtio-vsock.
    pub vm: bool,
}

/// One line of the table.
pub struct Row {
    pub metric: String,
    pub ferry: String,
    pub baseline: String,
    pub ratio: String,
    pub target: String,
    pub verdict: Verdict,
}

impl Row {
    /// A figure reported without a target.
    pub fn info(metric: String, ferry: String, baseline: String) -> Row {
        Row {
            metric,
            ferry,
            baseline,
            ratio: String::new(),
            target: String::new(),
            verdict: Verdict::Info,
        }
    }

    /// A process's RSS after the runs, which must not exceed its idle RSS (work happens in
    /// connection processes).
    pub fn not_grown(metric: &str, after_kib: u64, idle_kib: u64) -> Row {
        Row {
            metric: metric.into(),
            ferry: format!("{after_kib} KiB"),
            baseline: String::new(),
            ratio: String::new(),
            target: format!("= idle ({idle_kib} KiB)"),
            verdict: Verdict::from(after_kib <= idle_kib),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    /// Reported, no target yet.
    Info,
}

impl Verdict {
    fn mark(self) -> &'static str {
        match self {
            Verdict::Pass => "ok",
            Verdict::Fail => "MISSED",
            Verdict::Info => "",
        }
    }

    pub fn from(pass: bool) -> Verdict {
        if pass {
            Verdict::Pass
        } else {
            Verdict::Fail
        }
    }
}

/// Holds the checkout's benchmark lock (`target/bench.lock`) while alive, or fails at once if
/// another benchmark holds it: two at once would share `target/bench-peers/root` and
/// BENCHMARKS.md, and each would measure the other's load. The kernel drops the lock with the
/// process, however it ends.
pub fn exclusive() -> Result<std::fs::File> {
    lock_exclusive(&project_root().join("target").join("bench.lock"))
}

fn lock_exclusive(path: &Path) -> Result<std::fs::File> {
    let file = crate::util::open_lock_file(path)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "another `cargo xtask bench` is running in this checkout (it holds {}); one at a \
             time: they would spoil each other's figures",
            path.display()
        ),
        Err(std::fs::TryLockError::Error(err)) => {
            Err(err).with_context(|| format!("locking {}", path.display()))
        }
    }
}

pub fn run_bench(options: &BenchOptions) -> Result<()> {
    let _one_at_a_time = exclusive()?;
    let agent_bin = build_agent()?;
    let mut rows = Vec::new();
    let size = std::fs::metadata(&agent_bin)?.len();
    rows.push(Row {
        metric: "agent binary (stripped, static)".into(),
        ferry: format!("{size} B"),
        baseline: String::new(),
        ratio: String::new(),
        target: format!("≤ {TARGET_BYTES} B"),
        verdict: Verdict::from(size <= TARGET_BYTES),
    });
    local_rows(&agent_bin, options, &mut rows)?;
    if options.vm {
        crate::bench_vm::vm_rows(options, &mut rows)?;
    }
    let table = render(&rows, options);
    print!("{table}");
    write_section(LOCAL_SECTION, &table)
}

/// BENCHMARKS.md's sections, each owned by one command: `cargo xtask bench` rewrites its own and
/// `cargo xtask bench --peers` its own, each keeping the other's.
pub const LOCAL_SECTION: &str = "local";
pub const PEERS_SECTION: &str = "peers";
const DOC_TITLE: &str = "# ferry benchmarks\n\n";

/// Replaces section `name` of BENCHMARKS.md with `body` (see [`update_section`]).
pub fn write_section(name: &str, body: &str) -> Result<()> {
    let path = project_root().join("BENCHMARKS.md");
    let doc = match std::fs::read_to_string(&path) {
        Ok(doc) => doc,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
    };
    std::fs::write(&path, update_section(&doc, name, body))
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote the {name} section of {}", path.display());
    Ok(())
}

fn markers(name: &str) -> (String, String) {
    let command = if name == PEERS_SECTION {
        "cargo xtask bench --peers"
    } else {
        "cargo xtask bench"
    };
    (
        format!("<!-- bench:{name} begin (written by {command}; edits inside are lost) -->\n"),
        format!("<!-- bench:{name} end -->\n"),
    )
}

/// Where section `name`'s begin marker line starts and ends in `doc`: found by its name, not
/// its whole text, so a marker written with other words is still the section's.
fn find_begin(doc: &str, name: &str) -> Option<(usize, usize)> {
    let start = doc.find(&format!("<!-- bench:{name} begin"))?;
    let line_end = doc[start..]
        .find('\n')
        .map_or(doc.len(), |at| start + at + 1);
    Some((start, line_end))
}

/// `doc` with section `name` (between its begin and end markers) replaced by `body`, or appended
/// when it has none. A document without any section (written before sections existed) is taken
/// as the local section whole, under the title.
pub fn update_section(doc: &str, name: &str, body: &str) -> String {
    let (begin, end) = markers(name);
    let mut body = body.to_owned();
    if !body.ends_with('\n') {
        body.push('\n');
    }
    if let Some((start, after)) = find_begin(doc, name) {
        if let Some(stop) = doc[after..].find(&end).map(|at| after + at) {
            return format!("{}{begin}{body}{}", &doc[..start], &doc[stop..]);
        }
    }
    let mut doc = doc.to_owned();
    if doc.trim().is_empty() {
        doc = DOC_TITLE.to_owned();
    } else if !doc.contains("<!-- bench:") {
        let old = doc.strip_prefix(DOC_TITLE).unwrap_or(&doc).to_owned();
        let (local_begin, local_end) = markers(LOCAL_SECTION);
        doc = format!("{DOC_TITLE}{local_begin}{old}");
        if !doc.ends_with('\n') {
            doc.push('\n');
        }
        doc.push_str(&local_end);
        if name == LOCAL_SECTION {
            return update_section(&doc, name, &body);
        }
    }
    if !doc.ends_with("\n\n") {
        doc.push('\n');
    }
    format!("{doc}{begin}{body}{end}")
}

/// The agent as an ordinary process on a Unix socket, killed on drop (and with us).
pub struct LocalAgent {
    child: Child,
    dir: PathBuf,
    pub socket: PathBuf,
    /// The options a client needs: the agent's secret (none when it runs `--insecure`).
    pub options: ConnectOptions,
}

impl LocalAgent {
    /// An agent with a fresh secret of its own, or `insecure`.
    pub fn start(binary: &Path, insecure: bool) -> Result<LocalAgent> {
        use std::io::{Read as _, Write as _};
        use std::os::unix::fs::OpenOptionsExt;
        let mode = if insecure { "insecure" } else { "secure" };
        remove_stale_agent_dirs();
        let dir = project_root()
            .join("target")
            .join(format!("bench-{}-{mode}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("agent.sock");
        let mut command = Command::new(binary);
        // The environment a guest's agent has, not cargo's: its commands inherit it, and the
        // `LD_LIBRARY_PATH` that `cargo run` sets sends every dynamic loader through four
        // directories first (≈150 µs per `/bin/true`, which the local baseline never pays).
        command.env_clear();
        if let Some(path) = std::env::var_os("PATH") {
            command.env("PATH", path);
        }
        command
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()));
        let mut options = ConnectOptions::default();
        if insecure {
            command.arg("--insecure");
        } else {
            let secret = dir.join("secret");
            let mut bytes = [0u8; 32];
            std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&secret)?
                .write_all(&bytes)?;
            command.arg("--secret-file").arg(&secret);
            options.secret = Some(ferry_host::read_secret_file(&secret)?);
        }
        crate::vm::die_with_parent(&mut command, true);
        // Its audit log (a line per operation) into a file, as a deployment keeps it, not onto
        // the table's terminal.
        let log = std::fs::File::create(dir.join("agent.log"))?;
        let child = command
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let agent = LocalAgent {
            child,
            dir,
            socket,
            options,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !agent.socket.exists() {
            if Instant::now() > deadline {
                bail!("the agent did not start listening");
            }
            thread::sleep(Duration::from_millis(5));
        }
        Ok(agent)
    }

    fn rss_kib(&self) -> Result<u64> {
        status_kib(self.child.id(), "VmRSS")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The secret file a CLI passes with `--secret-file` (none when `--insecure`).
    pub fn secret_file(&self) -> Option<PathBuf> {
        self.options
            .secret
            .as_ref()
            .map(|_| self.dir.join("secret"))
    }

    /// Waits (up to a second) until the agent is at rest: its listener's children are no more
    /// than its spares plus `open` kept connections, each asleep (a spare in `accept`, a kept
    /// connection awaiting its next request), so nothing the last operations started still
    /// runs in the background.
    fn settle(&self, open: usize) {
        let pid = self.child.id();
        let asleep = |child: &str| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| Some(stat.get(stat.rfind(')')? + 2..)?.starts_with('S')))
                .unwrap_or(true)
        };
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            let children: Vec<&str> = children.split_whitespace().collect();
            if children.len() <= SPARES + open && children.iter().all(|child| asleep(child)) {
                return;
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// The preforked spares (the listener's children while no connection is open).
    fn spares(&self) -> Result<Vec<u32>> {
        let pid = self.child.id();
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))?;
        let spares: Vec<u32> = children
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if spares.is_empty() {
            bail!("the agent has no spare connection process");
        }
        Ok(spares)
    }
}

/// Idle memory of a listener and its spares, from `smaps_rollup`. RSS counts a page in every
/// process that maps it; a spare shares almost all of its pages with the listener, so its
/// private memory and the processes' summed PSS say what the spares really cost.
pub struct IdleMemory {
    pub listener_rss: u64,
    pub spare_rss: u64,
    pub spare_private: u64,
    pub spares: usize,
    pub total_pss: u64,
}

impl IdleMemory {
    /// From `(pid, Rss, Pss, private)` lines, the listener's first.
    pub fn from_rollups(rollups: &[(u32, Rollup)]) -> Result<IdleMemory> {
        let ((_, listener), spares) = rollups.split_first().context("no listener")?;
        Ok(IdleMemory {
            listener_rss: listener.rss,
            spare_rss: spares.iter().map(|(_, r)| r.rss).max().unwrap_or(0),
            spare_private: spares.iter().map(|(_, r)| r.private).max().unwrap_or(0),
            spares: spares.len(),
            total_pss: rollups.iter().map(|(_, r)| r.pss).sum(),
        })
    }

    pub fn row(&self, metric: &str) -> Row {
        Row {
            metric: metric.into(),
            ferry: format!("{} KiB", self.listener_rss),
            baseline: format!(
                "+ {} spare connection processes, {} KiB RSS / {} KiB private each; {} KiB PSS in all",
                self.spares, self.spare_rss, self.spare_private, self.total_pss
            ),
            ratio: String::new(),
            target: "≤ 64 KiB".into(),
            verdict: Verdict::from(self.listener_rss <= 64),
        }
    }
}

/// The fields of `/proc/PID/smaps_rollup` the idle-memory row needs, in KiB.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rollup {
    pub rss: u64,
    pub pss: u64,
    /// Private_Clean + Private_Dirty.
    pub private: u64,
}

impl Rollup {
    pub fn parse(text: &str) -> Result<Rollup> {
        let mut rollup = Rollup::default();
        let mut seen = 0;
        for line in text.lines() {
            let mut fields = line.split_whitespace();
            let (Some(name), Some(kib)) = (fields.next(), fields.next()) else {
                continue;
            };
            let Ok(kib) = kib.parse::<u64>() else {
                continue;
            };
            match name {
                "Rss:" => rollup.rss = kib,
                "Pss:" => rollup.pss = kib,
                "Private_Clean:" | "Private_Dirty:" => rollup.private += kib,
                _ => continue,
            }
            seen += 1;
        }
        if seen < 4 {
            bail!("incomplete smaps_rollup: {text:?}");
        }
        Ok(rollup)
    }

    pub fn of(pid: u32) -> Result<Rollup> {
        Rollup::parse(&std::fs::read_to_string(format!(
            "/proc/{pid}/smaps_rollup"
        ))?)
    }
}

/// The directories of agents whose bench was killed (`target/bench-PID-MODE`, PID gone): their
/// secret and socket.
fn remove_stale_agent_dirs() {
    let Ok(entries) = std::fs::read_dir(project_root().join("target")) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("bench-"))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

impl Drop for LocalAgent {
    fn drop(&mut self) {
        crate::vm::signal_group(self.child.id(), libc::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find(|line| line.starts_with(field))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|kib| kib.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

fn local_rows(agent_bin: &Path, options: &BenchOptions, rows: &mut Vec<Row>) -> Result<()> {
    let agent = LocalAgent::start(agent_bin, false)?;
    // Let it settle into accept().
    thread::sleep(Duration::from_millis(200));
    let idle = agent.rss_kib()?;
    let mut rollups = vec![(agent.child.id(), Rollup::of(agent.child.id())?)];
    for spare in agent.spares()? {
        rollups.push((spare, Rollup::of(spare)?));
    }
    rows.push(IdleMemory::from_rollups(&rollups)?.row("agent idle RSS (listening)"));

    let target = Target::Unix(agent.socket.clone());
    // A connection per exec (the pool off): connect, hello and proof every time.
    let fresh = ferry_host::ConnectOptions {
        max_idle: 0,
        ..agent.options.clone()
    };
    let client = Client::new(&target, fresh);
    let settle = |open| {
        let agent = &agent;
        move || agent.settle(open)
    };
    let (ferry, local) =
        exec_round_trips(&client, Path::new("/bin/true"), options.runs, settle(0))?;
    let ratio = ferry.p50.as_secs_f64() / local.p50.as_secs_f64();
    rows.push(Row {
        metric: format!(
            "exec /bin/true p50, fresh connection ({} runs)",
            options.runs
        ),
        ferry: micros(ferry.p50),
        baseline: format!("{} fork+exec+wait", micros(local.p50)),
        ratio: format!("{ratio:.2}×"),
        target: "≤ 1.25×".into(),
        verdict: Verdict::from(ratio <= 1.25),
    });
    rows.push(Row {
        metric: format!("exec /bin/true p99 ({} runs)", options.runs),
        ferry: micros(ferry.p99),
        baseline: format!("{} fork+exec+wait", micros(local.p99)),
        ratio: format!("{:.2}×", ferry.p99.as_secs_f64() / local.p99.as_secs_f64()),
        target: String::new(),
        verdict: Verdict::Info,
    });
    // Protocol 5: every exec on the client's kept-alive connection.
    let reused = Client::new(&target, agent.options.clone());
    let (ferry, local) =
        exec_round_trips(&reused, Path::new("/bin/true"), options.runs, settle(1))?;
    let ratio = ferry.p50.as_secs_f64() / local.p50.as_secs_f64();
    rows.push(Row {
        metric: format!(
            "exec /bin/true round trip on a reused connection p50 ({} runs)",
            options.runs
        ),
        ferry: micros(ferry.p50),
        baseline: format!("{} fork+exec+wait", micros(local.p50)),
        ratio: format!("{ratio:.2}×"),
        target: "≤ 1.05×".into(),
        verdict: Verdict::from(ratio <= 1.05),
    });
    rows.push(Row {
        metric: format!(
            "exec /bin/true round trip on a reused connection p99 ({} runs)",
            options.runs
        ),
        ferry: micros(ferry.p99),
        baseline: format!("{} fork+exec+wait", micros(local.p99)),
        ratio: format!("{:.2}×", ferry.p99.as_secs_f64() / local.p99.as_secs_f64()),
        target: String::new(),
        verdict: Verdict::Info,
    });
    let hello = handshakes(&client, options.runs)?;
    rows.push(Row::info(
        format!("connect + handshake p50 / p99 ({} runs)", options.runs),
        format!("{} / {}", micros(hello.p50), micros(hello.p99)),
        "(the transport's and the authentication's share of an exec)".into(),
    ));
    rows.push(auth_overhead_row(agent_bin, &client, options.runs)?);
    rows.push(terminal_echo_row(&client, options.runs.min(2000), "")?);

    let mut ferry_rates = Vec::new();
    let mut raw_rates = Vec::new();
    for _ in 0..3 {
        ferry_rates.push(ferry_stream(&client, options.stream_bytes)?);
        raw_rates.push(raw_socket_stream(options.stream_bytes)?);
    }
    let ferry_best = ferry_rates.iter().cloned().fold(0.0, f64::max);
    let raw_best = raw_rates.iter().cloned().fold(0.0, f64::max);
    let ratio = ferry_best / raw_best;
    rows.push(Row {
        metric: format!("stdout stream {} (best of 3)", bytes(options.stream_bytes)),
        ferry: format!("{:.0} MB/s", ferry_best / 1e6),
        baseline: format!("{:.0} MB/s raw Unix socket", raw_best / 1e6),
        ratio: format!("{:.0}%", ratio * 100.0),
        target: "≥ 60%".into(),
        verdict: Verdict::from(ratio >= 0.60),
    });

    let mut ferry_rates = Vec::new();
    let mut raw_rates = Vec::new();
    for _ in 0..3 {
        ferry_rates.push(stdin_upload_rate(&client, options.stream_bytes)?);
        raw_rates.push(raw_socket_upload(options.stream_bytes)?);
    }
    rows.push(transfer_row(
        &format!(
            "stdin upload {} through `exec -i -- cat >/dev/null`",
            bytes(options.stream_bytes)
        ),
        &ferry_rates,
        &raw_rates,
        "raw Unix socket → relay → pipe → `cat`",
    ));

    crate::bench_files::local_file_rows(&client, options.stream_bytes, rows)?;

    // Work happens in forked connection processes: the listener must not have grown.
    rows.push(Row::not_grown(
        "agent RSS after the run",
        agent.rss_kib()?,
        idle,
    ));
    Ok(())
}

/// A byte's round trip through `cat` on a terminal in raw mode (what a keystroke costs in an
/// interactive session), next to the same `cat` on pipes: the terminal's own share.
pub fn terminal_echo_row(client: &Client, runs: usize, prefix: &str) -> Result<Row> {
    let echo = |pty: bool| -> Result<Vec<Duration>> {
        let mut command = ferry_host::Command::new("sh");
        command
            .args(["-c", "stty raw -echo 2>/dev/null; echo ready; exec cat"])
            .stdin(ferry_host::Stdin::Pipe);
        if pty {
            command.pty(ferry_host::WindowSize { rows: 24, cols: 80 });
        }
        let mut execution = client.spawn(&command)?;
        let mut stdin = execution.take_stdin().context("no stdin")?;
        let mut seen = Vec::new();
        // Until the terminal is raw and `cat` reads.
        while !seen.ends_with(b"ready\r\n") && !seen.ends_with(b"ready\n") {
            match execution.next_event()? {
                Some(ferry_host::Event::Stdout(data)) => seen.extend_from_slice(data),
                Some(ferry_host::Event::Stderr(_)) => {}
                other => bail!("the echo ended early: {other:?}"),
            }
        }
        let mut samples = Vec::with_capacity(runs);
        for i in 0..runs + 20 {
            let started = Instant::now();
            stdin.write_all(b"x")?;
            let mut echoed = 0;
            while echoed < 1 {
                match execution.next_event()? {
                    Some(ferry_host::Event::Stdout(data)) => echoed += data.len(),
                    Some(ferry_host::Event::Stderr(_)) => {}
                    other => bail!("the echo ended early: {other:?}"),
                }
            }
            if i >= 20 {
                samples.push(started.elapsed());
            }
        }
        stdin.close()?;
        drop(execution);
        Ok(samples)
    };
    let pty = percentiles(echo(true)?);
    let pipe = percentiles(echo(false)?);
    Ok(Row {
        metric: format!("{prefix}terminal echo p50 / p99 ({runs} keystrokes, `cat` raw)"),
        ferry: format!("{} / {}", micros(pty.p50), micros(pty.p99)),
        baseline: format!(
            "{} / {} the same `cat` on pipes",
            micros(pipe.p50),
            micros(pipe.p99)
        ),
        ratio: format!("{:.2}×", pty.p50.as_secs_f64() / pipe.p50.as_secs_f64()),
        target: String::new(),
        verdict: Verdict::Info,
    })
}

pub struct Percentiles {
    pub p50: Duration,
    pub p99: Duration,
}

pub fn percentiles(mut samples: Vec<Duration>) -> Percentiles {
    samples.sort();
    let at = |q: usize| samples[(samples.len() * q / 100).min(samples.len() - 1)];
    Percentiles {
        p50: at(50),
        p99: at(99),
    }
}

/// Round trips per block: ferry's and the local runs alternate block by block, so drift on the
/// machine hits both sides alike, while whatever an operation leaves running in the background
/// (a fresh connection's replacement spare, the agent's tidying after its answer) is paid by the
/// next operation of its own kind, not by the other side's.
const BLOCK: usize = 20;
/// The spares a listener keeps forked ahead.
const SPARES: usize = 2;

/// `program` through `client` and locally, `runs` times each, in alternating blocks; after
/// each block `settle` waits until what it left in the background (the spares the listener
/// forks after fresh connections) has ended, so the other side's block does not pay for it.
fn exec_round_trips(
    client: &Client,
    program: &Path,
    runs: usize,
    settle: impl Fn(),
) -> Result<(Percentiles, Percentiles)> {
    let command = ferry_host::Command::new(program);
    let mut ferry = Vec::with_capacity(runs);
    let mut local = Vec::with_capacity(runs);
    let warmup = runs / 20 + 10;
    for i in (0..runs + warmup).step_by(BLOCK) {
        let block = BLOCK.min(runs + warmup - i);
        for j in i..i + block {
            let started = Instant::now();
            let output = client.output(&command)?;
            let elapsed = started.elapsed();
            if !output.success() {
                bail!(
                    "{} failed through ferry: {:?}",
                    program.display(),
                    output.status
                );
            }
            if j >= warmup {
                ferry.push(elapsed);
            }
        }
        settle();
        for j in i..i + block {
            let started = Instant::now();
            crate::sys::fork_exec_wait(program)?;
            let elapsed = started.elapsed();
            if j >= warmup {
                local.push(elapsed);
            }
        }
        settle();
    }
    Ok((percentiles(ferry), percentiles(local)))
}

/// A connection, its hello and proof, and its close (`Client::health`), `runs` times.
fn handshakes(client: &Client, runs: usize) -> Result<Percentiles> {
    let mut hellos = Vec::with_capacity(runs);
    for i in 0..runs + runs / 20 + 10 {
        let started = Instant::now();
        client.health()?;
        if i >= runs / 20 + 10 {
            hellos.push(started.elapsed());
        }
    }
    Ok(percentiles(hellos))
}

/// What authentication costs an exec: the same exec against the authenticated agent and an
/// `--insecure` one, alternating round by round so noise hits both alike.
fn auth_overhead_row(agent_bin: &Path, secure: &Client, runs: usize) -> Result<Row> {
    let insecure_agent = LocalAgent::start(agent_bin, true)?;
    thread::sleep(Duration::from_millis(200));
    // A connection per exec on both sides (`secure` has its pool off): authentication is paid
    // once per connection, so a kept-alive one would hide it.
    let insecure = Client::new(
        &Target::Unix(insecure_agent.socket.clone()),
        ConnectOptions {
            max_idle: 0,
            ..insecure_agent.options.clone()
        },
    );
    let command = ferry_host::Command::new("/bin/true");
    let (mut with, mut without) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    let warmup = runs / 20 + 10;
    for i in 0..runs + warmup {
        for (client, times) in [(secure, &mut with), (&insecure, &mut without)] {
            let started = Instant::now();
            let output = client.output(&command)?;
            let elapsed = started.elapsed();
            if !output.success() {
                bail!("/bin/true failed through ferry: {:?}", output.status);
            }
            if i >= warmup {
                times.push(elapsed);
            }
        }
    }
    let (with, without) = (percentiles(with), percentiles(without));
    let ratio = with.p50.as_secs_f64() / without.p50.as_secs_f64();
    Ok(Row {
        metric: format!("authentication's cost: exec p50 ({runs} runs, interleaved)"),
        ferry: micros(with.p50),
        baseline: format!("{} with --insecure", micros(without.p50)),
        ratio: format!("{ratio:.3}×"),
        target: "< 1.03×".into(),
        verdict: Verdict::from(ratio < 1.03),
    })
}

/// Streams `total` zero bytes from `head` through the agent; returns bytes per second.
fn ferry_stream(client: &Client, total: u64) -> Result<f64> {
    let mut command = ferry_host::Command::new("head");
    command.args(["-c", &total.to_string(), "/dev/zero"]);
    stream_rate(client, &command, total)
}

/// Runs `command`, which must print exactly `total` bytes on stdout, and returns bytes per second
/// as the host received them.
pub fn stream_rate(client: &Client, command: &ferry_host::Command, total: u64) -> Result<f64> {
    let started = Instant::now();
    let mut execution = client.spawn(command)?;
    let mut received = 0u64;
    loop {
        match execution.next_event()? {
            Some(Event::Stdout(data)) => received += data.len() as u64,
            Some(Event::Stderr(data)) => bail!("stderr: {}", String::from_utf8_lossy(data)),
            Some(Event::Exited(end)) if end.success() => break,
            Some(Event::Exited(end)) => bail!("{command:?} failed: {:?}", end.status),
            None => bail!("no termination record"),
        }
    }
    let elapsed = started.elapsed();
    if received != total {
        bail!("received {received} of {total} bytes");
    }
    Ok(total as f64 / elapsed.as_secs_f64())
}

/// The same producer and the same socket type without ferry: `head` into a pipe, a relay
/// copying 64 KiB reads into a Unix socket, a reader counting. Bytes per second.
pub fn raw_socket_stream(total: u64) -> Result<f64> {
    let started = Instant::now();
    let mut producer = Command::new("head")
        .args(["-c", &total.to_string(), "/dev/zero"])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting head")?;
    let mut pipe = producer.stdout.take().context("head's stdout")?;
    let (mut tx, mut rx) = UnixStream::pair()?;
    let relay = thread::spawn(move || -> std::io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = pipe.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            tx.write_all(&buf[..n])?;
        }
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut received = 0u64;
    loop {
        let n = rx.read(&mut buf)?;
        if n == 0 {
            break;
        }
        received += n as u64;
    }
    relay
        .join()
        .map_err(|_| anyhow::anyhow!("relay thread panicked"))??;
    producer.wait()?;
    let elapsed = started.elapsed();
    if received != total {
        bail!("raw copy moved {received} of {total} bytes");
    }
    Ok(total as f64 / elapsed.as_secs_f64())
}

/// A row of transfer rates (best of each), ferry against the raw copy of the same bytes (which
/// `baseline` describes): the target is 80% of it.
pub fn transfer_row(metric: &str, ferry_rates: &[f64], raw_rates: &[f64], baseline: &str) -> Row {
    let ferry_best = ferry_rates.iter().cloned().fold(0.0, f64::max);
    let raw_best = raw_rates.iter().cloned().fold(0.0, f64::max);
    let ratio = ferry_best / raw_best;
    Row {
        metric: format!("{metric} (best of {})", ferry_rates.len()),
        ferry: format!("{:.0} MB/s", ferry_best / 1e6),
        baseline: format!("{:.0} MB/s {baseline}", raw_best / 1e6),
        ratio: format!("{:.0}%", ratio * 100.0),
        target: "≥ 80%".into(),
        verdict: Verdict::from(ratio >= 0.80),
    }
}

/// `total` zero bytes into `cat >/dev/null` through the agent's stdin; bytes per second until
/// the command's record came (so every byte was written into its pipe and read).
pub fn stdin_upload_rate(client: &Client, total: u64) -> Result<f64> {
    let mut command = ferry_host::Command::new("sh");
    command
        .args(["-c", "cat >/dev/null"])
        .stdin(ferry_host::Stdin::Pipe);
    let started = Instant::now();
    let mut execution = client.spawn(&command)?;
    let mut stdin = execution.take_stdin().context("a stdin pipe")?;
    let writer = thread::spawn(move || -> std::io::Result<()> {
        let chunk = vec![0u8; 256 * 1024];
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            stdin.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        stdin.close()
    });
    loop {
        match execution.next_event()? {
            Some(Event::Exited(end)) if end.success() => break,
            Some(Event::Exited(end)) => bail!("cat failed: {:?}", end.status),
            Some(_) => {}
            None => bail!("no termination record"),
        }
    }
    let elapsed = started.elapsed();
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("stdin writer panicked"))??;
    Ok(total as f64 / elapsed.as_secs_f64())
}

/// The same bytes the same way without ferry: a writer into a Unix socket, a relay copying
/// 64 KiB reads into `cat >/dev/null`'s stdin pipe. Bytes per second until `cat` exited.
pub fn raw_socket_upload(total: u64) -> Result<f64> {
    let started = Instant::now();
    let mut consumer = Command::new("sh")
        .args(["-c", "cat >/dev/null"])
        .stdin(Stdio::piped())
        .spawn()
        .context("starting cat")?;
    let mut pipe = consumer.stdin.take().context("cat's stdin")?;
    let (mut tx, mut rx) = UnixStream::pair()?;
    let relay = thread::spawn(move || -> std::io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = rx.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            pipe.write_all(&buf[..n])?;
        }
    });
    let chunk = vec![0u8; 256 * 1024];
    let mut left = total;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        tx.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    drop(tx);
    relay
        .join()
        .map_err(|_| anyhow::anyhow!("relay thread panicked"))??;
    let status = consumer.wait()?;
    if !status.success() {
        bail!("cat failed: {status}");
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

pub fn micros(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

pub fn bytes(n: u64) -> String {
    if n >= 1 << 30 && n.is_multiple_of(1 << 30) {
        format!("{} GiB", n >> 30)
    } else {
        format!("{} MiB", n >> 20)
    }
}

fn render(rows: &[Row], options: &BenchOptions) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "## ferry against its local baselines\n");
    let _ = writeln!(
        out,
        "Written by `cargo xtask bench{}` on {} ({} CPUs). Baselines run in the same process,",
        if options.vm { " --vm" } else { "" },
        machine(),
        thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let _ = writeln!(
        out,
        "interleaved with ferry's runs. Local rows: the agent as an ordinary process on a Unix"
    );
    let _ = writeln!(
        out,
        "socket. VM rows: the agent as PID 1 in QEMU (TCG) over virtio-vsock through vhost-device-vsock.\n"
    );
    let _ = writeln!(
        out,
        "| metric | ferry | baseline | ratio | target | |\n|---|---|---|---|---|---|"
    );
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            row.metric,
            row.ferry,
            row.baseline,
            row.ratio,
            row.target,
            row.verdict.mark()
        );
    }
    out
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, name)| name.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_owned())
        .unwrap_or_default();
    format!("{cpu}, Linux {kernel}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_second_bench_is_refused_until_the_first_ends() {
        let dir = std::env::temp_dir().join(format!("ferry-bench-lock-{}", std::process::id()));
        let path = dir.join("bench.lock");
        let first = super::lock_exclusive(&path).expect("first");
        let second = super::lock_exclusive(&path).expect_err("second");
        assert!(format!("{second:#}").contains("another `cargo xtask bench`"));
        drop(first);
        drop(super::lock_exclusive(&path).expect("after the first ended"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    use super::*;

    #[test]
    fn sections_keep_each_other() {
        // A document from before sections: its text becomes the local section.
        let legacy = "# ferry benchmarks\n\nold local table\n";
        let with_peers = update_section(legacy, PEERS_SECTION, "peers v1");
        assert!(with_peers.starts_with("# ferry benchmarks\n\n<!-- bench:local begin"));
        assert!(with_peers.contains("old local table\n<!-- bench:local end -->\n"));
        assert!(with_peers.contains("peers v1\n<!-- bench:peers end -->\n"));
        assert_eq!(with_peers.matches("# ferry benchmarks").count(), 1);

        let local = update_section(&with_peers, LOCAL_SECTION, "new local\n");
        assert!(!local.contains("old local table"));
        assert!(local.contains("new local\n<!-- bench:local end -->"));
        assert!(local.contains("peers v1\n"), "the peers section is kept");
        let peers = update_section(&local, PEERS_SECTION, "peers v2\n");
        assert!(peers.contains("new local\n"), "the local section is kept");
        assert!(peers.contains("peers v2\n") && !peers.contains("peers v1"));
        // Idempotent: the same body again changes nothing.
        assert_eq!(update_section(&peers, PEERS_SECTION, "peers v2\n"), peers);
        assert!(peers.contains("(written by cargo xtask bench --peers;"));
        // A begin marker in other words (an older file's) is still found and rewritten.
        let reworded = peers.replace(
            "written by cargo xtask bench --peers;",
            "written by an older xtask;",
        );
        let again = update_section(&reworded, PEERS_SECTION, "peers v3\n");
        assert_eq!(again.matches("bench:peers begin").count(), 1, "{again}");
        assert!(again.contains("(written by cargo xtask bench --peers;"));
        assert!(again.contains("peers v3\n") && !again.contains("peers v2"));

        // Legacy, and the local bench first: no duplicate of the old text.
        let local_first = update_section(legacy, LOCAL_SECTION, "fresh\n");
        assert!(!local_first.contains("old local table"));
        assert_eq!(local_first.matches("bench:local begin").count(), 1);
        // An empty document gets the title and the section.
        let fresh = update_section("", PEERS_SECTION, "p\n");
        assert!(fresh.starts_with("# ferry benchmarks\n\n<!-- bench:peers begin"));
        // Text a reader added outside the sections stays.
        let noted = format!("{peers}\nA note.\n");
        let again = update_section(&noted, LOCAL_SECTION, "x\n");
        assert!(again.ends_with("A note.\n"));
    }

    #[test]
    fn smaps_rollup_fields_are_summed() {
        let text =
            "00400000-7ffc [rollup]\nRss:                  64 kB\nPss:                  30 kB\n\
                    Pss_Dirty:            12 kB\nShared_Clean:         44 kB\n\
                    Private_Clean:         1 kB\nPrivate_Dirty:         4 kB\n";
        let rollup = Rollup::parse(text).unwrap();
        assert_eq!(
            rollup,
            Rollup {
                rss: 64,
                pss: 30,
                private: 5
            }
        );
        assert!(Rollup::parse("Rss: 4 kB\n").is_err());
        let spare = Rollup {
            rss: 56,
            pss: 18,
            private: 4,
        };
        let idle = IdleMemory::from_rollups(&[(1, rollup), (2, spare), (3, spare)]).unwrap();
        assert_eq!(
            (
                idle.listener_rss,
                idle.spare_rss,
                idle.spares,
                idle.total_pss
            ),
            (64, 56, 2, 66)
        );
    }
}
