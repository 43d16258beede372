//! The guest kernel: Debian bookworm's cloud kernel for the guest's architecture, fetched as a
//! package, unpacked without install hooks and cached under `target/ferry-vm/`, plus the vsock
//! modules the agent loads at boot.
//!
//! Why this kernel: it is small, built for VMs, signed and maintained by Debian. On x86_64 its
//! bzImage is LZ4-compressed, so the uncompressed `vmlinux` is cheap to extract and boot directly
//! (PVH), which is the fastest path under TCG. On arm64 Debian ships the `Image` itself
//! (uncompressed, 27 MB), which QEMU's `virt` boots as is (a gzip-compressed one would do too:
//! QEMU inflates it). virtio, virtio_mmio, virtio_pci and vsock are modules in both, hence the
//! module list.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

use crate::arch::Arch;
use crate::foreign_apt::ForeignApt;
use crate::machine::Transport;
use crate::util::{project_root, run, with_lock};

/// The metapackage whose dependency names the current versioned cloud kernel.
fn kernel_metapackage(arch: Arch) -> String {
    format!("linux-image-cloud-{}", arch.debian())
}

/// The modules virtio-vsock needs, in their natural load order, around the transport's own
/// ([`MMIO_TRANSPORT_MODULES`] or [`PCI_TRANSPORT_MODULES`], inserted after `virtio`). Those built
/// into the kernel have no `.ko` and are skipped; dependencies found in `depends=` are added and
/// ordered first. Every module costs boot time (the agent reports each one's in the readiness
/// report), so only what the machine needs.
pub const VSOCK_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
];

/// The virtio-mmio transport, for `microvm` (and Firecracker-like machines).
pub const MMIO_TRANSPORT_MODULES: &[&str] = &["virtio_mmio"];

/// The virtio-pci transport, for machines whose devices sit on PCI (q35, with
/// `vhost-vsock-pci`).
pub const PCI_TRANSPORT_MODULES: &[&str] = &[
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
];

/// The modules only the full image adds: vsock's loopback transport, so a program in the guest
/// can connect to CID 1 (`VMADDR_CID_LOCAL`) and to the guest's own CID, as the scenario that
/// checks the agent refuses such peers does. The agent-only image stays without it.
pub const FULL_IMAGE_MODULES: &[&str] = &["vsock_loopback"];

/// A kernel ready to boot.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// What QEMU's `-kernel` boots: x86_64's uncompressed ELF `vmlinux` (PVH entry), arm64's
    /// `Image`.
    pub boot_image: PathBuf,
    /// The unpacked package.
    unpacked: PathBuf,
    /// Where the decompressed modules are cached.
    modules_dir: PathBuf,
}

impl Kernel {
    /// The modules an image for `transport` loads, dependencies first, each an uncompressed
    /// `.ko`: [`VSOCK_MODULES`] with the transport's, and for the full image (not `minimal`)
    /// [`FULL_IMAGE_MODULES`] too.
    pub fn modules(&self, transport: Transport, minimal: bool) -> Result<Vec<Module>> {
        collect_modules(
            &self.unpacked,
            &self.release,
            &self.modules_dir,
            &module_list(transport, minimal),
        )
    }
}

/// The wanted modules, in natural order: virtio, the transport, vsock, then the full image's.
fn module_list(transport: Transport, minimal: bool) -> Vec<&'static str> {
    let transport = match transport {
        Transport::Mmio => MMIO_TRANSPORT_MODULES,
        Transport::Pci => PCI_TRANSPORT_MODULES,
    };
    let (virtio, vsock) = VSOCK_MODULES.split_at(2);
    let mut list: Vec<&str> = virtio
        .iter()
        .chain(transport)
        .chain(vsock)
        .copied()
        .collect();
    if !minimal {
        list.extend(FULL_IMAGE_MODULES);
    }
    list
}

/// One kernel module, uncompressed.
#[derive(Debug, Clone)]
pub struct Module {
    /// The module name as `finit_module` and `depends=` know it (underscores).
    pub name: String,
    pub path: PathBuf,
}

/// `target/ferry-vm/`: everything the VM harness fetches or builds.
pub fn vm_dir() -> PathBuf {
    project_root().join("target").join("ferry-vm")
}

/// Where one architecture's kernel, images and foreign packages are cached: x86_64's directly
/// in [`vm_dir`] (as before there were two), the others in a subdirectory of it.
pub fn arch_dir(arch: Arch) -> PathBuf {
    match arch {
        Arch::X86_64 => vm_dir(),
        Arch::Aarch64 => vm_dir().join(arch.name()),
    }
}

/// Held while `arch`'s packages are fetched and unpacked: two first runs at once would share the
/// download directory and the apt state's lock.
pub fn fetch_lock(arch: Arch) -> PathBuf {
    arch_dir(arch).join("fetch.lock")
}

/// The apt state that fetches `arch`'s packages when the host is another architecture.
pub fn foreign_apt(arch: Arch) -> ForeignApt {
    ForeignApt::new(arch_dir(arch).join("apt"), arch.debian())
}

/// Fetches and unpacks `arch`'s kernel package if it is not cached yet, prepares the image QEMU
/// boots and collects the vsock modules in load order.
pub fn ensure_kernel(arch: Arch) -> Result<Kernel> {
    let dir = arch_dir(arch);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let unpacked = dir.join("kernel");
    if find_release(&unpacked).is_err() {
        with_lock(&fetch_lock(arch), || {
            // Another xtask may have fetched it while this one waited.
            if find_release(&unpacked).is_ok() {
                return Ok(());
            }
            if arch.is_host() {
                fetch_and_unpack(arch, &dir, &unpacked)
            } else {
                let apt = foreign_apt(arch);
                let package = apt.depends_on(&kernel_metapackage(arch))?;
                apt.fetch_and_unpack(&package, &unpacked)
            }
        })?;
    }
    let release = find_release(&unpacked)?;
    let vmlinuz = unpacked.join("boot").join(format!("vmlinuz-{release}"));
    let boot_image = match arch {
        Arch::X86_64 => ensure_vmlinux(&dir, &release, &vmlinuz)?,
        Arch::Aarch64 => {
            let head = read_prefix(&vmlinuz, 0x40)?;
            ensure!(
                is_arm64_image(&head) || head.starts_with(&[0x1f, 0x8b]),
                "{} is neither an arm64 Image nor gzip-compressed",
                vmlinuz.display()
            );
            vmlinuz
        }
    };

    let modules_dir = dir.join(format!("modules-{release}"));
    let kernel = Kernel {
        release,
        boot_image,
        unpacked,
        modules_dir,
    };
    // Fail here, not at image time, if the package lacks a module any machine needs.
    for transport in [Transport::Mmio, Transport::Pci] {
        kernel.modules(transport, false)?;
    }
    Ok(kernel)
}

/// The arm64 boot protocol's header: `ARM\x64` at offset 0x38 (Documentation/arch/arm64/booting.rst).
fn is_arm64_image(head: &[u8]) -> bool {
    head.get(0x38..0x3c) == Some(b"ARM\x64")
}

/// x86_64: the uncompressed ELF from the bzImage, extracted once into `dir`.
fn ensure_vmlinux(dir: &Path, release: &str, bzimage_path: &Path) -> Result<PathBuf> {
    let vmlinux = dir.join(format!("vmlinux-{release}"));
    if !vmlinux.exists() {
        let bzimage = std::fs::read(bzimage_path)
            .with_context(|| format!("reading {}", bzimage_path.display()))?;
        let elf = extract_vmlinux(&bzimage)
            .with_context(|| format!("extracting vmlinux from {}", bzimage_path.display()))?;
        let partial = dir.join(format!("vmlinux-{release}.partial-{}", std::process::id()));
        std::fs::write(&partial, &elf).with_context(|| format!("writing {}", partial.display()))?;
        std::fs::rename(&partial, &vmlinux)
            .with_context(|| format!("renaming to {}", vmlinux.display()))?;
        eprintln!(
            "kernel: extracted {} ({} bytes)",
            vmlinux.display(),
            elf.len()
        );
    }
    let head = read_prefix(&vmlinux, 4)?;
    ensure!(
        head == b"\x7fELF",
        "{} is not an ELF file; delete it to extract it again",
        vmlinux.display()
    );
    Ok(vmlinux)
}

/// The release of the unpacked kernel: the one directory under `lib/modules/`.
fn find_release(unpacked: &Path) -> Result<String> {
    let modules = unpacked.join("lib").join("modules");
    let mut releases = Vec::new();
    for entry in std::fs::read_dir(&modules).with_context(|| format!("{}", modules.display()))? {
        let entry = entry?;
        let release = entry.file_name().to_string_lossy().into_owned();
        if unpacked
            .join("boot")
            .join(format!("vmlinuz-{release}"))
            .exists()
        {
            releases.push(release);
        }
    }
    releases.sort();
    releases.pop().with_context(|| {
        format!(
            "no kernel release with a vmlinuz under {}",
            modules.display()
        )
    })
}

/// `apt-get download` of the versioned cloud kernel, then `dpkg-deb -x`: no maintainer scripts
/// run and nothing outside `target/` is touched.
fn fetch_and_unpack(arch: Arch, dir: &Path, unpacked: &Path) -> Result<()> {
    let metapackage = kernel_metapackage(arch);
    let package = match kernel_package(&metapackage) {
        Ok(package) => package,
        Err(_) => {
            // A fresh machine may have no package lists yet.
            crate::deps::apt_update()?;
            kernel_package(&metapackage)?
        }
    };
    eprintln!("kernel: fetching {package}");
    // As root, apt would drop to the _apt user, which cannot write into target/: it warns and
    // downloads as root anyway. Say so up front instead.
    run(Command::new("apt-get")
        .args(["-q", "-o", "APT::Sandbox::User=root", "download", &package])
        .current_dir(dir))
    .with_context(|| format!("downloading {package}"))?;
    let deb = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
        })
        .with_context(|| {
            format!(
                "apt-get download left no {package}_*.deb in {}",
                dir.display()
            )
        })?;
    let staging = dir.join(format!("kernel.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&staging))
        .with_context(|| format!("unpacking {}", deb.display()))?;
    if find_release(unpacked).is_ok() {
        // Another xtask unpacked it meanwhile.
        let _ = std::fs::remove_dir_all(&staging);
    } else {
        let _ = std::fs::remove_dir_all(unpacked);
        std::fs::rename(&staging, unpacked)
            .with_context(|| format!("renaming to {}", unpacked.display()))?;
    }
    // The unpacked tree is the cache; the .deb would only double the disk use.
    let _ = std::fs::remove_file(&deb);
    Ok(())
}

/// The real package behind the metapackage, e.g. `linux-image-6.1.0-56-cloud-amd64`.
fn kernel_package(metapackage: &str) -> Result<String> {
    let output = Command::new("apt-cache")
        .args(["depends", metapackage])
        .output()
        .context("running apt-cache")?;
    if !output.status.success() {
        bail!(
            "apt-cache depends {metapackage}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    parse_depends_package(&String::from_utf8_lossy(&output.stdout), metapackage)
        .with_context(|| format!("no linux-image dependency of {metapackage}"))
}

/// The versioned `linux-image-*` in `apt-cache depends METAPACKAGE`'s output.
pub fn parse_depends_package(apt_cache: &str, metapackage: &str) -> Option<String> {
    apt_cache
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|name| name.starts_with("linux-image-") && *name != metapackage)
        .map(str::to_owned)
}

fn read_prefix(path: &Path, len: usize) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; len];
    file.read_exact(&mut buf)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(buf)
}

/// The LZ4 legacy frame magic (`lz4 -l`, the kernel's format), little-endian in the stream.
const LZ4_LEGACY_MAGIC: [u8; 4] = 0x184C_2102u32.to_le_bytes();

/// Decompresses the bzImage's LZ4 payload: the uncompressed kernel, an ELF.
pub fn extract_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>> {
    let (stream, size) = bzimage_payload(bzimage)?;
    ensure!(
        stream.starts_with(&LZ4_LEGACY_MAGIC),
        "the bzImage payload is not an LZ4 legacy stream (is the kernel LZ4-compressed?)"
    );
    let mut payload = lz4_legacy_decode(stream, size)?;
    let len = elf_len(&payload).context("the decompressed payload is not an ELF64 kernel")?;
    payload.truncate(len);
    Ok(payload)
}

/// The length of the ELF at the start of `bytes`: the furthest of its header tables, its
/// sections' and its segments' file ranges. A relocatable x86 kernel's payload is `vmlinux.bin`
/// followed by its relocation table (`vmlinux.relocs`, 0.8 MB in Debian's 6.1), which only the
/// bzImage's own decompressor uses: `vmlinux` is the ELF alone.
fn elf_len(bytes: &[u8]) -> Result<usize> {
    use object::read::elf::FileHeader;
    use object::{Object, ObjectSection, ObjectSegment};
    let elf = object::read::elf::ElfFile64::<object::Endianness>::parse(bytes)?;
    let (header, endian) = (elf.elf_header(), elf.endian());
    let table = |offset: u64, count: usize, entry: u16| {
        offset.saturating_add((count as u64).saturating_mul(u64::from(entry)))
    };
    let tables = [
        table(
            header.e_phoff(endian),
            elf.elf_program_headers().len(),
            header.e_phentsize(endian),
        ),
        table(
            header.e_shoff(endian),
            elf.elf_section_table().len(),
            header.e_shentsize(endian),
        ),
    ];
    // Sections without file contents (SHT_NOBITS: .bss) have no file range.
    let sections = elf.sections().filter_map(|section| section.file_range());
    let segments = elf.segments().map(|segment| segment.file_range());
    let end = sections
        .chain(segments)
        .map(|(offset, size)| offset.saturating_add(size))
        .chain(tables)
        .chain([u64::from(header.e_ehsize(endian))])
        .max()
        .unwrap_or(0);
    ensure!(
        end <= bytes.len() as u64,
        "the ELF claims {end} bytes, the payload has {}",
        bytes.len()
    );
    Ok(end as usize)
}

/// The compressed kernel in a bzImage and the uncompressed size the kernel build appends to it
/// (a `u32` LE after the stream). Found through the setup header (x86 boot protocol 2.08 and
/// later): `payload_offset` and `payload_length` count from the end of the real-mode setup code,
/// `setup_sects` 512-byte sectors after the boot sector. Knowing the stream's exact end means
/// the decoder stops at it instead of reading the bytes that follow as LZ4 blocks.
///
/// Hand-written (two fields at fixed offsets): the crate that knows the setup header, rust-vmm's
/// `linux-loader`, reads it as part of loading a kernel into guest memory, with `vm-memory`.
fn bzimage_payload(bzimage: &[u8]) -> Result<(&[u8], u32)> {
    ensure!(
        bzimage.get(0x202..0x206) == Some(b"HdrS"),
        "not a bzImage (no HdrS setup header)"
    );
    let version = le_u16(bzimage, 0x206)?;
    ensure!(
        version >= 0x0208,
        "boot protocol {}.{:02} predates the payload fields",
        version >> 8,
        version & 0xff
    );
    // 0 means 4, for images older than the field.
    let setup_sects = match bzimage[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let offset = (setup_sects + 1) * 512 + le_u32(bzimage, 0x248)? as usize;
    let length = le_u32(bzimage, 0x24c)? as usize;
    let payload = offset
        .checked_add(length)
        .and_then(|end| bzimage.get(offset..end))
        .with_context(|| format!("the payload ({length} bytes at {offset}) runs past the image"))?;
    let (stream, size) = payload
        .split_last_chunk::<4>()
        .context("the payload has no room for its size")?;
    Ok((stream, u32::from_le_bytes(*size)))
}

/// Decodes a whole LZ4 legacy stream that must come to `size` bytes.
fn lz4_legacy_decode(stream: &[u8], size: u32) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::with_capacity(size as usize);
    lz4_flex::frame::FrameDecoder::new(stream)
        .read_to_end(&mut out)
        .context("decompressing the LZ4 payload")?;
    ensure!(
        out.len() == size as usize,
        "the LZ4 payload decompressed to {} bytes, the image says {size}",
        out.len()
    );
    Ok(out)
}

fn le_u16(bytes: &[u8], at: usize) -> Result<u16> {
    let b = bytes.get(at..).and_then(|b| b.first_chunk::<2>());
    Ok(u16::from_le_bytes(*b.context("truncated setup header")?))
}

fn le_u32(bytes: &[u8], at: usize) -> Result<u32> {
    let b = bytes.get(at..).and_then(|b| b.first_chunk::<4>());
    Ok(u32::from_le_bytes(*b.context("truncated setup header")?))
}

/// The `depends=` list from a module's `.modinfo` section (NUL-separated `key=value` strings).
pub fn module_depends(ko: &[u8]) -> Result<Vec<String>> {
    use object::{Object, ObjectSection};
    let elf = object::read::elf::ElfFile64::<object::Endianness>::parse(ko)
        .context("not an ELF64 module")?;
    let modinfo = elf
        .section_by_name(".modinfo")
        .context("no .modinfo section")?;
    Ok(parse_modinfo_depends(
        modinfo.data().context("reading .modinfo")?,
    ))
}

fn parse_modinfo_depends(modinfo: &[u8]) -> Vec<String> {
    modinfo
        .split(|b| *b == 0)
        .filter_map(|entry| entry.strip_prefix(b"depends="))
        .flat_map(|list| list.split(|b| *b == b','))
        .filter(|name| !name.is_empty())
        .map(|name| normalize(&String::from_utf8_lossy(name)))
        .collect()
}

/// Module names use `_` and `-` interchangeably; the kernel treats them alike.
fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// Orders `wanted` and everything they depend on so each module comes after its dependencies,
/// keeping `wanted`'s order where dependencies leave a choice. `depends` maps each known module to
/// its `depends=` list; a name missing from it is taken as built in and left out.
pub fn order_modules(
    wanted: &[&str],
    depends: &BTreeMap<String, Vec<String>>,
) -> Result<Vec<String>> {
    fn visit(
        name: &str,
        depends: &BTreeMap<String, Vec<String>>,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
        order: &mut Vec<String>,
    ) -> Result<()> {
        if done.contains(name) {
            return Ok(());
        }
        let Some(deps) = depends.get(name) else {
            return Ok(());
        };
        if path.iter().any(|p| p == name) {
            bail!("module dependency cycle: {} -> {name}", path.join(" -> "));
        }
        path.push(name.to_owned());
        for dep in deps {
            visit(dep, depends, done, path, order)?;
        }
        path.pop();
        done.insert(name.to_owned());
        order.push(name.to_owned());
        Ok(())
    }
    let mut done = BTreeSet::new();
    let mut order = Vec::new();
    for name in wanted {
        visit(
            &normalize(name),
            depends,
            &mut done,
            &mut Vec::new(),
            &mut order,
        )?;
    }
    Ok(order)
}

/// Finds the `wanted` modules and their dependencies in the unpacked tree, decompresses them into
/// `out_dir` and returns them in load order.
fn collect_modules(
    unpacked: &Path,
    release: &str,
    out_dir: &Path,
    wanted: &[&str],
) -> Result<Vec<Module>> {
    let tree = unpacked.join("lib").join("modules").join(release);
    let mut files = BTreeMap::new();
    index_modules(&tree.join("kernel"), &mut files)?;
    let builtin = std::fs::read_to_string(tree.join("modules.builtin")).unwrap_or_default();
    let builtin: BTreeSet<String> = builtin
        .lines()
        .filter_map(|line| line.rsplit('/').next())
        .map(|file| normalize(file.trim_end_matches(".ko")))
        .collect();

    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    // Walk the dependency graph from the wanted modules, reading each one's modinfo once.
    let mut depends = BTreeMap::new();
    let mut pending: Vec<String> = wanted.iter().map(|n| normalize(n)).collect();
    while let Some(name) = pending.pop() {
        if depends.contains_key(&name) {
            continue;
        }
        let Some(source) = files.get(&name) else {
            if !builtin.contains(&name) {
                eprintln!("kernel: warning: module {name} is neither a .ko nor built in");
            }
            continue;
        };
        let ko = out_dir.join(format!("{name}.ko"));
        if !ko.exists() {
            decompress_module(source, &ko)?;
        }
        let bytes = std::fs::read(&ko).with_context(|| format!("reading {}", ko.display()))?;
        let deps = module_depends(&bytes).with_context(|| format!("modinfo of {name}"))?;
        pending.extend(deps.iter().cloned());
        depends.insert(name, deps);
    }
    let order = order_modules(wanted, &depends)?;
    Ok(order
        .into_iter()
        .map(|name| Module {
            path: out_dir.join(format!("{name}.ko")),
            name,
        })
        .collect())
}

fn index_modules(dir: &Path, files: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            index_modules(&path, files)?;
            continue;
        }
        let file = entry.file_name().to_string_lossy().into_owned();
        for suffix in [".ko", ".ko.xz", ".ko.zst", ".ko.gz"] {
            if let Some(stem) = file.strip_suffix(suffix) {
                files.insert(normalize(stem), path.clone());
                break;
            }
        }
    }
    Ok(())
}

/// Copies a module to `dest`, decompressing `.ko.xz`, `.ko.zst` and `.ko.gz` with their tools:
/// `finit_module` on a compressed file needs a kernel built with in-kernel decompression.
fn decompress_module(source: &Path, dest: &Path) -> Result<()> {
    let name = source.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    let partial = dest.with_extension(format!("ko.partial-{}", std::process::id()));
    match tool {
        None => {
            std::fs::copy(source, &partial)
                .with_context(|| format!("copying {}", source.display()))?;
        }
        Some(tool) => {
            let output = Command::new(tool)
                .arg("-dc")
                .arg(source)
                .output()
                .with_context(|| format!("running {tool} (install it to unpack {name})"))?;
            if !output.status.success() {
                bail!(
                    "{tool} -dc {name}: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
            std::fs::write(&partial, &output.stdout)
                .with_context(|| format!("writing {}", partial.display()))?;
        }
    }
    std::fs::rename(&partial, dest).with_context(|| format!("renaming to {}", dest.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `printf 'hello hello hello hello hello world, abcabcabcabcabcabc!\n' | lz4 -l -9`:
    /// literals, an overlapping match with an extended length, and a short overlapping match.
    #[rustfmt::skip]
    const LZ4_HELLO: [u8; 37] = [
        0x02, 0x21, 0x4c, 0x18, // legacy magic
        0x1d, 0x00, 0x00, 0x00, // block: 29 bytes
        0x6f, b'h', b'e', b'l', b'l', b'o', b' ', // 6 literals, match length 15+
        0x06, 0x00, 0x05,       // offset 6, length 15 + 5 + 4
        0xa8, b'w', b'o', b'r', b'l', b'd', b',', b' ', b'a', b'b', b'c', // 10 literals
        0x03, 0x00,             // offset 3, length 8 + 4
        0x50, b'a', b'b', b'c', b'!', b'\n', // 5 closing literals
    ];

    /// `printf abcdefghijklmnopqrstuvwxyz | lz4 -l -9`: one literal run with an extended length.
    #[rustfmt::skip]
    const LZ4_ALPHABET: [u8; 36] = [
        0x02, 0x21, 0x4c, 0x18,
        0x1c, 0x00, 0x00, 0x00,
        0xf0, 0x0b, // 15 + 11 literals
        b'a', b'b', b'c', b'd', b'e', b'f', b'g', b'h', b'i', b'j', b'k', b'l', b'm',
        b'n', b'o', b'p', b'q', b'r', b's', b't', b'u', b'v', b'w', b'x', b'y', b'z',
    ];

    #[test]
    fn lz4_flex_reads_the_kernels_legacy_format() {
        // Vectors from the lz4 tool itself, not from the crate that decodes them.
        let hello = b"hello hello hello hello hello world, abcabcabcabcabcabc!\n";
        assert_eq!(
            lz4_legacy_decode(&LZ4_HELLO, hello.len() as u32).expect("valid"),
            hello
        );
        let alphabet = b"abcdefghijklmnopqrstuvwxyz";
        assert_eq!(
            lz4_legacy_decode(&LZ4_ALPHABET, 26).expect("valid"),
            alphabet
        );
        assert!(
            lz4_legacy_decode(&LZ4_ALPHABET, 27).is_err(),
            "size mismatch"
        );
        let mut bad = LZ4_HELLO;
        bad[15] = 0x40; // offset 64: before the block's start
        assert!(lz4_legacy_decode(&bad, hello.len() as u32).is_err());
        assert!(lz4_legacy_decode(&LZ4_HELLO[..20], 5).is_err(), "truncated");
    }

    /// An ELF64 (x86-64): its header, one PT_LOAD program header covering the whole file, and
    /// the "code" it loads.
    fn tiny_elf() -> Vec<u8> {
        let code = 300;
        let len = 64 + 56 + code;
        let mut elf = vec![0u8; 64 + 56];
        elf[..8].copy_from_slice(b"\x7fELF\x02\x01\x01\x00");
        elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        elf[20..24].copy_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
        elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        elf[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        elf[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        elf[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        elf[58..60].copy_from_slice(&64u16.to_le_bytes()); // e_shentsize
        elf[64..68].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD, from offset 0
        elf[96..104].copy_from_slice(&(len as u64).to_le_bytes()); // p_filesz
        elf[104..112].copy_from_slice(&(len as u64).to_le_bytes()); // p_memsz
        elf.resize(len, 0x90);
        elf
    }

    /// A bzImage laid out as the boot protocol says: setup sectors, then the protected-mode
    /// code with the payload (an LZ4 legacy stream + the uncompressed size) in its middle.
    fn bzimage(content: &[u8]) -> Vec<u8> {
        let block = lz4_flex::block::compress(content);
        let mut payload = LZ4_LEGACY_MAGIC.to_vec();
        payload.extend_from_slice(&(block.len() as u32).to_le_bytes());
        payload.extend_from_slice(&block);
        payload.extend_from_slice(&(content.len() as u32).to_le_bytes());

        let setup_sects = 2;
        let mut image = vec![0u8; (setup_sects + 1) * 512];
        image[0x1f1] = setup_sects as u8;
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        let payload_offset = 100u32;
        image[0x248..0x24c].copy_from_slice(&payload_offset.to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        image.extend_from_slice(&[0xcc; 100]); // decompressor code before the payload
        image.extend_from_slice(&payload);
        // What follows the payload looks like one more small block: it must not be read.
        image.extend_from_slice(&[4, 0, 0, 0, 0x40, 1, 2, 3, 0xcc, 0xcc]);
        image
    }

    #[test]
    fn vmlinux_comes_from_the_payload_the_setup_header_names() {
        let elf = tiny_elf();
        let mut payload = elf.clone();
        payload.extend_from_slice(&[0xee; 200]); // vmlinux.relocs: not part of the ELF
        assert_eq!(
            extract_vmlinux(&bzimage(&payload)).expect("valid image"),
            elf
        );

        let err = extract_vmlinux(&bzimage(b"not an ELF at all, just text")).expect_err("no ELF");
        assert!(format!("{err:#}").contains("not an ELF64"), "{err:#}");

        let mut image = bzimage(&elf);
        image[0x24c] += 1; // the payload's length: now its size field is off by a byte
        assert!(extract_vmlinux(&image).is_err());

        let mut image = bzimage(&elf);
        image[0x206] = 0x07; // boot protocol 2.07: no payload fields
        assert!(extract_vmlinux(&image).is_err());

        assert!(extract_vmlinux(&elf).is_err(), "no setup header");
        assert!(extract_vmlinux(&[]).is_err());
    }

    #[test]
    fn modinfo_depends_are_parsed() {
        let modinfo = b"license=GPL\0depends=virtio_ring,virtio\0retpoline=Y\0name=virtio_mmio\0";
        assert_eq!(parse_modinfo_depends(modinfo), ["virtio_ring", "virtio"]);
        assert!(parse_modinfo_depends(b"depends=\0name=virtio_ring\0").is_empty());
        assert_eq!(parse_modinfo_depends(b"depends=a-b\0"), ["a_b"]);
    }

    fn graph(edges: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        edges
            .iter()
            .map(|(name, deps)| {
                (
                    name.to_string(),
                    deps.iter().map(|d| d.to_string()).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn modules_come_after_their_dependencies() {
        // The real graph of Debian 6.1's cloud kernel, listed in the wrong order on purpose.
        let depends = graph(&[
            (
                "vmw_vsock_virtio_transport",
                &[
                    "vmw_vsock_virtio_transport_common",
                    "vsock",
                    "virtio",
                    "virtio_ring",
                ],
            ),
            ("vmw_vsock_virtio_transport_common", &["vsock"]),
            ("vsock", &[]),
            (
                "virtio_pci",
                &[
                    "virtio_pci_modern_dev",
                    "virtio_pci_legacy_dev",
                    "virtio",
                    "virtio_ring",
                ],
            ),
            ("virtio_pci_modern_dev", &[]),
            ("virtio_pci_legacy_dev", &[]),
            ("virtio_mmio", &["virtio", "virtio_ring"]),
            ("virtio", &[]),
            ("virtio_ring", &[]),
        ]);
        let order = order_modules(&["vmw_vsock_virtio_transport", "virtio_mmio"], &depends)
            .expect("acyclic");
        assert_eq!(
            order,
            [
                "vsock",
                "vmw_vsock_virtio_transport_common",
                "virtio",
                "virtio_ring",
                "vmw_vsock_virtio_transport",
                "virtio_mmio",
            ]
        );
        // Each transport's list has its own modules and not the other's.
        let order = order_modules(&module_list(Transport::Mmio, true), &depends).expect("acyclic");
        for pci in PCI_TRANSPORT_MODULES {
            assert!(!order.iter().any(|n| n == pci), "{pci}");
        }
        assert!(order.iter().any(|n| n == "virtio_mmio"));
        let order = order_modules(&module_list(Transport::Pci, true), &depends).expect("acyclic");
        assert!(!order.iter().any(|n| n == "virtio_mmio"));
        let full = module_list(Transport::Pci, false);
        assert!(full.contains(&"vsock_loopback"), "{full:?}");
        for (name, deps) in depends.iter().filter(|(name, _)| *name != "virtio_mmio") {
            let at = order.iter().position(|n| n == name).expect("every module");
            for dep in deps {
                assert!(order.iter().position(|n| n == dep).expect("dep") < at);
            }
        }
    }

    #[test]
    fn built_in_modules_are_skipped_and_cycles_reported() {
        // virtio is built in: absent from the map, so left out.
        let depends = graph(&[("virtio_mmio", &["virtio"])]);
        assert_eq!(
            order_modules(&["virtio", "virtio_mmio"], &depends).expect("acyclic"),
            ["virtio_mmio"]
        );
        let cyclic = graph(&[("a", &["b"]), ("b", &["a"])]);
        assert!(order_modules(&["a"], &cyclic).is_err());
    }

    #[test]
    fn versioned_package_is_found() {
        let apt = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        let meta = kernel_metapackage(Arch::X86_64);
        assert_eq!(
            parse_depends_package(apt, &meta).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        assert_eq!(
            parse_depends_package("linux-image-cloud-amd64\n", &meta),
            None
        );
        let apt = "linux-image-cloud-arm64\n  Depends: linux-image-6.1.0-56-cloud-arm64\n";
        assert_eq!(
            parse_depends_package(apt, &kernel_metapackage(Arch::Aarch64)).as_deref(),
            Some("linux-image-6.1.0-56-cloud-arm64")
        );
    }
}
