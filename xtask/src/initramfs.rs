//! `cargo xtask initramfs`: the guest image, a newc cpio with the agent as `/init`, the vsock
//! modules and their load order, and (unless minimal) Debian's static busybox with its applet links,
//! `/bin/vsock-probe` and vsock's loopback transport (for the peer-check scenario). One image per
//! guest architecture: x86_64's busybox is the host's `busybox-static`, arm64's the same Debian
//! package for arm64, fetched with a private apt state (see [`crate::foreign_apt`]).

use std::collections::BTreeSet;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::arch::Arch;
use crate::build_agent::{build_agent_for, build_vsock_probe};
use crate::cpio::CpioWriter;
use crate::deps::{self, BUSYBOX};
use crate::kernel::{arch_dir, ensure_kernel, fetch_lock, foreign_apt, Kernel, Module};
use crate::machine::Transport;
use crate::util::with_lock;

/// Where [`build_initramfs`] writes by default: `initramfs[-minimal][-pci].cpio` in the
/// architecture's directory.
pub fn default_path(arch: Arch, minimal: bool, transport: Transport) -> PathBuf {
    let mut name = String::from("initramfs");
    if minimal {
        name.push_str("-minimal");
    }
    if transport == Transport::Pci {
        name.push_str("-pci");
    }
    arch_dir(arch).join(format!("{name}.cpio"))
}

/// A built image and the kernel it was built for.
#[derive(Debug, Clone)]
pub struct Initramfs {
    pub path: PathBuf,
    pub kernel: Kernel,
}

/// Builds `arch`'s agent, fetches its kernel if needed and writes the image to `out` (default
/// [`default_path`]). `minimal`: the agent and modules only, no busybox. `transport`: the bus
/// the guest's vsock device sits on, whose modules the image loads.
pub fn build_initramfs(
    arch: Arch,
    minimal: bool,
    transport: Transport,
    out: Option<&Path>,
) -> Result<Initramfs> {
    let busybox = if minimal {
        None
    } else {
        // The host's busybox lists the applets for every architecture's image.
        deps::ensure_busybox()?;
        Some(guest_busybox(arch)?)
    };
    let agent = build_agent_for(arch)?;
    let probe = if minimal {
        None
    } else {
        Some(build_vsock_probe(arch)?)
    };
    let kernel = ensure_kernel(arch)?;
    let modules = kernel.modules(transport, minimal)?;
    let path = out.map_or_else(|| default_path(arch, minimal, transport), Path::to_path_buf);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    // Per process: two xtasks may build the same image at once.
    let partial = path.with_extension(format!("cpio.partial-{}", std::process::id()));
    let extras = busybox.as_deref().zip(probe.as_deref());
    write_image(&partial, &agent, extras, &modules)
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &path).with_context(|| format!("renaming to {}", path.display()))?;
    let size = std::fs::metadata(&path)?.len();
    eprintln!(
        "initramfs ({arch}): {} ({size} bytes, kernel {}, {} modules {})",
        path.display(),
        kernel.release,
        transport.name(),
        modules
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(",")
    );
    Ok(Initramfs { path, kernel })
}

/// The static busybox the full image ships for `arch`: the host's own for its architecture,
/// Debian's `busybox-static` for `arch` (fetched and unpacked under target/) otherwise.
fn guest_busybox(arch: Arch) -> Result<PathBuf> {
    if arch.is_host() {
        return Ok(PathBuf::from(BUSYBOX));
    }
    let unpacked = arch_dir(arch).join("busybox");
    let binary = unpacked.join(BUSYBOX.trim_start_matches('/'));
    if !binary.exists() {
        with_lock(&fetch_lock(arch), || {
            // Another xtask may have fetched it while this one waited.
            if binary.exists() {
                return Ok(());
            }
            foreign_apt(arch).fetch_and_unpack("busybox-static", &unpacked)
        })?;
    }
    Ok(binary)
}

/// `extras`: the full image's busybox and `/bin/vsock-probe`; `None` for the agent-only image.
fn write_image(
    path: &Path,
    agent: &Path,
    extras: Option<(&Path, &Path)>,
    modules: &[Module],
) -> Result<()> {
    let file = File::create(path)?;
    let mut image = Image {
        cpio: CpioWriter::new(BufWriter::new(file)),
        dirs: BTreeSet::new(),
    };
    // The agent mounts over these; they must exist as mount points.
    for dir in ["dev", "proc", "sys", "run", "tmp"] {
        image.dir(dir)?;
    }
    // PID 1 gets its stdin/stdout/stderr from /dev/console before anything is mounted.
    image.cpio.char_dev("dev/console", 0o600, 5, 1)?;
    let agent_bytes =
        std::fs::read(agent).with_context(|| format!("reading {}", agent.display()))?;
    image.cpio.file("init", 0o755, &agent_bytes)?;

    image.dir("lib/modules")?;
    let mut list = String::new();
    for module in modules {
        let bytes = std::fs::read(&module.path)
            .with_context(|| format!("reading {}", module.path.display()))?;
        image
            .cpio
            .file(&format!("lib/modules/{}.ko", module.name), 0o644, &bytes)?;
        list.push_str(&module.name);
        list.push('\n');
    }
    image.dir("etc/ferry")?;
    image
        .cpio
        .file("etc/ferry/modules", 0o644, list.as_bytes())?;
    // Names for the users `ferry exec --user` and the policy speak of (`root`, `nobody`).
    image.cpio.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )?;
    image
        .cpio
        .file("etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n")?;

    if let Some((busybox, probe)) = extras {
        let busybox =
            std::fs::read(busybox).with_context(|| format!("reading {}", busybox.display()))?;
        image.dir("bin")?;
        image.cpio.file("bin/busybox", 0o755, &busybox)?;
        for applet in busybox_applets()? {
            // The agent is /init; busybox's own path is the file itself.
            if applet == "bin/busybox" || applet == "init" {
                continue;
            }
            if let Some((parent, _)) = applet.rsplit_once('/') {
                image.dir(parent)?;
            }
            image.cpio.symlink(&applet, "/bin/busybox")?;
        }
        let bytes = std::fs::read(probe).with_context(|| format!("reading {}", probe.display()))?;
        image.dir("bin")?;
        image.cpio.file("bin/vsock-probe", 0o755, &bytes)?;
    }
    image.cpio.finish()?.into_inner()?.sync_all()?;
    Ok(())
}

/// The archive and the directories already in it, so parents are written once, before children.
struct Image {
    cpio: CpioWriter<BufWriter<File>>,
    dirs: BTreeSet<String>,
}

impl Image {
    fn dir(&mut self, path: &str) -> Result<()> {
        if self.dirs.contains(path) {
            return Ok(());
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        // /tmp is world-writable and sticky, as everywhere.
        let perm = if path == "tmp" { 0o1777 } else { 0o755 };
        self.cpio.dir(path, perm)?;
        self.dirs.insert(path.to_owned());
        Ok(())
    }
}

/// The applet paths, relative to `/` (`bin/sh`, `usr/bin/env`, ...), from the host's busybox:
/// the other architectures' image ships the same Debian package version built for them, with
/// the same configuration and so the same applets (the host cannot run their binary to ask).
fn busybox_applets() -> Result<Vec<String>> {
    let output = Command::new(BUSYBOX)
        .arg("--list-full")
        .output()
        .with_context(|| format!("running {BUSYBOX} --list-full"))?;
    if !output.status.success() {
        bail!("{BUSYBOX} --list-full failed: {}", output.status);
    }
    let applets: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| line.trim().trim_start_matches('/'))
        .filter(|line| !line.is_empty() && !line.contains(".."))
        .map(str::to_owned)
        .collect();
    if applets.is_empty() {
        bail!("{BUSYBOX} --list-full listed no applets");
    }
    Ok(applets)
}
