//! A guest booted in QEMU with the agent as PID 1, reachable over virtio-vsock.
//!
//! Two backends, chosen by what the host offers: in-kernel vhost-vsock (`/dev/vhost-vsock` usable,
//! KVM) or, as on these CI machines, TCG plus vhost-user vsock through `vhost-device-vsock`
//! (REFERENCE.md §4). Either way readiness comes from the agent announcing itself (see
//! [`crate::ready`]), and no child process outlives the xtask: children die with it
//! (`PR_SET_PDEATHSIG`), are killed on drop, and SIGINT/SIGTERM only set a flag that the waiting
//! loops turn into an orderly teardown.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Once;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::arch::Arch;
use crate::deps::{ensure_tools, Tools};
use crate::initramfs::build_initramfs;
use crate::kernel::vm_dir;
use crate::machine::Machine;
use crate::ready::{ReadyInfo, ReadyListener};

/// The port the agent listens on (its default, `ferry.listen=vsock:1024`).
pub const AGENT_PORT: u32 = 1024;
/// The guest CID behind vhost-device-vsock: each daemon is its own little host, so it need not be
/// unique.
const VHOST_USER_GUEST_CID: u32 = 3;
/// How many console lines an error carries.
pub const CONSOLE_TAIL_LINES: usize = 60;

/// How to boot.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// The guest's architecture: x86_64 boots QEMU `microvm`, aarch64 `virt`.
    pub arch: Arch,
    /// Boot the image with only the agent and modules (no busybox).
    pub minimal: bool,
    /// The QEMU machine, and with it the vsock device's bus.
    pub machine: Machine,
    pub memory_mb: u32,
    pub cpus: u32,
    /// Where the guest's serial console goes; default `console.log` in the run directory.
    pub console_log: Option<PathBuf>,
    /// From QEMU's start to the agent's hello.
    pub ready_timeout: Duration,
    /// More kernel command-line words (`ferry.KEY=VALUE` policy settings, say).
    pub kernel_args: Vec<String>,
    /// Let the guest reboot: QEMU resets it instead of exiting (no `-no-reboot`), and
    /// [`Vm::wait_rebooted`] waits for its agent's next announcement. A guest panic then
    /// reboots it too.
    pub reboot: bool,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            arch: Arch::default(),
            minimal: false,
            machine: Machine::default(),
            memory_mb: 256,
            cpus: 1,
            console_log: None,
            // TCG boots in about 2 s; the margin is for loaded CI machines.
            ready_timeout: Duration::from_secs(60),
            kernel_args: Vec::new(),
            reboot: false,
        }
    }
}

/// A running guest. Dropping it kills QEMU and the vsock daemon; [`Vm::shutdown`] is the orderly
/// way.
///
/// NOTE: the children are tied to the *thread* that boots the VM (`PR_SET_PDEATHSIG` fires when
/// that thread exits): boot from the main thread or one that outlives the `Vm`.
pub struct Vm {
    dir: PathBuf,
    target: String,
    /// The host's copy of this guest's secret (0600); the guest's is /etc/ferry/secret (0400).
    secret: PathBuf,
    ready: ReadyInfo,
    console_log: PathBuf,
    minimal: bool,
    qemu: Option<Child>,
    daemon: Option<Child>,
    /// Kept for a rebooting guest's next announcement.
    ready_listener: Option<ReadyListener>,
}

/// Which vsock backend a boot uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `/dev/vhost-vsock` with KVM: AF_VSOCK on the host.
    VhostVsock { cid: u32 },
    /// TCG with `vhost-device-vsock`: hybrid vsock Unix sockets on the host.
    VhostUser,
}

impl Vm {
    /// Installs what is missing, builds the image, boots it and waits for the agent's
    /// announcement. On failure everything started is torn down and the error carries the tail of
    /// the guest console.
    pub fn boot(options: &VmOptions) -> Result<Vm> {
        let machine = options.machine.check_arch(options.arch)?;
        let tools = ensure_tools(options.arch)?;
        let image = build_initramfs(options.arch, options.minimal, machine.transport(), None)?;
        let run = RunDir::create()?;
        let console_log = options
            .console_log
            .clone()
            .unwrap_or_else(|| run.dir.join("console.log"));
        let backend = if tools.vhost_vsock {
            Backend::VhostVsock {
                cid: unique_cid(run.serial),
            }
        } else {
            Backend::VhostUser
        };
        let ready_port = ready_port(run.serial);
        install_signal_handlers();

        let mut vm = Vm {
            dir: run.dir.clone(),
            target: String::new(),
            secret: run.dir.join("secret"),
            ready: ReadyInfo {
                agent_version: String::new(),
                protocol_version: 0,
                report: ferry_wire::ReadyReport {
                    cid: 0,
                    init_started_us: 0,
                    modules_us: 0,
                    listening_us: 0,
                    module_times: ferry_wire::StrList::new(b""),
                },
                module_times: Vec::new(),
                boot_to_ready: Duration::ZERO,
            },
            console_log,
            minimal: options.minimal,
            qemu: None,
            daemon: None,
            ready_listener: None,
        };
        // From here on, an early return drops `vm`, which kills whatever was started.
        let hybrid_socket = run.dir.join("vm.vsock");
        let listener = match backend {
            Backend::VhostUser => {
                let vhost_socket = run.dir.join("vhost.sock");
                vm.daemon = Some(start_daemon(
                    &tools,
                    &run.dir,
                    &vhost_socket,
                    &hybrid_socket,
                )?);
                vm.target = format!("hvsock://{}:{AGENT_PORT}", hybrid_socket.display());
                ReadyListener::bind_unix(&run.dir.join(format!("vm.vsock_{ready_port}")))?
            }
            Backend::VhostVsock { cid } => {
                vm.target = format!("vsock://{cid}:{AGENT_PORT}");
                ReadyListener::bind_vsock(ready_port)?
            }
        };

        // A fresh secret per guest: the shared image stays secret-free, and the guest gets its
        // copy from a second archive appended to it (the kernel unpacks both).
        let initrd = run.dir.join("initrd.cpio");
        write_secret_and_initrd(&image.path, &vm.secret, &initrd)?;
        let config = QemuConfig {
            kernel: image.kernel.boot_image.clone(),
            initrd,
            console_log: vm.console_log.clone(),
            memory_mb: options.memory_mb,
            cpus: options.cpus,
            cmdline: [kernel_cmdline(options.arch, host_tsc_khz(), ready_port)]
                .into_iter()
                .chain(options.kernel_args.iter().cloned())
                .collect::<Vec<_>>()
                .join(" "),
            backend,
            machine,
            vhost_socket: run.dir.join("vhost.sock"),
            reboot: options.reboot,
        };
        let args = qemu_args(&config)?;
        let qemu_stderr = run.dir.join("qemu.stderr");
        let mut command = Command::new(&tools.qemu);
        command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&qemu_stderr).context("creating qemu.stderr")?);
        die_with_parent(&mut command, true);
        let spawned = Instant::now();
        vm.qemu = Some(
            command
                .spawn()
                .with_context(|| format!("starting {}", tools.qemu.display()))?,
        );

        let deadline = spawned + options.ready_timeout;
        let waited = listener.wait(spawned, deadline, || vm.check_alive(&qemu_stderr));
        match waited {
            Ok(ready) => {
                vm.ready = ready;
                vm.ready_listener = Some(listener);
            }
            Err(err) => {
                let image = if options.minimal {
                    "minimal image"
                } else {
                    "full image"
                };
                return Err(vm.with_console(err.context(format!("booting the guest ({image})"))));
            }
        }
        Ok(vm)
    }

    /// Waits for the agent's next announcement after the guest rebooted (booted with
    /// [`VmOptions::reboot`]); connecting before it would wedge vhost-device-vsock (REFERENCE.md
    /// §4, pitfall 1). Fails if QEMU exits meanwhile.
    pub fn wait_rebooted(&mut self, timeout: Duration) -> Result<ReadyInfo> {
        let listener = self
            .ready_listener
            .take()
            .context("no readiness listener: the guest never announced itself")?;
        let since = Instant::now();
        let qemu_stderr = self.dir.join("qemu.stderr");
        let waited = listener.wait(since, since + timeout, || self.check_alive(&qemu_stderr));
        self.ready_listener = Some(listener);
        let ready =
            waited.map_err(|err| self.with_console(err.context("waiting for the reboot")))?;
        self.ready = ready.clone();
        Ok(ready)
    }

    /// The `FERRY_CONNECT` value for this guest: `hvsock:///…/vm.vsock:1024` or
    /// `vsock://CID:1024`.
    pub fn target(&self) -> String {
        self.target.clone()
    }

    /// The host's copy of the guest's secret: the `FERRY_SECRET_FILE` value for this guest.
    pub fn secret_path(&self) -> &Path {
        &self.secret
    }

    /// Connect options for this guest: its secret, and `connect_timeout`.
    pub fn connect_options(&self, connect_timeout: Duration) -> Result<ferry_host::ConnectOptions> {
        Ok(ferry_host::ConnectOptions {
            connect_timeout,
            secret: Some(ferry_host::read_secret_file(&self.secret)?),
            ..ferry_host::ConnectOptions::default()
        })
    }

    /// What the agent announced and how long boot took.
    pub fn ready(&self) -> &ReadyInfo {
        &self.ready
    }

    /// The guest's serial console (kernel messages and the agent's log lines).
    pub fn console_log(&self) -> &Path {
        &self.console_log
    }

    /// The last `lines` lines of the console log.
    pub fn console_tail(&self, lines: usize) -> String {
        console_tail(&self.console_log, lines)
    }

    /// Whether QEMU is still running (it exits when the guest powers off or panics).
    pub fn running(&mut self) -> bool {
        match self.qemu.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(_))) | Some(Err(_)) | None => false,
        }
    }

    /// QEMU's process id, while it runs (for RSS figures).
    pub fn qemu_pid(&self) -> Option<u32> {
        self.qemu.as_ref().map(Child::id)
    }

    /// Asks the guest to power off (`poweroff -f` through the agent) when the image has busybox;
    /// best effort, it is followed by [`Vm::shutdown`] anyway.
    pub fn poweroff(&self) {
        if self.minimal {
            return;
        }
        let Ok(target) = ferry_host::Target::from_str(&self.target) else {
            return;
        };
        let Ok(options) = self.connect_options(Duration::from_secs(2)) else {
            return;
        };
        let client = ferry_host::Client::new(&target, options);
        let mut command = ferry_host::Command::new("poweroff");
        command.args(["-f"]).user("root");
        // The guest dies under the connection: an error here is the expected outcome.
        let _ = client.output(&command);
    }

    /// Stops the guest: waits briefly for QEMU to exit on its own (the caller may have powered the
    /// guest off), then SIGTERM, then SIGKILL; always stops the vsock daemon.
    pub fn shutdown(mut self) -> Result<()> {
        let qemu = self.qemu.take();
        let daemon = self.daemon.take();
        let qemu_result = match qemu {
            // A powered-off guest ends QEMU within about 60 ms; half a second is ample grace.
            Some(child) => stop_child(child, Duration::from_millis(500), Duration::from_secs(3))
                .map(|_| ())
                .context("stopping QEMU"),
            None => Ok(()),
        };
        let daemon_result = match daemon {
            Some(child) => stop_child(child, Duration::ZERO, Duration::from_secs(2))
                .map(|_| ())
                .context("stopping vhost-device-vsock"),
            None => Ok(()),
        };
        self.remove_sockets();
        qemu_result.and(daemon_result)
    }

    /// Fails when QEMU or the daemon died, or the user asked us to stop.
    fn check_alive(&mut self, qemu_stderr: &Path) -> Result<()> {
        if interrupted() {
            bail!("interrupted");
        }
        if let Some(qemu) = &mut self.qemu {
            if let Some(status) = qemu.try_wait()? {
                self.qemu = None;
                let stderr = std::fs::read_to_string(qemu_stderr).unwrap_or_default();
                bail!(
                    "QEMU exited ({status}) before the agent was ready\nQEMU's stderr:\n{stderr}"
                );
            }
        }
        if let Some(daemon) = &mut self.daemon {
            if let Some(status) = daemon.try_wait()? {
                self.daemon = None;
                bail!(
                    "vhost-device-vsock exited ({status}); its log: {}",
                    self.dir.join("vhost-device-vsock.log").display()
                );
            }
        }
        Ok(())
    }

    /// The error first, then the console: the reader sees what failed, then why.
    fn with_console(&self, err: anyhow::Error) -> anyhow::Error {
        anyhow!(
            "{err:#}\nguest console ({}), last {CONSOLE_TAIL_LINES} lines:\n{}",
            self.console_log.display(),
            self.console_tail(CONSOLE_TAIL_LINES)
        )
    }

    /// The sockets go; the logs stay for a post-mortem (stale run directories are removed by the
    /// next boot).
    fn remove_sockets(&self) {
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with("vm.vsock") || name == "vhost.sock" {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        for child in [self.qemu.take(), self.daemon.take()].into_iter().flatten() {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        self.remove_sockets();
    }
}

/// A fresh directory for one boot's sockets and logs.
struct RunDir {
    dir: PathBuf,
    /// Distinguishes boots within this process (ports, CIDs).
    serial: u32,
}

/// `sun_path` holds 108 bytes including the NUL.
const MAX_SOCKET_PATH: usize = 107;

impl RunDir {
    fn create() -> Result<RunDir> {
        static SERIAL: AtomicU32 = AtomicU32::new(0);
        let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
        let base = vm_dir();
        remove_stale_runs(&base);
        let name = format!("run-{}-{serial}", std::process::id());
        let mut dir = base.join(&name);
        // The longest socket name we create, with a port of up to 10 digits.
        if dir.join("vm.vsock_4294967295").as_os_str().len() > MAX_SOCKET_PATH {
            dir = std::env::temp_dir().join(format!("ferry-vm-{name}"));
        }
        if dir.to_string_lossy().contains(',') {
            // QEMU's option syntax splits on commas.
            bail!("the run directory {} contains a comma", dir.display());
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(RunDir { dir, serial })
    }
}

/// Removes `run-PID-N` directories whose process is gone.
fn remove_stale_runs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("run-"))
            .and_then(|n| n.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A readiness port unlikely to collide with another xtask's on the same host (it matters for
/// AF_VSOCK, where the port space is the host's; hybrid vsock sockets are per run directory).
fn ready_port(serial: u32) -> u32 {
    10_000 + (std::process::id() % 5_000) * 10 + serial % 10
}

/// A guest CID unique among this host's concurrent boots (CIDs 0–2 are reserved).
fn unique_cid(serial: u32) -> u32 {
    3 + (std::process::id() % 100_000) * 16 + serial % 16
}

fn start_daemon(tools: &Tools, dir: &Path, vhost_socket: &Path, hybrid: &Path) -> Result<Child> {
    let program = tools
        .vhost_device_vsock
        .as_ref()
        .context("vhost-device-vsock is needed without /dev/vhost-vsock")?;
    let log = File::create(dir.join("vhost-device-vsock.log"))
        .context("creating vhost-device-vsock.log")?;
    let mut command = Command::new(program);
    command
        .arg("--vm")
        .arg(format!(
            "guest-cid={VHOST_USER_GUEST_CID},socket={},uds-path={}",
            vhost_socket.display(),
            hybrid.display()
        ))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    die_with_parent(&mut command, true);
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    // QEMU must find the vhost-user socket when it starts.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !vhost_socket.exists() {
        let gone = child.try_wait()?;
        if gone.is_some() || Instant::now() > deadline || interrupted() {
            let _ = child.kill();
            let _ = child.wait();
            let log =
                std::fs::read_to_string(dir.join("vhost-device-vsock.log")).unwrap_or_default();
            bail!(
                "vhost-device-vsock did not create {} ({}); its log:\n{log}",
                vhost_socket.display(),
                gone.map_or("timed out".to_owned(), |s| s.to_string())
            );
        }
        thread::sleep(Duration::from_millis(2));
    }
    Ok(child)
}

/// Everything the QEMU command line is made of.
#[derive(Debug, Clone)]
struct QemuConfig {
    kernel: PathBuf,
    initrd: PathBuf,
    console_log: PathBuf,
    memory_mb: u32,
    cpus: u32,
    cmdline: String,
    backend: Backend,
    machine: Machine,
    vhost_socket: PathBuf,
    /// Let a guest reboot (no `-no-reboot`).
    reboot: bool,
}

/// The QEMU arguments. x86_64: the uncompressed kernel, booted directly (PVH), which is the
/// fastest path under TCG: on microvm (no PCI, no firmware, no option ROMs) with the vsock device
/// on virtio-mmio, or on q35 (firmware, ACPI, PCIe) with it on PCI. aarch64: `virt` booting the
/// `Image` directly (no firmware), console on its PL011, power-off and reset through PSCI, the
/// vsock device on one of its virtio-mmio slots or (virt-pci) on its PCIe host bridge. KVM only
/// for a guest of the host's own architecture; a foreign one runs under TCG whatever the vsock
/// backend.
fn qemu_args(config: &QemuConfig) -> Result<Vec<String>> {
    for path in [
        &config.kernel,
        &config.initrd,
        &config.console_log,
        &config.vhost_socket,
    ] {
        if path.to_string_lossy().contains(',') {
            bail!(
                "{} contains a comma, which QEMU options cannot hold",
                path.display()
            );
        }
    }
    let memory = format!("{}M", config.memory_mb);
    let machine = config.machine.qemu_name();
    let device = config.machine.transport().device_suffix();
    let mut args: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(|s| s.to_string()));
    let arch = config.machine.arch();
    let kvm = matches!(config.backend, Backend::VhostVsock { .. }) && arch.is_host();
    match config.backend {
        Backend::VhostUser => {
            // vhost-user maps guest memory into the daemon: it must be shared (pitfall 4).
            push(&["-M", &format!("{machine},memory-backend=mem")]);
            push(&[
                "-object",
                &format!("memory-backend-memfd,id=mem,size={memory},share=on"),
            ]);
        }
        Backend::VhostVsock { .. } => push(&["-M", machine]),
    }
    if kvm {
        push(&["-accel", "kvm", "-cpu", "host"]);
    } else {
        push(&["-accel", "tcg", "-cpu", tcg_cpu(arch)]);
    }
    push(&["-m", &memory, "-smp", &config.cpus.to_string()]);
    push(&["-nodefaults", "-no-user-config", "-nographic"]);
    if !config.reboot {
        // A guest reboot (or a panic, with `panic=-1`) ends QEMU.
        push(&["-no-reboot"]);
    }
    push(&["-kernel", &config.kernel.to_string_lossy()]);
    push(&["-initrd", &config.initrd.to_string_lossy()]);
    push(&["-append", &config.cmdline]);
    push(&[
        "-chardev",
        &format!("file,id=console,path={}", config.console_log.display()),
        "-serial",
        "chardev:console",
    ]);
    match config.backend {
        Backend::VhostUser => push(&[
            "-chardev",
            &format!("socket,id=vsock,path={}", config.vhost_socket.display()),
            "-device",
            &format!("vhost-user-vsock-{device},chardev=vsock"),
        ]),
        Backend::VhostVsock { cid } => {
            push(&["-device", &format!("vhost-vsock-{device},guest-cid={cid}")])
        }
    }
    Ok(args)
}

/// The CPU QEMU emulates under TCG.
fn tcg_cpu(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "max",
        // The plainest ARMv8.0 core boots fastest: every feature `max` adds is emulated work
        // (pointer authentication most of all: a block cipher per signed return). Boot-to-ready
        // on virt, 3 boots each: max 4.3–4.4 s, max,pauth-impdef=on 1.50–1.55 s, cortex-a72
        // 1.08–1.16 s, cortex-a57 1.00–1.08 s, cortex-a53 1.00–1.01 s (a57: the usual `virt`
        // example, and an out-of-order core like the servers this stands in for).
        Arch::Aarch64 => "cortex-a57",
    }
}

/// The guest kernel's command line. `quiet` because every console byte is slow under TCG;
/// on x86_64 `tsc_early_khz` because microvm under TCG otherwise hangs calibrating the TSC
/// (pitfall 3), with the other x86 clock flags; `panic=-1` so a guest panic ends QEMU instead of
/// hanging it.
fn kernel_cmdline(arch: Arch, tsc_khz: Option<u64>, ready_port: u32) -> String {
    let mut cmdline = format!("console={} panic=-1 quiet", arch.console());
    if arch == Arch::X86_64 {
        if let Some(khz) = tsc_khz {
            cmdline.push_str(&format!(" tsc_early_khz={khz}"));
        }
    }
    cmdline.push_str(" mitigations=off cryptomgr.notests");
    if arch == Arch::X86_64 {
        cmdline.push_str(" tsc=reliable no_timer_check");
    }
    cmdline.push_str(" audit=0");
    cmdline.push_str(&format!(" ferry.ready={ready_port}"));
    // The secret's path, never the secret: the command line is readable by every guest process.
    cmdline.push_str(&format!(" ferry.secret_file={GUEST_SECRET}"));
    // A development guest: `ferry exec -u root` (and `poweroff`) are allowed.
    cmdline.push_str(" ferry.allow_users=root");
    cmdline
}

/// Where the guest's copy of its secret lives (mode 0400, root's).
const GUEST_SECRET: &str = "/etc/ferry/secret";

/// Writes a fresh 32-byte secret to `secret` (0600, created anew) and `initrd`: the shared
/// `image` with a second archive behind it that holds the guest's copy.
fn write_secret_and_initrd(image: &Path, secret: &Path, initrd: &Path) -> Result<()> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let mut bytes = [0u8; 32];
    File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(secret)
        .and_then(|mut file| file.write_all(&bytes))
        .with_context(|| format!("writing {}", secret.display()))?;
    let mut out = std::io::BufWriter::new(
        File::create(initrd).with_context(|| format!("creating {}", initrd.display()))?,
    );
    let mut shared = File::open(image).with_context(|| format!("reading {}", image.display()))?;
    std::io::copy(&mut shared, &mut out)?;
    let mut cpio = crate::cpio::CpioWriter::new(out);
    cpio.file(GUEST_SECRET.trim_start_matches('/'), 0o400, &bytes)?;
    cpio.finish()?.into_inner()?.sync_all()?;
    Ok(())
}

/// The host's TSC frequency, which the guest sees too under TCG's `-cpu max`.
fn host_tsc_khz() -> Option<u64> {
    if let Ok(khz) = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz") {
        if let Ok(khz) = khz.trim().parse() {
            return Some(khz);
        }
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    parse_cpu_mhz_khz(&cpuinfo)
}

fn parse_cpu_mhz_khz(cpuinfo: &str) -> Option<u64> {
    cpuinfo
        .lines()
        .find(|line| line.starts_with("cpu MHz"))
        .and_then(|line| line.split_once(':'))
        .and_then(|(_, mhz)| mhz.trim().parse::<f64>().ok())
        .map(|mhz| (mhz * 1000.0).round() as u64)
}

/// The last `lines` lines of a log file (reads at most its last 64 KiB).
pub fn console_tail(path: &Path, lines: usize) -> String {
    let read = || -> io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) if text.trim().is_empty() => "(the console log is empty)".to_owned(),
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(err) => format!("(cannot read {}: {err})", path.display()),
    }
}

/// Waits up to `grace` for the child to exit by itself, then SIGTERM and up to `term_wait`, then
/// SIGKILL. Returns how it ended.
pub fn stop_child(mut child: Child, grace: Duration, term_wait: Duration) -> Result<ExitStatus> {
    if let Some(status) = wait_until(&mut child, Instant::now() + grace)? {
        return Ok(status);
    }
    send_signal(child.id(), libc::SIGTERM);
    if let Some(status) = wait_until(&mut child, Instant::now() + term_wait)? {
        return Ok(status);
    }
    child.kill().context("SIGKILL")?;
    child.wait().context("reaping")
}

/// Polls the child until it exits or the deadline passes.
pub fn wait_until(child: &mut Child, deadline: Instant) -> Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(5));
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether SIGINT or SIGTERM arrived since [`install_signal_handlers`].
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

extern "C" fn on_signal(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Turns SIGINT and SIGTERM into [`interrupted`] so the loops that wait on the guest can tear it
/// down instead of the process dying with children behind it. Idempotent.
#[allow(unsafe_code)]
pub fn install_signal_handlers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for signal in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
            unsafe {
                libc::signal(
                    signal,
                    on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
                )
            };
        }
    });
}

/// Ties a child to this process: it gets SIGKILL when we die, however we die. With `own_group`
/// it also leads its own process group, so a terminal's Ctrl-C reaches us, not it, we tear down
/// in order, and [`signal_group`] reaches its descendants.
#[allow(unsafe_code)]
pub fn die_with_parent(command: &mut Command, own_group: bool) {
    // SAFETY: getpid is always safe to call.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs between fork and exec and calls only async-signal-safe functions
    // (setpgid, prctl, getppid) on values copied before the fork.
    unsafe {
        command.pre_exec(move || {
            if own_group && libc::setpgid(0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        })
    };
}

/// `kill(pid, signal)`, ignoring a process that is already gone.
#[allow(unsafe_code)]
pub fn send_signal(pid: u32, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: plain syscall on a pid of our own child.
    unsafe { libc::kill(pid, signal) };
}

/// `kill(-pgid, signal)`: the whole process group a [`die_with_parent`] child leads.
#[allow(unsafe_code)]
pub fn signal_group(pgid: u32, signal: libc::c_int) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    if pgid <= 1 {
        return;
    }
    // SAFETY: plain syscall; a negative pid addresses the group that child leads.
    unsafe { libc::kill(-pgid, signal) };
}

/// Formats a child's exit status as a shell would: the code, or 128 + the signal.
pub fn shell_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(255)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_has_the_boot_flags_and_the_ready_port() {
        assert_eq!(
            kernel_cmdline(Arch::X86_64, Some(2_599_998), 10_123),
            "console=ttyS0 panic=-1 quiet tsc_early_khz=2599998 mitigations=off \
             cryptomgr.notests tsc=reliable no_timer_check audit=0 ferry.ready=10123 \
             ferry.secret_file=/etc/ferry/secret ferry.allow_users=root"
        );
        assert!(!kernel_cmdline(Arch::X86_64, None, 1).contains("tsc_early_khz"));
        let arm = kernel_cmdline(Arch::Aarch64, Some(2_599_998), 1);
        assert!(arm.starts_with("console=ttyAMA0 panic=-1 quiet"), "{arm}");
        assert!(!arm.contains("tsc"), "{arm}");
    }

    #[test]
    fn cpu_mhz_becomes_khz() {
        let cpuinfo = "processor\t: 0\nmodel name\t: X\ncpu MHz\t\t: 2599.998\n";
        assert_eq!(parse_cpu_mhz_khz(cpuinfo), Some(2_599_998));
        assert_eq!(parse_cpu_mhz_khz("nothing"), None);
    }

    fn config(backend: Backend) -> QemuConfig {
        QemuConfig {
            kernel: "/k/vmlinux".into(),
            initrd: "/k/initrd.cpio".into(),
            console_log: "/r/console.log".into(),
            memory_mb: 256,
            cpus: 1,
            cmdline: "console=ttyS0".into(),
            backend,
            machine: Machine::Microvm,
            vhost_socket: "/r/vhost.sock".into(),
            reboot: false,
        }
    }

    #[test]
    fn only_a_rebooting_guest_lets_qemu_reset_it() {
        let args = qemu_args(&config(Backend::VhostUser)).expect("valid");
        assert!(args.iter().any(|a| a == "-no-reboot"));
        let rebooting = QemuConfig {
            reboot: true,
            ..config(Backend::VhostUser)
        };
        let args = qemu_args(&rebooting).expect("valid");
        assert!(!args.iter().any(|a| a == "-no-reboot"));
    }

    #[test]
    fn vhost_user_args_share_memory() {
        let args = qemu_args(&config(Backend::VhostUser))
            .expect("valid")
            .join(" ");
        assert!(args.contains("-M microvm,memory-backend=mem"), "{args}");
        assert!(args.contains("memory-backend-memfd,id=mem,size=256M,share=on"));
        assert!(args.contains("-accel tcg"));
        assert!(args.contains("socket,id=vsock,path=/r/vhost.sock"));
        assert!(args.contains("vhost-user-vsock-device,chardev=vsock"));
        assert!(args.contains("file,id=console,path=/r/console.log"));
    }

    #[test]
    fn vhost_vsock_args_use_kvm_and_the_cid() {
        let args = qemu_args(&config(Backend::VhostVsock { cid: 42 }))
            .expect("valid")
            .join(" ");
        assert!(args.contains("-accel kvm"), "{args}");
        assert!(args.contains("vhost-vsock-device,guest-cid=42"));
        assert!(!args.contains("memfd"));
    }

    #[test]
    fn q35_puts_the_vsock_device_on_pci() {
        let q35 = |backend| QemuConfig {
            machine: Machine::Q35,
            ..config(backend)
        };
        let args = qemu_args(&q35(Backend::VhostUser))
            .expect("valid")
            .join(" ");
        assert!(args.contains("-M q35,memory-backend=mem"), "{args}");
        assert!(
            args.contains("vhost-user-vsock-pci,chardev=vsock"),
            "{args}"
        );
        let args = qemu_args(&q35(Backend::VhostVsock { cid: 7 }))
            .expect("valid")
            .join(" ");
        assert!(args.contains("-M q35 -accel kvm"), "{args}");
        assert!(args.contains("vhost-vsock-pci,guest-cid=7"), "{args}");
    }

    #[test]
    fn aarch64_boots_virt_under_tcg_on_a_foreign_host() {
        for (machine, device) in [(Machine::Virt, "device"), (Machine::VirtPci, "pci")] {
            let on = |backend| QemuConfig {
                machine,
                ..config(backend)
            };
            let args = qemu_args(&on(Backend::VhostUser)).expect("valid").join(" ");
            assert!(args.contains("-M virt,memory-backend=mem"), "{args}");
            assert!(
                args.contains(&format!("vhost-user-vsock-{device},chardev=vsock")),
                "{args}"
            );
            let args = qemu_args(&on(Backend::VhostVsock { cid: 7 }))
                .expect("valid")
                .join(" ");
            assert!(args.contains("-M virt "), "{args}");
            assert!(
                args.contains(&format!("vhost-vsock-{device},guest-cid=7")),
                "{args}"
            );
            // No KVM for a foreign architecture, whatever the vsock backend.
            if !Arch::Aarch64.is_host() {
                assert!(args.contains("-accel tcg -cpu cortex-a57"), "{args}");
            }
        }
    }

    #[test]
    fn commas_in_paths_are_refused() {
        let mut bad = config(Backend::VhostUser);
        bad.console_log = "/r/a,b.log".into();
        assert!(qemu_args(&bad).is_err());
    }

    #[test]
    fn console_tail_takes_the_last_lines() {
        let path = std::env::temp_dir().join(format!("ferry-tail-{}", std::process::id()));
        std::fs::write(&path, "a\nb\nc\nd\n").expect("write");
        assert_eq!(console_tail(&path, 2), "c\nd");
        assert_eq!(console_tail(&path, 10), "a\nb\nc\nd");
        let _ = std::fs::remove_file(&path);
        assert!(console_tail(&path, 2).contains("cannot read"));
    }
}
