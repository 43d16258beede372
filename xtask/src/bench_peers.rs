//! `cargo xtask bench --peers`: ferry next to what people use today, side by side in one run on
//! this machine: qemu-guest-agent, OpenSSH's sshd and dropbear (each on a reused connection),
//! ferry through its library and through its CLI, and the local floors (fork+exec+wait of
//! `/bin/true`; a raw Unix-socket copy).
//!
//! **Installing the peers without touching the system.** The peers come from Debian's packages,
//! fetched with `apt-get download` and unpacked with `dpkg-deb -x` into a private root
//! (`target/bench-peers/root`), with the libraries they need that the machine lacks (found from
//! each package's `Depends`, checked with `ldd`) unpacked beside them and reached through
//! `LD_LIBRARY_PATH` (which both ssh servers drop from their sessions' environments). No
//! maintainer script runs, so no service starts, no user is created, no key is generated in
//! /etc and there is nothing to purge; `apt-get install` would do all of these (openssh-server's
//! postinst adds the `sshd` user, which `purge` leaves behind, and it would upgrade the installed
//! openssh-client to its own version).
//!
//! What the two ssh servers expect of the system they get in a private mount namespace of their
//! own (see [`sys::PrivateView`]), gone with their last process: sshd, as root, wants its
//! privilege-separation user `sshd` and an empty root-owned `/run/sshd`, so it sees an
//! `/etc/passwd` with that user added and a fresh tmpfs on `/run`; dropbear has no option for
//! where authorized keys live (always `~/.ssh/authorized_keys`), so both see an `/etc/passwd` in
//! which root's home is a directory of this run (which also keeps this machine's `~/.bashrc`,
//! sourced by bash for every ssh command, out of the figures). /root, /etc and /run stay
//! untouched.
//!
//! **Nothing stays running.** Every daemon is started tied to us (`PR_SET_PDEATHSIG`, its own
//! process group) and killed on drop; SIGINT/SIGTERM set a flag the loops turn into an orderly
//! teardown; this process is a child subreaper, so whatever a daemon forked that outlives it (an
//! sshd connection process, which calls setsid) comes back to us, and the final sweep waits for,
//! kills and reaps every remaining child, and fails the run if it had to kill any.

use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_host::{Client, Target};

use crate::bench::{self, bytes, machine, micros, percentiles, LocalAgent, Rollup};
use crate::bench_qga::QgaClient;
use crate::sys::{self, PrivateView};
use crate::util::project_root;
use crate::vm::{die_with_parent, install_signal_handlers, interrupted, signal_group};

/// Knobs for one run.
#[derive(Debug, Clone)]
pub struct PeersOptions {
    /// Exec rounds (each one exec of every peer).
    pub runs: usize,
    /// Bytes per stream and upload trial.
    pub stream_bytes: u64,
}

/// The peers' Debian packages (openssh-client: the ssh client of the same release as the server).
const PACKAGES: &[&str] = &[
    "qemu-guest-agent",
    "openssh-server",
    "openssh-client",
    "dropbear-bin",
];
/// The plot's font, from the system or (when missing) unpacked like the peers.
const FONT_PACKAGE: &str = "fonts-dejavu-core";
const FONT: &str = "usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
/// Where the plot goes, relative to the project root (BENCHMARKS.md links it).
pub const PLOT: &str = "docs/bench-peers.png";
/// Throughput trials per peer and direction (the best is reported, the range beside it).
const TRIALS: usize = 3;
/// Bytes per `guest-file-write` (base64 on the wire).
const QGA_CHUNK: usize = 1 << 20;
/// The PATH every daemon and client here gets (cargo's environment stays out: its
/// `LD_LIBRARY_PATH` alone costs every dynamic loader ≈150 µs).
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long the final sweep waits for orphans (an sshd connection process whose client went
/// away) to exit by themselves before killing them.
const SWEEP_GRACE: Duration = Duration::from_secs(3);

pub fn run_peers(options: &PeersOptions) -> Result<()> {
    if options.runs == 0 || options.stream_bytes == 0 {
        bail!("--runs and the stream size must be positive");
    }
    let _one_at_a_time = bench::exclusive()?;
    install_signal_handlers();
    sys::become_subreaper()?;
    let started = Instant::now();
    let measured = measure(options);
    let mut strays = sweep_children(SWEEP_GRACE);
    let report = measured?;
    // And nothing listens any more on the ports the ssh servers had.
    for port in &report.ports {
        if TcpStream::connect(("127.0.0.1", *port)).is_ok() {
            strays.push(format!("something still listens on 127.0.0.1:{port}"));
        }
    }
    let section = render_section(&report, options);
    print!("{section}");
    bench::write_section(bench::PEERS_SECTION, &section)?;
    let plot = project_root().join(PLOT);
    crate::bench_plot::latency_ecdf(&plot, &report.font, &report.latency_series())?;
    eprintln!(
        "wrote {} ({:.0} s in all)",
        plot.display(),
        started.elapsed().as_secs_f64()
    );
    if !strays.is_empty() {
        bail!(
            "the teardown left processes or ports behind (processes killed now): {}",
            strays.join(", ")
        );
    }
    Ok(())
}

/// Everything measured, ready to render.
struct Report {
    peers: Vec<PeerResult>,
    versions: Vec<(String, String)>,
    warmup: usize,
    font: PathBuf,
    /// The ssh servers' ports, checked closed after the teardown.
    ports: Vec<u16>,
}

impl Report {
    fn latency_series(&self) -> Vec<(String, Vec<Duration>)> {
        self.peers
            .iter()
            .map(|p| (p.label.clone(), p.samples.clone()))
            .collect()
    }
}

/// One peer's figures.
#[derive(Debug, Clone, Default)]
pub struct PeerResult {
    pub label: String,
    pub samples: Vec<Duration>,
    pub streams: Vec<Moved>,
    pub uploads: Vec<Moved>,
    /// How the upload moves its bytes (stdin, a file write), shown in its cell.
    pub upload_how: String,
    pub daemon: Option<DaemonFigures>,
    /// Shares the daemon of the peer with this label (ferry's CLI and library: one agent).
    pub same_daemon_as: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct DaemonFigures {
    /// The listening process's VmRSS before any client connected, KiB.
    pub idle_rss: u64,
    /// Processes in the daemon's tree and their summed PSS (KiB) while one client's connection
    /// is kept open and idle (after the exec rounds).
    pub kept_processes: usize,
    pub kept_pss: u64,
    /// Their VmRSS summed (pages shared between them counted in each).
    pub kept_rss: u64,
    pub binary: u64,
    /// Distinct files mapped executable in the running daemon (its binary and every shared
    /// library) and their summed size.
    pub mapped_files: usize,
    pub mapped_bytes: u64,
}

/// A throughput trial's outcome.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Moved {
    /// Bytes per second, every byte delivered.
    Rate(f64),
    /// Only this many bytes came back (qemu-ga keeps the first 16 MiB of a command's output).
    Capped { returned: u64 },
}

trait Peer {
    fn exec_true(&mut self) -> Result<()>;
    fn stream(&mut self, total: u64) -> Result<Moved>;
    fn upload(&mut self, total: u64) -> Result<Moved>;
}

fn measure(options: &PeersOptions) -> Result<Report> {
    let root = PrivateRoot::prepare()?;
    let scratch = Scratch::create()?;
    let agent_bin = crate::build_agent::build_agent()?;
    let ferry_cli = crate::e2e::build_ferry_cli()?;

    // Each daemon's idle figure is taken right after it starts, before any client connects.
    let mut daemons: Vec<(usize, u32, PathBuf, u64)> = Vec::new();
    let agent = LocalAgent::start(&agent_bin, false)?;
    daemons.push((1, agent.pid(), agent_bin.clone(), idle_rss(agent.pid())?));
    let qga = Daemon::qemu_ga(&root, &scratch)?;
    daemons.push((3, qga.pid(), root.qemu_ga(), idle_rss(qga.pid())?));
    let keys = SshKeys::create(&root, &scratch)?;
    let sshd = Daemon::sshd(&root, &scratch, &keys)?;
    daemons.push((4, sshd.pid(), root.sshd(), idle_rss(sshd.pid())?));
    let dropbear = Daemon::dropbear(&root, &scratch, &keys)?;
    daemons.push((
        5,
        dropbear.pid(),
        root.dropbear(),
        idle_rss(dropbear.pid())?,
    ));
    keys.write_client_config(&[&sshd, &dropbear])?;

    let target = Target::Unix(agent.socket.clone());
    let mut local = LocalFloor;
    let mut ferry_lib = FerryLib {
        client: Client::new(&target, agent.options.clone()),
    };
    let mut ferry_cli = FerryCli {
        ferry: ferry_cli,
        target: format!("unix://{}", agent.socket.display()),
        secret: agent.secret_file(),
        log: scratch.dir.join("ferry-cli.stderr"),
    };
    let mut qemu_ga = QemuGa {
        client: QgaClient::connect(&scratch.dir.join("qga.sock"), Duration::from_secs(10))?,
    };
    let ssh_master = SshMaster::start(&root, &keys, &sshd)?;
    let dropbear_master = SshMaster::start(&root, &keys, &dropbear)?;
    let mut ssh = SshPeer::new(&root, &keys, &sshd);
    let mut dbear = SshPeer::new(&root, &keys, &dropbear);

    let mut results: Vec<PeerResult> = [
        ("local fork+exec+wait; raw socket copy", "socket → pipe"),
        ("ferry, library (kept connection)", "stdin"),
        ("ferry CLI, one process per operation", "stdin"),
        ("qemu-ga (guest-exec + status polling)", "file write"),
        ("OpenSSH, reused connection", "stdin"),
        ("dropbear, reused connection", "stdin"),
    ]
    .into_iter()
    .map(|(label, upload_how)| PeerResult {
        label: label.into(),
        upload_how: upload_how.into(),
        ..PeerResult::default()
    })
    .collect();
    results[2].same_daemon_as = Some(results[1].label.clone());

    {
        let mut peers: Vec<&mut dyn Peer> = vec![
            &mut local,
            &mut ferry_lib,
            &mut ferry_cli,
            &mut qemu_ga,
            &mut ssh,
            &mut dbear,
        ];
        let warmup = warmup(options.runs);
        eprintln!(
            "peers: {} exec rounds (+{warmup} warm-up) over {} peers",
            options.runs,
            peers.len()
        );
        for round in 0..options.runs + warmup {
            for (i, elapsed) in one_round(&mut peers, round, &results)? {
                if round >= warmup {
                    results[i].samples.push(elapsed);
                }
            }
        }
        // The connections are kept and idle now: what each daemon's tree holds.
        thread::sleep(Duration::from_millis(300));
        for (i, pid, binary, idle) in &daemons {
            results[*i].daemon = Some(daemon_figures(*pid, binary, *idle)?);
        }
        eprintln!(
            "peers: {TRIALS} stream and upload trials of {} each",
            bytes(options.stream_bytes)
        );
        for trial in 0..TRIALS {
            for i in rotation(peers.len(), trial) {
                check_interrupted()?;
                let moved = peers[i]
                    .stream(options.stream_bytes)
                    .with_context(|| format!("{}: stream", results[i].label))?;
                results[i].streams.push(moved);
            }
            for i in rotation(peers.len(), trial) {
                check_interrupted()?;
                let moved = peers[i]
                    .upload(options.stream_bytes)
                    .with_context(|| format!("{}: upload", results[i].label))?;
                results[i].uploads.push(moved);
            }
        }
    }
    let ports = vec![sshd.port, dropbear.port];
    // Orderly teardown: clients first (their connections close), then the daemons.
    drop(qemu_ga);
    drop(ferry_lib);
    drop(ssh_master);
    drop(dropbear_master);
    drop(sshd);
    drop(dropbear);
    drop(qga);
    drop(agent);

    let mut versions = root.versions.clone();
    versions.push(("ferry".into(), ferry_version()));
    Ok(Report {
        peers: results,
        versions,
        warmup: warmup(options.runs),
        font: root.font.clone(),
        ports,
    })
}

fn warmup(runs: usize) -> usize {
    runs / 20 + 10
}

/// Peer indices in round `round`'s order: the start rotates, so no peer always follows the
/// same one.
fn rotation(peers: usize, round: usize) -> impl Iterator<Item = usize> {
    (0..peers).map(move |k| (round + k) % peers)
}

/// One exec of every peer, in this round's order: `(peer index, round trip)`.
fn one_round(
    peers: &mut [&mut dyn Peer],
    round: usize,
    results: &[PeerResult],
) -> Result<Vec<(usize, Duration)>> {
    check_interrupted()?;
    let mut times = Vec::with_capacity(peers.len());
    for i in rotation(peers.len(), round) {
        let started = Instant::now();
        peers[i]
            .exec_true()
            .with_context(|| format!("{}: exec /bin/true (round {round})", results[i].label))?;
        times.push((i, started.elapsed()));
    }
    Ok(times)
}

fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The peers.

/// The floors: a local fork+exec+wait; raw Unix-socket copies for the transfers.
struct LocalFloor;

impl Peer for LocalFloor {
    fn exec_true(&mut self) -> Result<()> {
        sys::fork_exec_wait(Path::new("/bin/true"))
    }

    fn stream(&mut self, total: u64) -> Result<Moved> {
        bench::raw_socket_stream(total).map(Moved::Rate)
    }

    fn upload(&mut self, total: u64) -> Result<Moved> {
        bench::raw_socket_upload(total).map(Moved::Rate)
    }
}

struct FerryLib {
    client: Client,
}

impl Peer for FerryLib {
    fn exec_true(&mut self) -> Result<()> {
        let output = self.client.output(&ferry_host::Command::new("/bin/true"))?;
        if !output.success() {
            bail!("/bin/true failed: {:?}", output.status);
        }
        Ok(())
    }

    fn stream(&mut self, total: u64) -> Result<Moved> {
        let mut command = ferry_host::Command::new("head");
        command.args(["-c", &total.to_string(), "/dev/zero"]);
        bench::stream_rate(&self.client, &command, total).map(Moved::Rate)
    }

    fn upload(&mut self, total: u64) -> Result<Moved> {
        bench::stdin_upload_rate(&self.client, total).map(Moved::Rate)
    }
}

/// The `ferry` CLI, one process per operation (as a shell user or a script runs it).
struct FerryCli {
    ferry: PathBuf,
    target: String,
    secret: Option<PathBuf>,
    log: PathBuf,
}

impl FerryCli {
    fn command(&self, args: &[&str]) -> Command {
        let mut command = client_command(&self.ferry);
        command.arg("-c").arg(&self.target);
        if let Some(secret) = &self.secret {
            command.arg("--secret-file").arg(secret);
        }
        command.arg("exec").args(args);
        command
    }
}

impl Peer for FerryCli {
    fn exec_true(&mut self) -> Result<()> {
        run_quiet(self.command(&["/bin/true"]))
    }

    fn stream(&mut self, total: u64) -> Result<Moved> {
        let n = total.to_string();
        cli_stream(
            self.command(&["head", "-c", &n, "/dev/zero"]),
            total,
            &self.log,
        )
    }

    fn upload(&mut self, total: u64) -> Result<Moved> {
        cli_upload(
            self.command(&["-i", "--", "sh", "-c", "cat >/dev/null"]),
            total,
            &self.log,
        )
    }
}

struct QemuGa {
    client: QgaClient,
}

impl Peer for QemuGa {
    fn exec_true(&mut self) -> Result<()> {
        let pid = self.client.exec("/bin/true", &[])?;
        // Polled back to back: qemu-ga's best case (its users poll every few milliseconds).
        let status = self.client.wait(pid, Duration::ZERO)?;
        if status.exitcode != Some(0) {
            bail!("/bin/true ended {status:?}");
        }
        Ok(())
    }

    fn stream(&mut self, total: u64) -> Result<Moved> {
        let started = Instant::now();
        let pid = self
            .client
            .exec("/usr/bin/head", &["-c", &total.to_string(), "/dev/zero"])?;
        let status = self.client.wait(pid, Duration::from_millis(1))?;
        if status.exitcode != Some(0) {
            bail!("head ended {status:?}");
        }
        if status.out_truncated || status.out_bytes < total {
            return Ok(Moved::Capped {
                returned: status.out_bytes,
            });
        }
        Ok(Moved::Rate(total as f64 / started.elapsed().as_secs_f64()))
    }

    fn upload(&mut self, total: u64) -> Result<Moved> {
        let pattern = vec![0u8; QGA_CHUNK];
        let started = Instant::now();
        self.client
            .upload("/dev/null", &pattern, QGA_CHUNK, total)?;
        Ok(Moved::Rate(total as f64 / started.elapsed().as_secs_f64()))
    }
}

/// The ssh client on a connection its master keeps (`ssh -S`; the master runs `-M -N`, what
/// `ControlPersist` would keep in the background).
struct SshPeer {
    ssh: PathBuf,
    config: PathBuf,
    host: &'static str,
    log: PathBuf,
}

impl SshPeer {
    fn new(root: &PrivateRoot, keys: &SshKeys, server: &Daemon) -> SshPeer {
        SshPeer {
            ssh: root.ssh(),
            config: keys.client_config.clone(),
            host: server.host,
            log: keys.dir.join(format!("ssh-{}.stderr", server.host)),
        }
    }

    fn command(&self, remote: &str) -> Command {
        let mut command = client_command(&self.ssh);
        command
            .arg("-F")
            .arg(&self.config)
            .arg(self.host)
            .arg(remote);
        command
    }
}

impl Peer for SshPeer {
    fn exec_true(&mut self) -> Result<()> {
        run_quiet(self.command("/bin/true"))
    }

    fn stream(&mut self, total: u64) -> Result<Moved> {
        cli_stream(
            self.command(&format!("head -c {total} /dev/zero")),
            total,
            &self.log,
        )
    }

    fn upload(&mut self, total: u64) -> Result<Moved> {
        cli_upload(self.command("cat >/dev/null"), total, &self.log)
    }
}

/// A client program with a plain environment (PATH and HOME), as from a login shell.
fn client_command(program: &Path) -> Command {
    let mut command = Command::new(program);
    command.env_clear().env("PATH", PATH);
    if let Some(home) = std::env::var_os("HOME") {
        command.env("HOME", home);
    }
    command
}

/// Runs a client to completion with no input and no output expected.
fn run_quiet(mut command: Command) -> Result<()> {
    let output = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("starting {:?}", command.get_program()))?;
    if !output.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            command.get_program(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// A client printing `total` bytes on its stdout: bytes per second until it exited.
fn cli_stream(mut command: Command, total: u64, log: &Path) -> Result<Moved> {
    let started = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(fs::File::create(log)?)
        .spawn()
        .with_context(|| format!("starting {:?}", command.get_program()))?;
    let mut stdout = child.stdout.take().context("stdout")?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut received = 0u64;
    loop {
        let n = stdout.read(&mut buf)?;
        if n == 0 {
            break;
        }
        received += n as u64;
    }
    let status = child.wait()?;
    let elapsed = started.elapsed();
    if !status.success() || received != total {
        bail!(
            "{:?}: {status}, {received} of {total} bytes: {}",
            command.get_program(),
            fs::read_to_string(log).unwrap_or_default().trim()
        );
    }
    Ok(Moved::Rate(total as f64 / elapsed.as_secs_f64()))
}

/// A client forwarding `total` bytes from its stdin: bytes per second until it exited.
fn cli_upload(mut command: Command, total: u64, log: &Path) -> Result<Moved> {
    let started = Instant::now();
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(fs::File::create(log)?)
        .spawn()
        .with_context(|| format!("starting {:?}", command.get_program()))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let chunk = vec![0u8; 256 * 1024];
    let mut left = total;
    let written = (|| -> std::io::Result<()> {
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            stdin.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        Ok(())
    })();
    drop(stdin);
    let status = child.wait()?;
    let elapsed = started.elapsed();
    if let Err(err) = written {
        bail!(
            "{:?}: writing its stdin: {err}: {}",
            command.get_program(),
            fs::read_to_string(log).unwrap_or_default().trim()
        );
    }
    if !status.success() {
        bail!(
            "{:?}: {status}: {}",
            command.get_program(),
            fs::read_to_string(log).unwrap_or_default().trim()
        );
    }
    Ok(Moved::Rate(total as f64 / elapsed.as_secs_f64()))
}

// ---------------------------------------------------------------------------------------------
// The daemons.

/// A daemon of ours: its own process group, dies with us, killed (group and all) on drop.
struct Daemon {
    child: Child,
    name: &'static str,
    /// Its ssh client config `Host` (ssh servers only).
    host: &'static str,
    port: u16,
    /// Its `known_hosts` line (ssh servers only).
    host_key: String,
    log: PathBuf,
}

impl Daemon {
    fn spawn(
        name: &'static str,
        mut command: Command,
        view: Option<&PrivateView>,
        scratch: &Scratch,
        libs: Option<&std::ffi::OsStr>,
    ) -> Result<Daemon> {
        let log = scratch.dir.join(format!("{name}.log"));
        command.env_clear().env("PATH", PATH);
        if let Some(libs) = libs {
            command.env("LD_LIBRARY_PATH", libs);
        }
        command
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log)?)
            .stderr(fs::File::create(&log)?.try_clone()?);
        // The view first: the namespace is made before the death signal is armed, both before
        // exec.
        if let Some(view) = view {
            view.apply(&mut command)?;
        }
        die_with_parent(&mut command, true);
        let child = command
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", command.get_program()))?;
        Ok(Daemon {
            child,
            name,
            host: "",
            port: 0,
            host_key: String::new(),
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn failed(&mut self, what: &str) -> anyhow::Error {
        let status = self.child.try_wait().ok().flatten();
        anyhow!(
            "{} {what} ({}); its log:\n{}",
            self.name,
            status.map_or("still running".into(), |s| s.to_string()),
            fs::read_to_string(&self.log).unwrap_or_default().trim()
        )
    }

    /// Waits until it accepts TCP connections on 127.0.0.1:`port`.
    fn wait_tcp(&mut self, port: u16) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if self.child.try_wait()?.is_some() {
                return Err(self.failed("exited before listening"));
            }
            if Instant::now() > deadline || interrupted() {
                return Err(self.failed("is not listening"));
            }
            thread::sleep(Duration::from_millis(10));
        }
        // Let the connection process of that probe end before anyone measures.
        thread::sleep(Duration::from_millis(300));
        Ok(())
    }

    fn qemu_ga(root: &PrivateRoot, scratch: &Scratch) -> Result<Daemon> {
        let state = scratch.dir.join("qga-state");
        fs::create_dir_all(&state)?;
        let socket = scratch.dir.join("qga.sock");
        let mut command = Command::new(root.qemu_ga());
        command
            .args(["-m", "unix-listen", "-p"])
            .arg(&socket)
            .arg("-t")
            .arg(&state)
            .arg("-f")
            .arg(scratch.dir.join("qga.pid"));
        let mut daemon = Daemon::spawn("qemu-ga", command, None, scratch, None)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if daemon.child.try_wait()?.is_some() || Instant::now() > deadline || interrupted() {
                return Err(daemon.failed("did not create its socket"));
            }
            thread::sleep(Duration::from_millis(10));
        }
        thread::sleep(Duration::from_millis(300));
        Ok(daemon)
    }

    fn sshd(root: &PrivateRoot, scratch: &Scratch, keys: &SshKeys) -> Result<Daemon> {
        let port = free_port()?;
        let dir = &scratch.dir;
        let host_key = dir.join("ssh_host_ed25519_key");
        root.ssh_keygen(&host_key)?;
        let config = dir.join("sshd_config");
        fs::write(
            &config,
            sshd_config(
                port,
                &host_key,
                &keys.authorized_keys,
                &dir.join("sshd.pid"),
            ),
        )?;
        let passwd = dir.join("passwd-sshd");
        fs::write(
            &passwd,
            passwd_view(
                &fs::read_to_string("/etc/passwd")?,
                Some(keys.home_text()?),
                true,
            ),
        )?;
        let mut view = PrivateView {
            binds: vec![(passwd, "/etc/passwd".into())],
            tmpfs: Some(("/run".into(), vec!["/run/sshd".into()])),
        };
        add_shadow_view(&mut view, dir, "shadow-sshd")?;
        // sshd re-executes itself per connection: an absolute path.
        let mut command = Command::new(root.sshd());
        command.arg("-D").arg("-e").arg("-f").arg(&config);
        let mut daemon = Daemon::spawn("sshd", command, Some(&view), scratch, Some(&root.libs))?;
        daemon.wait_tcp(port)?;
        daemon.host = "sshd";
        daemon.port = port;
        daemon.host_key = fs::read_to_string(host_key.with_extension("pub"))?
            .trim()
            .to_owned();
        Ok(daemon)
    }

    fn dropbear(root: &PrivateRoot, scratch: &Scratch, keys: &SshKeys) -> Result<Daemon> {
        let port = free_port()?;
        let dir = &scratch.dir;
        let host_key = dir.join("dropbear_ed25519_host_key");
        let generated = root
            .tool(&root.dropbearkey())
            .args(["-t", "ed25519", "-f"])
            .arg(&host_key)
            .output()
            .context("running dropbearkey")?;
        if !generated.status.success() {
            bail!(
                "dropbearkey failed: {}",
                String::from_utf8_lossy(&generated.stderr)
            );
        }
        let public = String::from_utf8_lossy(&generated.stdout)
            .lines()
            .find(|l| l.starts_with("ssh-ed25519 "))
            .context("dropbearkey printed no public key")?
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let passwd = dir.join("passwd-dropbear");
        fs::write(
            &passwd,
            passwd_view(
                &fs::read_to_string("/etc/passwd")?,
                Some(keys.home_text()?),
                false,
            ),
        )?;
        let mut view = PrivateView {
            binds: vec![(passwd, "/etc/passwd".into())],
            tmpfs: None,
        };
        add_shadow_view(&mut view, dir, "shadow-dropbear")?;
        let mut command = Command::new(root.dropbear());
        command
            .args(["-F", "-E", "-s", "-m", "-p"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-r")
            .arg(&host_key)
            .arg("-P")
            .arg(dir.join("dropbear.pid"));
        let mut daemon =
            Daemon::spawn("dropbear", command, Some(&view), scratch, Some(&root.libs))?;
        daemon.wait_tcp(port)?;
        daemon.host = "dropbear";
        daemon.port = port;
        daemon.host_key = public;
        Ok(daemon)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        signal_group(self.child.id(), libc::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A root whose password field is locked (`!…`) cannot log in by key through an sshd without
/// PAM; the daemon's view then has a shadow file whose root entry is `*` (no password, not
/// locked). Nothing is bound when root's entry is fine as it is.
fn add_shadow_view(view: &mut PrivateView, dir: &Path, name: &str) -> Result<()> {
    let Ok(shadow) = fs::read_to_string("/etc/shadow") else {
        return Ok(());
    };
    if let Some(changed) = shadow_view(&shadow) {
        let path = dir.join(name);
        fs::write(&path, changed)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        view.binds.push((path, "/etc/shadow".into()));
    }
    Ok(())
}

/// `/etc/passwd` as a daemon's view shows it: root's home moved to `root_home`, and (for sshd)
/// the privilege-separation user `sshd` added when the system has none.
pub fn passwd_view(passwd: &str, root_home: Option<&str>, add_sshd: bool) -> String {
    let mut out = String::new();
    let mut uids = Vec::new();
    let mut has_sshd = false;
    for line in passwd.lines() {
        let mut fields: Vec<&str> = line.split(':').collect();
        if let Some(uid) = fields.get(2).and_then(|u| u.parse::<u32>().ok()) {
            uids.push(uid);
        }
        has_sshd |= fields.first() == Some(&"sshd");
        if let (Some(home), Some(&"root"), 7) = (root_home, fields.first(), fields.len()) {
            fields[5] = home;
            out.push_str(&fields.join(":"));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    if add_sshd && !has_sshd {
        let uid = (60000..65000)
            .rev()
            .find(|u| !uids.contains(u))
            .unwrap_or(64999);
        let _ = writeln!(out, "sshd:x:{uid}:65534::/run/sshd:/usr/sbin/nologin");
    }
    out
}

/// `/etc/shadow` with root's locked password field (`!…`) made `*`; `None` when unchanged.
pub fn shadow_view(shadow: &str) -> Option<String> {
    let mut changed = false;
    let mut out = String::new();
    for line in shadow.lines() {
        match line.split_once(':') {
            Some(("root", rest)) if rest.starts_with('!') => {
                let after = rest.split_once(':').map_or("", |(_, after)| after);
                let _ = writeln!(out, "root:*:{after}");
                changed = true;
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    changed.then_some(out)
}

fn sshd_config(port: u16, host_key: &Path, authorized_keys: &Path, pid_file: &Path) -> String {
    format!(
        "# ferry's peer benchmark: sshd on 127.0.0.1, keys and files of this run only.\n\
         ListenAddress 127.0.0.1:{port}\n\
         HostKey {}\n\
         PidFile {}\n\
         AuthorizedKeysFile {}\n\
         PermitRootLogin prohibit-password\n\
         PubkeyAuthentication yes\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         UsePAM no\n\
         StrictModes no\n\
         UseDNS no\n\
         PrintMotd no\n\
         PrintLastLog no\n\
         X11Forwarding no\n\
         AllowTcpForwarding no\n",
        host_key.display(),
        pid_file.display(),
        authorized_keys.display()
    )
}

/// The client's key, the servers' root home with its authorized_keys, known_hosts and the ssh
/// client config of this run.
struct SshKeys {
    dir: PathBuf,
    identity: PathBuf,
    /// Root's home as both servers see it: an empty directory of this run but for
    /// `.ssh/authorized_keys`. Where dropbear looks for keys (it has no option for that), and no
    /// `~/.bashrc`: bash sources it for every command an ssh server runs (Debian's bash checks
    /// `SSH_CLIENT`), and this machine's would be measured instead of the server.
    home: PathBuf,
    authorized_keys: PathBuf,
    known_hosts: PathBuf,
    client_config: PathBuf,
}

impl SshKeys {
    fn create(root: &PrivateRoot, scratch: &Scratch) -> Result<SshKeys> {
        let dir = scratch.dir.clone();
        let identity = dir.join("id_ed25519");
        root.ssh_keygen(&identity)?;
        let home = dir.join("home");
        let dot_ssh = home.join(".ssh");
        fs::create_dir_all(&dot_ssh)?;
        fs::set_permissions(&home, fs::Permissions::from_mode(0o700))?;
        fs::set_permissions(&dot_ssh, fs::Permissions::from_mode(0o700))?;
        let authorized_keys = dot_ssh.join("authorized_keys");
        fs::copy(identity.with_extension("pub"), &authorized_keys)?;
        fs::set_permissions(&authorized_keys, fs::Permissions::from_mode(0o600))?;
        Ok(SshKeys {
            known_hosts: dir.join("known_hosts"),
            client_config: dir.join("ssh_config"),
            identity,
            home,
            authorized_keys,
            dir,
        })
    }

    fn home_text(&self) -> Result<&str> {
        self.home
            .to_str()
            .context("the run directory's path is not UTF-8")
    }

    fn write_client_config(&self, servers: &[&Daemon]) -> Result<()> {
        let mut known = String::new();
        let mut config = String::new();
        for server in servers {
            let _ = writeln!(known, "[127.0.0.1]:{} {}", server.port, server.host_key);
            let _ = write!(
                config,
                "Host {host}\n\
                 \x20 HostName 127.0.0.1\n\
                 \x20 Port {port}\n\
                 \x20 User root\n\
                 \x20 IdentityFile {identity}\n\
                 \x20 IdentitiesOnly yes\n\
                 \x20 IdentityAgent none\n\
                 \x20 UserKnownHostsFile {known}\n\
                 \x20 GlobalKnownHostsFile /dev/null\n\
                 \x20 StrictHostKeyChecking yes\n\
                 \x20 CheckHostIP no\n\
                 \x20 UpdateHostKeys no\n\
                 \x20 BatchMode yes\n\
                 \x20 LogLevel ERROR\n\
                 \x20 ControlPath {control}\n\
                 \x20 ControlMaster no\n\n",
                host = server.host,
                port = server.port,
                identity = self.identity.display(),
                known = self.known_hosts.display(),
                control = self.dir.join(format!("ctl-{}", server.host)).display(),
            );
        }
        fs::write(&self.known_hosts, known)?;
        fs::write(&self.client_config, config)?;
        Ok(())
    }
}

/// An ssh master connection (`ssh -M -N`), ours until dropped.
struct SshMaster {
    child: Child,
}

impl SshMaster {
    fn start(root: &PrivateRoot, keys: &SshKeys, server: &Daemon) -> Result<SshMaster> {
        let log = keys.dir.join(format!("master-{}.log", server.host));
        let mut command = client_command(&root.ssh());
        command
            .arg("-F")
            .arg(&keys.client_config)
            .args(["-o", "ControlMaster=yes", "-o", "ControlPersist=no", "-N"])
            .arg(server.host)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?);
        die_with_parent(&mut command, true);
        let mut master = SshMaster {
            child: command.spawn().context("starting the ssh master")?,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let check = client_command(&root.ssh())
                .arg("-F")
                .arg(&keys.client_config)
                .args(["-O", "check"])
                .arg(server.host)
                .stdin(Stdio::null())
                .output()?;
            if check.status.success() {
                return Ok(master);
            }
            if master.child.try_wait()?.is_some() || Instant::now() > deadline || interrupted() {
                bail!(
                    "the ssh master to {} did not come up: {}\nthe server's log:\n{}",
                    server.name,
                    fs::read_to_string(&log).unwrap_or_default().trim(),
                    fs::read_to_string(&server.log).unwrap_or_default().trim()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for SshMaster {
    fn drop(&mut self) {
        signal_group(self.child.id(), libc::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

// ---------------------------------------------------------------------------------------------
// The private root: the peers' packages unpacked, never installed.

struct PrivateRoot {
    root: PathBuf,
    /// `LD_LIBRARY_PATH` for the unpacked binaries: the root's library directories.
    libs: std::ffi::OsString,
    /// `(package, version)` of every package unpacked.
    versions: Vec<(String, String)>,
    font: PathBuf,
}

impl PrivateRoot {
    fn prepare() -> Result<PrivateRoot> {
        let base = project_root().join("target").join("bench-peers");
        let debs = base.join("debs");
        fs::create_dir_all(&debs)?;
        let mut wanted: Vec<String> = PACKAGES.iter().map(|p| p.to_string()).collect();
        let mut files = Vec::new();
        let mut updated = false;
        let mut i = 0;
        while i < wanted.len() {
            let deb = match find_deb(&debs, &wanted[i])? {
                Some(deb) => deb,
                None => download(&debs, &wanted[i], &mut updated)?,
            };
            let depends = deb_field(&deb, "Depends").unwrap_or_default();
            for dep in library_depends(&depends) {
                if !wanted.contains(&dep) && !dpkg_installed(&dep) {
                    eprintln!(
                        "peers: {} needs {dep}, not installed: unpacking it too",
                        wanted[i]
                    );
                    wanted.push(dep);
                }
            }
            files.push(deb);
            i += 1;
        }
        let root = base.join("root");
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root)?;
        let mut versions = Vec::new();
        for deb in &files {
            crate::util::run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root))
                .with_context(|| format!("unpacking {}", deb.display()))?;
            versions.push((deb_field(deb, "Package")?, deb_field(deb, "Version")?));
        }
        let libs = std::env::join_paths([
            root.join("usr/lib/x86_64-linux-gnu"),
            root.join("lib/x86_64-linux-gnu"),
        ])?;
        let font = ensure_font()?;
        let prepared = PrivateRoot {
            root,
            libs,
            versions,
            font,
        };
        for binary in [
            prepared.qemu_ga(),
            prepared.sshd(),
            prepared.ssh(),
            prepared.dropbear(),
            prepared.dropbearkey(),
        ] {
            prepared.check_libraries(&binary)?;
        }
        Ok(prepared)
    }

    fn qemu_ga(&self) -> PathBuf {
        self.root.join("usr/sbin/qemu-ga")
    }
    fn sshd(&self) -> PathBuf {
        self.root.join("usr/sbin/sshd")
    }
    fn ssh(&self) -> PathBuf {
        self.root.join("usr/bin/ssh")
    }
    fn dropbear(&self) -> PathBuf {
        self.root.join("usr/sbin/dropbear")
    }
    fn dropbearkey(&self) -> PathBuf {
        self.root.join("usr/bin/dropbearkey")
    }

    /// One of the unpacked tools, with the root's libraries.
    fn tool(&self, program: &Path) -> Command {
        let mut command = Command::new(program);
        command
            .env_clear()
            .env("PATH", PATH)
            .env("LD_LIBRARY_PATH", &self.libs)
            .stdin(Stdio::null());
        command
    }

    fn ssh_keygen(&self, path: &Path) -> Result<()> {
        crate::util::run(
            self.tool(&self.root.join("usr/bin/ssh-keygen"))
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "ferry-bench", "-f"])
                .arg(path)
                .stdout(Stdio::null()),
        )
    }

    /// Fails when a library of `binary` resolves neither from the system nor from the root.
    fn check_libraries(&self, binary: &Path) -> Result<()> {
        let output = self
            .tool(Path::new("ldd"))
            .arg(binary)
            .output()
            .context("running ldd")?;
        let text = String::from_utf8_lossy(&output.stdout);
        let missing: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("not found"))
            .map(str::trim)
            .collect();
        if !output.status.success() || !missing.is_empty() {
            bail!(
                "{}: libraries missing after unpacking its dependencies: {missing:?} {}",
                binary.display(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }
}

/// The plot's font: the system's, or else fonts-dejavu-core unpacked under
/// `target/bench-peers/font` (nothing installed).
pub fn ensure_font() -> Result<PathBuf> {
    let system = Path::new("/").join(FONT);
    if system.exists() {
        return Ok(system);
    }
    let base = project_root().join("target").join("bench-peers");
    let unpacked = base.join("font").join(FONT);
    if unpacked.exists() {
        return Ok(unpacked);
    }
    let debs = base.join("debs");
    fs::create_dir_all(&debs)?;
    let deb = match find_deb(&debs, FONT_PACKAGE)? {
        Some(deb) => deb,
        None => download(&debs, FONT_PACKAGE, &mut false)?,
    };
    crate::util::run(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(base.join("font")),
    )?;
    if !unpacked.exists() {
        bail!("{} has no {FONT}", deb.display());
    }
    Ok(unpacked)
}

fn find_deb(dir: &Path, package: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(Some(dir.join(&*name)));
        }
    }
    Ok(None)
}

/// `apt-get download` into `dir` (after one `apt-get update` if apt does not know the package).
fn download(dir: &Path, package: &str, updated: &mut bool) -> Result<PathBuf> {
    loop {
        eprintln!("peers: apt-get download {package}");
        let status = Command::new("apt-get")
            .args(["download", "-qq", package])
            .current_dir(dir)
            .status()
            .context("running apt-get download")?;
        if status.success() {
            return find_deb(dir, package)?
                .with_context(|| format!("apt-get download left no {package}_*.deb"));
        }
        if *updated {
            bail!("apt-get download {package} failed");
        }
        crate::deps::apt_update()?;
        *updated = true;
    }
}

fn deb_field(deb: &Path, field: &str) -> Result<String> {
    let output = Command::new("dpkg-deb")
        .arg("-f")
        .arg(deb)
        .arg(field)
        .output()
        .context("running dpkg-deb -f")?;
    if !output.status.success() {
        bail!("dpkg-deb -f {} {field} failed", deb.display());
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// The shared-library packages a `Depends` field names (the first of each alternative, without
/// its version or architecture qualifier).
pub fn library_depends(depends: &str) -> Vec<String> {
    depends
        .split(',')
        .filter_map(|group| {
            let first = group.split('|').next()?.trim();
            let name = first.split([' ', '(']).next()?.trim();
            let name = name.split(':').next()?;
            (name.starts_with("lib") || name == "zlib1g").then(|| name.to_owned())
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Memory and size of a running daemon.

fn idle_rss(pid: u32) -> Result<u64> {
    bench::status_kib(pid, "VmRSS")
}

fn daemon_figures(pid: u32, binary: &Path, idle_rss: u64) -> Result<DaemonFigures> {
    let tree = process_tree(pid);
    let rollups: Vec<Rollup> = tree.iter().filter_map(|&p| Rollup::of(p).ok()).collect();
    let maps = fs::read_to_string(format!("/proc/{pid}/maps"))
        .with_context(|| format!("reading /proc/{pid}/maps"))?;
    let files = mapped_executables(&maps);
    let mapped_bytes = files
        .iter()
        .filter_map(|f| fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    Ok(DaemonFigures {
        idle_rss,
        kept_processes: rollups.len(),
        kept_pss: rollups.iter().map(|r| r.pss).sum(),
        kept_rss: rollups.iter().map(|r| r.rss).sum(),
        binary: fs::metadata(binary)?.len(),
        mapped_files: files.len(),
        mapped_bytes,
    })
}

/// `pid` and its descendants (from every thread's `children`).
fn process_tree(pid: u32) -> Vec<u32> {
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        tree.extend(children_of(tree[i]));
        i += 1;
    }
    tree
}

fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// The distinct files a process maps executable (its binary and shared libraries), from
/// `/proc/PID/maps`, in order of first appearance.
pub fn mapped_executables(maps: &str) -> Vec<String> {
    let mut files: Vec<String> = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(_range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        // offset, device, inode, then the path (which may hold spaces).
        let path = fields.skip(3).collect::<Vec<_>>().join(" ");
        let path = path.strip_suffix(" (deleted)").unwrap_or(&path);
        if perms.contains('x') && path.starts_with('/') && !files.iter().any(|f| f == path) {
            files.push(path.to_owned());
        }
    }
    files
}

// ---------------------------------------------------------------------------------------------
// Teardown.

/// This run's scratch directory (keys, configs, sockets, logs), removed on drop. Left-overs of
/// runs that were killed are removed first.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn create() -> Result<Scratch> {
        let base = project_root().join("target").join("bench-peers");
        fs::create_dir_all(&base)?;
        for entry in fs::read_dir(&base)?.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("run-")) else {
                continue;
            };
            if !Path::new("/proc").join(pid).exists() {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        let dir = base.join(format!("run-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        Ok(Scratch { dir })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Waits up to `grace` for our remaining children (orphans re-parented to us) to exit, reaping
/// them; kills and reaps what is still there after it. Returns those it had to kill.
fn sweep_children(grace: Duration) -> Vec<String> {
    let deadline = Instant::now() + grace;
    loop {
        while sys::reap_one().is_some() {}
        let children = children_of(std::process::id());
        if children.is_empty() {
            return Vec::new();
        }
        if Instant::now() >= deadline {
            let named: Vec<String> = children
                .iter()
                .map(|pid| {
                    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                    format!("{pid} ({})", comm.trim())
                })
                .collect();
            for &pid in &children {
                crate::vm::send_signal(pid, libc::SIGKILL);
            }
            let until = Instant::now() + Duration::from_secs(2);
            while !children_of(std::process::id()).is_empty() && Instant::now() < until {
                while sys::reap_one().is_some() {}
                thread::sleep(Duration::from_millis(10));
            }
            return named;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------
// The report.

fn ferry_version() -> String {
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(project_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .current_dir(project_root())
        .output()
        .is_ok_and(|o| !o.stdout.is_empty());
    format!(
        "{} at {commit}{}",
        env!("CARGO_PKG_VERSION"),
        if dirty { " (with local changes)" } else { "" }
    )
}

/// The table's cells for one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRow {
    pub cells: Vec<String>,
}

pub const HEADER: [&str; 12] = [
    "peer",
    "exec p50",
    "exec p99",
    "p50 − local spawn",
    "p50 ÷ local spawn",
    "p50 ÷ ferry library",
    "stdout stream",
    "upload",
    "idle RSS",
    "one kept connection",
    "binary",
    "with its libraries",
];

/// What a peer adds to a local spawn at p50, signed (noise can put ferry a little below it).
fn overhead_cell(seconds: f64) -> String {
    let micros = seconds * 1e6;
    if micros.is_nan() {
        return "—".into();
    }
    if micros.abs() >= 10_000.0 {
        format!("{:+.1} ms", micros / 1e3)
    } else {
        format!("{micros:+.0} µs")
    }
}

fn mb_s(rate: f64) -> String {
    format!("{:.0} MB/s", rate / 1e6)
}

/// Best of the trials, with the range when there are several.
pub fn transfer_cell(trials: &[Moved], total: u64) -> String {
    if let Some(returned) = trials.iter().find_map(|m| match m {
        Moved::Capped { returned } => Some(*returned),
        Moved::Rate(_) => None,
    }) {
        return format!(
            "not streamed: output capped, {} of {} returned",
            bytes_exact(returned),
            bytes(total)
        );
    }
    let rates: Vec<f64> = trials
        .iter()
        .filter_map(|m| match m {
            Moved::Rate(r) => Some(*r),
            Moved::Capped { .. } => None,
        })
        .collect();
    let best = rates.iter().cloned().fold(f64::NAN, f64::max);
    let worst = rates.iter().cloned().fold(f64::NAN, f64::min);
    match rates.len() {
        0 => "—".into(),
        1 => mb_s(best),
        _ => format!("{} ({:.0}–{:.0})", mb_s(best), worst / 1e6, best / 1e6),
    }
}

fn bytes_exact(n: u64) -> String {
    if n.is_multiple_of(1 << 20) {
        bytes(n)
    } else {
        format!("{n} B")
    }
}

fn kib(n: u64) -> String {
    if n >= 10 * 1024 {
        format!("{:.1} MiB", n as f64 / 1024.0)
    } else {
        format!("{n} KiB")
    }
}

fn size(n: u64) -> String {
    if n >= 1_000_000 {
        format!("{:.2} MB", n as f64 / 1e6)
    } else {
        format!("{:.0} KB", n as f64 / 1e3)
    }
}

/// The table rows: the first peer is the local floor, the second ferry's library.
pub fn table_rows(peers: &[PeerResult], total: u64) -> Vec<TableRow> {
    let p50 = |p: &PeerResult| percentiles(p.samples.clone()).p50.as_secs_f64();
    let local = peers.first().map(p50).unwrap_or(f64::NAN);
    let ferry = peers.get(1).map(p50).unwrap_or(f64::NAN);
    peers
        .iter()
        .map(|peer| {
            let pct = percentiles(peer.samples.clone());
            let mine = pct.p50.as_secs_f64();
            let daemon_cells = match (&peer.daemon, &peer.same_daemon_as) {
                (Some(d), _) => vec![
                    kib(d.idle_rss),
                    format!(
                        "{} PSS ({} RSS summed), {} process{}",
                        kib(d.kept_pss),
                        kib(d.kept_rss),
                        d.kept_processes,
                        if d.kept_processes == 1 { "" } else { "es" }
                    ),
                    size(d.binary),
                    format!("{} ({} files)", size(d.mapped_bytes), d.mapped_files),
                ],
                (None, Some(_)) => vec!["(the same agent)".into(); 4],
                (None, None) => vec!["".into(); 4],
            };
            let mut cells = vec![
                peer.label.clone(),
                micros(pct.p50),
                micros(pct.p99),
                overhead_cell(mine - local),
                format!("{:.2}×", mine / local),
                format!("{:.2}×", mine / ferry),
                transfer_cell(&peer.streams, total),
                match transfer_cell(&peer.uploads, total) {
                    cell if peer.upload_how.is_empty() => cell,
                    cell => format!("{cell}, {}", peer.upload_how),
                },
            ];
            cells.extend(daemon_cells);
            TableRow { cells }
        })
        .collect()
}

pub fn render_table(rows: &[TableRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "| {} |", HEADER.join(" | "));
    let _ = writeln!(out, "|{}", "---|".repeat(HEADER.len()));
    for row in rows {
        let cells: Vec<String> = row.cells.iter().map(|c| c.replace('|', "\\|")).collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    out
}

fn render_section(report: &Report, options: &PeersOptions) -> String {
    let total = options.stream_bytes;
    let mut out = String::new();
    let _ = writeln!(out, "## Side by side with the peers\n");
    let _ = writeln!(
        out,
        "Written by `cargo xtask bench --peers --runs {} --stream-mib {}` on {} ({} CPUs), \
         ferry {}. Every peer runs as a plain process on this machine (Unix socket or \
         127.0.0.1, no VM). Exec round trips of `/bin/true` are interleaved round by round: each \
         round runs one exec through every peer, the order rotating, {} rounds after {} of \
         warm-up. Transfers of {} alternate the same way, {TRIALS} trials each, the best shown \
         with the range.\n",
        options.runs,
        total >> 20,
        machine(),
        thread::available_parallelism().map_or(0, |n| n.get()),
        report
            .versions
            .iter()
            .find(|(p, _)| p == "ferry")
            .map_or("?", |(_, v)| v.as_str()),
        options.runs,
        report.warmup,
        bytes(total),
    );
    out.push_str(&render_table(&table_rows(&report.peers, total)));
    let _ = writeln!(
        out,
        "\n![exec round trip distributions, one curve per peer]({PLOT})\n"
    );
    let _ = writeln!(out, "How each is driven:\n");
    let _ = writeln!(
        out,
        "- **local**: fork + execve + waitpid of `/bin/true` from this process; transfers are the \
         same bytes through a raw Unix socket pair and a relay thread (stream: `head -c N \
         /dev/zero` → pipe → socket → counted; upload: socket → `cat >/dev/null`'s pipe).\n\
         - **ferry, library**: `ferry_host::Client` on the shipped static agent (`--listen \
         unix:…` with a secret), one kept connection; stream `head -c N /dev/zero`, upload into \
         the stdin of `sh -c 'cat >/dev/null'`.\n\
         - **ferry CLI**: the release `ferry` binary started per operation, like `ssh`: \
         `ferry -c unix://… --secret-file … exec /bin/true`, `exec head -c N /dev/zero`, \
         `exec -i -- sh -c 'cat >/dev/null'` with our bytes on its stdin.\n\
         - **qemu-ga**: `qemu-ga -m unix-listen -p SOCK` (state and pid files in the run's \
         directory); one connection, `guest-sync`, then `guest-exec` with `capture-output` and \
         `guest-exec-status` polled back to back until `exited` (its best case; its users poll \
         every few ms). Its stdout is not streamed: `guest-exec` keeps the first 16 MiB of a \
         command's output and hands it over, base64, when the command has ended. Upload: \
         `guest-file-open` of /dev/null, `guest-file-write` of 1 MiB base64 chunks, \
         `guest-file-close` (it has no stdin stream).\n\
         - **OpenSSH**: `sshd -D -e -f CONFIG` on 127.0.0.1 with its own host key, \
         authorized_keys and config (`UsePAM no`); the ssh client of the same release, \
         a master `ssh -M -N` keeps the connection and each operation is `ssh HOST CMD` over it \
         (`ControlPath`), default ciphers. Both ssh servers run commands through root's shell \
         (`bash -c CMD`, as ssh always does) with root's home an empty directory of the run \
         (bash sources `~/.bashrc` for ssh commands; a developer's would be measured instead).\n\
         - **dropbear**: `dropbear -F -E -s -m -p 127.0.0.1:PORT -r KEY`, driven by the same \
         OpenSSH client and master connection.\n"
    );
    let _ = writeln!(out, "What the columns count:\n");
    let _ = writeln!(
        out,
        "- **p50 − local spawn**: what the peer adds to a local spawn at p50 (its own cost, \
         the floor taken out; noise can make it slightly negative).\n\
         - **p50 ÷ local spawn**: the peer's exec p50 over the local fork+exec+wait p50 of the \
         same run; **p50 ÷ ferry library**: over ferry's library p50 (>1: slower than ferry).\n\
         - **idle RSS**: VmRSS of the listening process right after it started, before any \
         client connected (ferry's agent also keeps preforked spare connection processes, \
         counted in the next column).\n\
         - **one kept connection**: the summed PSS (shared pages split between the processes \
         that map them; the summed RSS beside it counts them in each) of every process of the daemon's tree while one client connection is \
         kept open and idle, after the exec rounds: sshd's listener and the connection's process \
         (for a root login sshd keeps no separate privileged monitor); dropbear's listener and \
         connection process; \
         ferry's listener, spares and connection process; qemu-ga's one process.\n\
         - **binary**: the daemon's executable file; **with its libraries**: the distinct files \
         the running daemon maps executable (from /proc/PID/maps: binary, loader, every shared \
         library), summed.\n"
    );
    let _ = writeln!(
        out,
        "Versions (Debian packages, fetched with `apt-get download` and unpacked with \
         `dpkg-deb -x` into `target/bench-peers/root`; nothing is installed, no maintainer \
         script runs):\n"
    );
    for (package, version) in &report.versions {
        let _ = writeln!(out, "- {package} {version}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_give_distinct_executable_files() {
        let maps = "\
55d0c0a00000-55d0c0a10000 r--p 00000000 fd:01 1234   /usr/sbin/sshd
55d0c0a10000-55d0c0a90000 r-xp 00010000 fd:01 1234   /usr/sbin/sshd
7f0000000000-7f0000020000 r-xp 00000000 fd:01 99     /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000020000-7f0000030000 r--p 00020000 fd:01 99     /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000040000-7f0000050000 r-xp 00000000 fd:01 77     /tmp/my lib.so (deleted)
7f0000060000-7f0000070000 rw-p 00000000 00:00 0
7f0000080000-7f0000090000 r--p 00000000 fd:01 55     /usr/lib/locale/locale-archive
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0      [vdso]
7ffd00003000-7ffd00004000 r-xp 00000000 fd:01 99     /usr/lib/x86_64-linux-gnu/libc.so.6
";
        assert_eq!(
            mapped_executables(maps),
            [
                "/usr/sbin/sshd",
                "/usr/lib/x86_64-linux-gnu/libc.so.6",
                "/tmp/my lib.so"
            ]
        );
        assert!(mapped_executables("garbage\n\n").is_empty());
    }

    #[test]
    fn library_dependencies_from_a_depends_field() {
        let depends = "libc6 (>= 2.36), libwrap0 (>= 7.6-4~) | libfoo1, zlib1g (>= 1:1.1.4), \
                       procps, ucf, libssl3:any (>= 3.0.0), debconf (>= 0.5) | debconf-2.0";
        assert_eq!(
            library_depends(depends),
            ["libc6", "libwrap0", "zlib1g", "libssl3"]
        );
        assert!(library_depends("").is_empty());
    }

    #[test]
    fn passwd_and_shadow_views() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534::/nonexistent:/usr/sbin/nologin\n";
        let dropbear = passwd_view(passwd, Some("/run-dir/home"), false);
        assert!(dropbear.starts_with("root:x:0:0:root:/run-dir/home:/bin/bash\n"));
        assert!(!dropbear.contains("sshd:"));
        let sshd = passwd_view(passwd, None, true);
        assert!(sshd.starts_with(passwd));
        assert!(sshd.ends_with(":65534::/run/sshd:/usr/sbin/nologin\n"));
        let with_sshd = format!("{passwd}sshd:x:105:65534::/run/sshd:/usr/sbin/nologin\n");
        assert_eq!(passwd_view(&with_sshd, None, true), with_sshd);

        assert_eq!(shadow_view("root:*:20228:0:99999:7:::\n"), None);
        assert_eq!(
            shadow_view("root:!$y$j9T$x:20228:0:99999:7:::\nbin:*:1::::::\n").as_deref(),
            Some("root:*:20228:0:99999:7:::\nbin:*:1::::::\n")
        );
    }

    fn peer(label: &str, micros: u64) -> PeerResult {
        PeerResult {
            label: label.into(),
            samples: (0..100)
                .map(|i| Duration::from_micros(micros + i))
                .collect(),
            ..PeerResult::default()
        }
    }

    #[test]
    fn table_ratios_and_caps() {
        let mut local = peer("local", 600);
        local.streams = vec![Moved::Rate(2e9), Moved::Rate(1.5e9)];
        let mut ferry = peer("ferry", 900);
        ferry.daemon = Some(DaemonFigures {
            idle_rss: 232,
            kept_processes: 4,
            kept_pss: 500,
            kept_rss: 900,
            binary: 159_192,
            mapped_files: 1,
            mapped_bytes: 159_192,
        });
        let mut cli = peer("cli", 1800);
        cli.same_daemon_as = Some("ferry".into());
        let mut qga = peer("qemu-ga", 1200);
        qga.streams = vec![Moved::Capped { returned: 16 << 20 }; 3];
        qga.uploads = vec![Moved::Rate(2e7)];
        qga.upload_how = "file write".into();
        let rows = table_rows(&[local, ferry, cli, qga], 256 << 20);
        // Columns from 3 on: overhead, ÷ local, ÷ ferry, stream, upload, RSS, kept, binary.
        assert_eq!(rows[0].cells[3], "+0 µs");
        assert_eq!(rows[1].cells[3], "+300 µs");
        assert_eq!(rows[0].cells[4], "1.00×");
        assert_eq!(rows[0].cells[6], "2000 MB/s (1500–2000)");
        assert_eq!(rows[1].cells[1], "950 µs");
        assert_eq!(rows[1].cells[5], "1.00×");
        assert_eq!(rows[1].cells[8], "232 KiB");
        assert_eq!(
            rows[1].cells[9],
            "500 KiB PSS (900 KiB RSS summed), 4 processes"
        );
        assert_eq!(rows[1].cells[10], "159 KB");
        assert_eq!(rows[2].cells[5], "1.95×");
        assert_eq!(rows[2].cells[8], "(the same agent)");
        assert_eq!(
            rows[3].cells[6],
            "not streamed: output capped, 16 MiB of 256 MiB returned"
        );
        assert_eq!(rows[3].cells[7], "20 MB/s, file write");
        assert_eq!(rows[3].cells[8], "");
        assert_eq!(overhead_cell(-0.000_004), "-4 µs");
        assert_eq!(overhead_cell(0.012_34), "+12.3 ms");

        let table = render_table(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2 + rows.len());
        assert!(lines[0].starts_with("| peer | exec p50 |"));
        // Every line has the header's column count.
        for line in &lines {
            assert_eq!(line.matches('|').count(), HEADER.len() + 1, "{line}");
        }
        let piped = render_table(&[TableRow {
            cells: vec!["a|b".into()],
        }]);
        assert!(piped.contains("a\\|b"));
    }
}
