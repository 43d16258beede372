//! `cargo xtask initramfs`: the guest image, a newc cpio with the agent as `/init`, the vsock
//! modules and their load order, and (unless minimal) Debian's static busybox with its applet links,
//! `/bin/vsock-probe` and vsock's loopback transport (for the peer-check scenario).

use std::collections::BTreeSet;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::build_agent::{build_agent, build_vsock_probe};
use crate::cpio::CpioWriter;
use crate::deps::{self, BUSYBOX};
use crate::kernel::{ensure_kernel, vm_dir, Kernel, Module};
use crate::machine::Transport;

/// Where [`build_initramfs`] writes by default: `initramfs[-minimal][-pci].cpio`.
pub fn default_path(minimal: bool, transport: Transport) -> PathBuf {
    let mut name = String::from("initramfs");
    if minimal {
        name.push_str("-minimal");
    }
    if transport == Transport::Pci {
        name.push_str("-pci");
    }
    vm_dir().join(format!("{name}.cpio"))
}

/// A built image and the kernel it was built for.
#[derive(Debug, Clone)]
pub struct Initramfs {
    pub path: PathBuf,
    pub kernel: Kernel,
}

/// Builds the agent, fetches the kernel if needed and writes the image to `out` (default
/// [`default_path`]). `minimal`: the agent and modules only, no busybox. `transport`: the bus
/// the guest's vsock device sits on, whose modules the image loads.
pub fn build_initramfs(
    minimal: bool,
    transport: Transport,
    out: Option<&Path>,
) -> Result<Initramfs> {
    deps::ensure_musl_target()?;
    if !minimal {
        deps::ensure_busybox()?;
    }
    let agent = build_agent()?;
    let probe = if minimal {
        None
    } else {
        Some(build_vsock_probe()?)
    };
    let kernel = ensure_kernel()?;
    let modules = kernel.modules(transport, minimal)?;
    let path = out.map_or_else(|| default_path(minimal, transport), Path::to_path_buf);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    // Per process: two xtasks may build the same image at once.
    let partial = path.with_extension(format!("cpio.partial-{}", std::process::id()));
    write_image(&partial, &agent, probe.as_deref(), &modules)
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &path).with_context(|| format!("renaming to {}", path.display()))?;
    let size = std::fs::metadata(&path)?.len();
    eprintln!(
        "initramfs: {} ({size} bytes, kernel {}, {} modules {})",
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

/// `probe`: the full image's `/bin/vsock-probe`; `None` for the agent-only image.
fn write_image(path: &Path, agent: &Path, probe: Option<&Path>, modules: &[Module]) -> Result<()> {
    let minimal = probe.is_none();
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

    if !minimal {
        let busybox = std::fs::read(BUSYBOX).with_context(|| format!("reading {BUSYBOX}"))?;
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
    }
    if let Some(probe) = probe {
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

/// The applet paths, relative to `/` (`bin/sh`, `usr/bin/env`, ...), from the busybox we ship.
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
