//! The host tools the VM harness needs, checked and (on Debian) installed when missing: QEMU
//! for the guest's architecture, Debian's static busybox, the musl target, and
//! `vhost-device-vsock` when the kernel offers no usable `/dev/vhost-vsock`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::arch::Arch;
use crate::util::run;

/// The vhost-user vsock daemon, pinned: its command-line syntax changes between releases.
const VHOST_DEVICE_VSOCK: &str = "vhost-device-vsock";
const VHOST_DEVICE_VSOCK_VERSION: &str = "0.3.0";
/// Where Debian's `busybox-static` puts its binary.
pub const BUSYBOX: &str = "/bin/busybox";
const VHOST_VSOCK_DEV: &str = "/dev/vhost-vsock";

/// What [`ensure_tools`] found.
#[derive(Debug, Clone)]
pub struct Tools {
    pub qemu: PathBuf,
    /// `/dev/vhost-vsock` opens read-write: QEMU can use in-kernel vsock, no daemon needed.
    pub vhost_vsock: bool,
    /// The vhost-user daemon; `None` only when `vhost_vsock` is usable.
    pub vhost_device_vsock: Option<PathBuf>,
}

/// Checks every tool the VM harness needs for `arch`'s guests and installs the missing ones.
/// The host's busybox-static is needed for every architecture: it lists the applets the image
/// links (see [`crate::initramfs`]).
pub fn ensure_tools(arch: Arch) -> Result<Tools> {
    let (qemu_program, qemu_package) = arch.qemu();
    let mut apt = Vec::new();
    if find_program(qemu_program).is_none() {
        apt.push(qemu_package);
    }
    if !busybox_static_installed() {
        apt.push("busybox-static");
    }
    if !apt.is_empty() {
        apt_update()?;
        apt_install(&apt)?;
    }
    let qemu = find_program(qemu_program).with_context(|| {
        format!("{qemu_program} is still missing after installing {qemu_package}")
    })?;
    ensure_busybox()?;
    ensure_musl_target(arch)?;

    let vhost_vsock = vhost_vsock_usable();
    let vhost_device_vsock = if vhost_vsock {
        None
    } else {
        Some(ensure_vhost_device_vsock()?)
    };
    Ok(Tools {
        qemu,
        vhost_vsock,
        vhost_device_vsock,
    })
}

/// Whether QEMU could use the in-kernel vsock backend: the device exists and opens read-write
/// (it may exist without permission, or without a working module behind it).
pub fn vhost_vsock_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(VHOST_VSOCK_DEV)
        .is_ok()
}

/// `apt-get update`, quietly unless it fails.
pub fn apt_update() -> Result<()> {
    eprintln!("deps: apt-get update");
    run(privileged("apt-get")
        .args(["update", "-qq"])
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("apt-get update")
}

/// `apt-get install` without recommends (QEMU's would pull in a desktop's worth).
pub fn apt_install(packages: &[&str]) -> Result<()> {
    eprintln!("deps: installing {}", packages.join(" "));
    run(privileged("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| format!("installing {}", packages.join(" ")))
}

/// A program from PATH, or from cargo's bin directory (which is often not on PATH).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let cargo_bin = cargo_home().map(|home| home.join("bin"));
    std::env::split_paths(&path)
        .chain(cargo_bin)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
}

fn cargo_home() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
}

/// Debian's static busybox at [`BUSYBOX`], for the guest image's shell and tools.
pub fn ensure_busybox() -> Result<()> {
    if !busybox_static_installed() {
        apt_update()?;
        apt_install(&["busybox-static"])?;
    }
    if !Path::new(BUSYBOX).exists() {
        bail!("{BUSYBOX} is missing after installing busybox-static");
    }
    Ok(())
}

/// The dynamic `busybox` package also provides /bin/busybox, but it cannot run in an image without
/// a libc: ask dpkg for the static one.
fn busybox_static_installed() -> bool {
    debian_package_installed("busybox-static")
}

fn debian_package_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|out| out.status.success() && out.stdout.ends_with(b"install ok installed"))
}

/// Whether this process runs as root (owns `/proc/self`).
pub fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Root runs apt directly; anyone else goes through sudo.
fn privileged(program: &str) -> Command {
    if running_as_root() {
        Command::new(program)
    } else {
        let mut cmd = Command::new("sudo");
        cmd.arg(program);
        cmd
    }
}

/// The agent's target for `arch`, added through rustup when missing.
pub fn ensure_musl_target(arch: Arch) -> Result<()> {
    let target = arch.agent_target();
    let Ok(output) = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
    else {
        // No rustup: the toolchain is managed some other way; the agent build will say so.
        eprintln!("deps: rustup not found; assuming the {target} target is available");
        return Ok(());
    };
    let installed = String::from_utf8_lossy(&output.stdout);
    if installed.lines().any(|line| line.trim() == target) {
        return Ok(());
    }
    eprintln!("deps: rustup target add {target}");
    run(Command::new("rustup").args(["target", "add", target]))
}

fn ensure_vhost_device_vsock() -> Result<PathBuf> {
    if let Some(path) = find_program(VHOST_DEVICE_VSOCK) {
        return Ok(path);
    }
    eprintln!(
        "deps: cargo install --locked {VHOST_DEVICE_VSOCK}@{VHOST_DEVICE_VSOCK_VERSION} (about 2 minutes)"
    );
    // A concurrent install of the same crate waits on cargo's lock and then finds it installed.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // Run outside the workspace so its .cargo/config.toml does not apply.
    run(Command::new(cargo)
        .args([
            "install",
            "--locked",
            &format!("{VHOST_DEVICE_VSOCK}@{VHOST_DEVICE_VSOCK_VERSION}"),
        ])
        .current_dir(std::env::temp_dir()))
    .context("installing vhost-device-vsock")?;
    find_program(VHOST_DEVICE_VSOCK)
        .context("vhost-device-vsock is not on PATH or in cargo's bin after cargo install")
}
