//! The guest kernel: Debian bookworm's cloud kernel, fetched as a package, unpacked without install
//! hooks and cached under `target/ferry-vm/`, plus the vsock modules the agent loads at boot.
//!
//! Why this kernel: it is small, built for VMs, signed and maintained by Debian, and its bzImage is
//! LZ4-compressed, so the uncompressed `vmlinux` is cheap to extract and boot directly (PVH), which
//! is the fastest path under TCG. virtio and vsock are modules in it, hence the module list.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, ensure, Context, Result};

use crate::util::{project_root, run};

/// The metapackage whose dependency names the current versioned cloud kernel.
const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";

/// The modules virtio-vsock needs, in their natural load order. Those built into the kernel have
/// no `.ko` and are skipped; dependencies found in `depends=` are added and ordered first.
pub const VSOCK_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_mmio",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
];

/// A kernel ready to boot.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// The uncompressed ELF kernel, for QEMU's `-kernel` (PVH entry).
    pub vmlinux: PathBuf,
    /// The modules to load, dependencies first, each an uncompressed `.ko`.
    pub modules: Vec<Module>,
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

/// Fetches and unpacks the kernel package if it is not cached yet, extracts `vmlinux` and collects
/// the vsock modules in load order.
pub fn ensure_kernel() -> Result<Kernel> {
    let dir = vm_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let unpacked = dir.join("kernel");
    if find_release(&unpacked).is_err() {
        fetch_and_unpack(&dir, &unpacked)?;
    }
    let release = find_release(&unpacked)?;

    let vmlinux = dir.join(format!("vmlinux-{release}"));
    if !vmlinux.exists() {
        let bzimage_path = unpacked.join("boot").join(format!("vmlinuz-{release}"));
        let bzimage = std::fs::read(&bzimage_path)
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

    let modules = collect_modules(&unpacked, &release, &dir.join(format!("modules-{release}")))?;
    Ok(Kernel {
        release,
        vmlinux,
        modules,
    })
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
fn fetch_and_unpack(dir: &Path, unpacked: &Path) -> Result<()> {
    let package = match kernel_package() {
        Ok(package) => package,
        Err(_) => {
            // A fresh machine may have no package lists yet.
            crate::deps::apt_update()?;
            kernel_package()?
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
fn kernel_package() -> Result<String> {
    let output = Command::new("apt-cache")
        .args(["depends", KERNEL_METAPACKAGE])
        .output()
        .context("running apt-cache")?;
    if !output.status.success() {
        bail!(
            "apt-cache depends {KERNEL_METAPACKAGE}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    parse_depends_package(&String::from_utf8_lossy(&output.stdout))
        .with_context(|| format!("no linux-image dependency of {KERNEL_METAPACKAGE}"))
}

fn parse_depends_package(apt_cache: &str) -> Option<String> {
    apt_cache
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|name| name.starts_with("linux-image-") && *name != KERNEL_METAPACKAGE)
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

/// The LZ4 legacy frame magic, little-endian in the stream.
const LZ4_LEGACY_MAGIC: [u8; 4] = 0x184C_2102u32.to_le_bytes();
/// Legacy frames cut the input into 8 MiB blocks.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// `LZ4_compressBound(8 MiB)`: no legacy block's compressed size can exceed it.
const LZ4_LEGACY_BOUND: usize = LZ4_LEGACY_BLOCK + LZ4_LEGACY_BLOCK / 255 + 16;

/// Finds the LZ4 payload in a bzImage, decompresses it and trims it to the ELF it holds.
pub fn extract_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>> {
    let mut start = 0;
    let mut last_error = anyhow!("no LZ4 legacy magic in the image (is it LZ4-compressed?)");
    while let Some(found) = find(&bzimage[start..], &LZ4_LEGACY_MAGIC) {
        let at = start + found;
        // The magic could occur by chance in the setup code: the right hit decodes to an ELF.
        match lz4_legacy_decode(&bzimage[at..]) {
            Ok(out) if out.starts_with(b"\x7fELF") => {
                let len = elf_len(&out)?;
                let mut out = out;
                out.truncate(len);
                return Ok(out);
            }
            Ok(_) => last_error = anyhow!("the LZ4 stream at offset {at} does not hold an ELF"),
            Err(err) => last_error = err.context(format!("LZ4 stream at offset {at}")),
        }
        start = at + 1;
    }
    Err(last_error)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Decodes an LZ4 legacy frame (`lz4 -l`, the kernel's format): the magic, then blocks of a
/// `u32` LE compressed size and an independent LZ4 block. The stream has no end marker; it ends
/// where the input ends or, inside a bzImage, at the first size that cannot be a block (the
/// kernel appends the uncompressed length there).
pub fn lz4_legacy_decode(input: &[u8]) -> Result<Vec<u8>> {
    let mut rest = input
        .strip_prefix(&LZ4_LEGACY_MAGIC)
        .context("no LZ4 legacy magic")?;
    let mut out = Vec::new();
    while let Some((size, tail)) = rest.split_first_chunk::<4>() {
        if *size == LZ4_LEGACY_MAGIC {
            // Concatenated frames: just another header.
            rest = tail;
            continue;
        }
        let size = u32::from_le_bytes(*size) as usize;
        if size == 0 || size > LZ4_LEGACY_BOUND || size > tail.len() {
            break;
        }
        let block_start = out.len();
        lz4_block_decode(&tail[..size], &mut out)
            .with_context(|| format!("LZ4 block at output offset {block_start}"))?;
        rest = &tail[size..];
    }
    ensure!(!out.is_empty(), "empty LZ4 stream");
    Ok(out)
}

/// Decodes one LZ4 block, appending to `out`. Matches may only reach back into this block's
/// output: legacy-frame blocks are independent.
fn lz4_block_decode(block: &[u8], out: &mut Vec<u8>) -> Result<()> {
    let base = out.len();
    let mut i = 0;
    let byte = |i: usize| block.get(i).copied().context("truncated LZ4 block");
    loop {
        let token = byte(i)?;
        i += 1;
        let mut literals = usize::from(token >> 4);
        if literals == 15 {
            loop {
                let more = byte(i)?;
                i += 1;
                literals += usize::from(more);
                if more != 255 {
                    break;
                }
            }
        }
        let lit = block
            .get(i..i + literals)
            .context("LZ4 literals run past the block")?;
        out.extend_from_slice(lit);
        i += literals;
        if i == block.len() {
            // The last sequence has literals only.
            return Ok(());
        }
        let offset = usize::from(u16::from_le_bytes([byte(i)?, byte(i + 1)?]));
        i += 2;
        let mut length = usize::from(token & 15);
        if length == 15 {
            loop {
                let more = byte(i)?;
                i += 1;
                length += usize::from(more);
                if more != 255 {
                    break;
                }
            }
        }
        length += 4;
        ensure!(
            offset != 0 && offset <= out.len() - base,
            "LZ4 match offset {offset} out of range"
        );
        ensure!(
            out.len() - base + length <= LZ4_LEGACY_BLOCK,
            "LZ4 block decodes past 8 MiB"
        );
        let from = out.len() - offset;
        if offset >= length {
            out.extend_from_within(from..from + length);
        } else {
            // Overlapping copy: each byte may be one this match just wrote.
            for k in 0..length {
                let b = out[from + k];
                out.push(b);
            }
        }
    }
}

/// An ELF64 file's true length: the furthest of its section header table, its program headers'
/// file ranges and its sections' file ranges.
fn elf_len(elf: &[u8]) -> Result<usize> {
    let header = Elf64::parse(elf)?;
    let mut end = header.shoff + header.shnum * header.shentsize;
    end = end.max(header.phoff + header.phnum * header.phentsize);
    for i in 0..header.phnum {
        let ph = header.phoff + i * header.phentsize;
        let offset = le_u64(elf, ph + 8)? as usize;
        let filesz = le_u64(elf, ph + 32)? as usize;
        end = end.max(offset + filesz);
    }
    for section in header.sections(elf)? {
        // SHT_NOBITS (.bss) occupies no file space.
        if section.kind != 8 {
            end = end.max(section.offset + section.size);
        }
    }
    ensure!(
        end <= elf.len(),
        "ELF claims {end} bytes, have {}",
        elf.len()
    );
    Ok(end)
}

/// The few ELF64 header fields we read.
struct Elf64 {
    phoff: usize,
    phentsize: usize,
    phnum: usize,
    shoff: usize,
    shentsize: usize,
    shnum: usize,
    shstrndx: usize,
}

struct Section {
    name: usize,
    kind: u32,
    offset: usize,
    size: usize,
}

impl Elf64 {
    fn parse(elf: &[u8]) -> Result<Elf64> {
        ensure!(elf.starts_with(b"\x7fELF"), "not an ELF file");
        ensure!(elf.get(4) == Some(&2), "not a 64-bit ELF");
        ensure!(elf.get(5) == Some(&1), "not a little-endian ELF");
        Ok(Elf64 {
            phoff: le_u64(elf, 0x20)? as usize,
            shoff: le_u64(elf, 0x28)? as usize,
            phentsize: usize::from(le_u16(elf, 0x36)?),
            phnum: usize::from(le_u16(elf, 0x38)?),
            shentsize: usize::from(le_u16(elf, 0x3A)?),
            shnum: usize::from(le_u16(elf, 0x3C)?),
            shstrndx: usize::from(le_u16(elf, 0x3E)?),
        })
    }

    fn sections(&self, elf: &[u8]) -> Result<Vec<Section>> {
        (0..self.shnum)
            .map(|i| {
                let sh = self.shoff + i * self.shentsize;
                Ok(Section {
                    name: le_u32(elf, sh)? as usize,
                    kind: le_u32(elf, sh + 4)?,
                    offset: le_u64(elf, sh + 24)? as usize,
                    size: le_u64(elf, sh + 32)? as usize,
                })
            })
            .collect()
    }

    /// The contents of the section called `wanted`, if there is one.
    fn section<'e>(&self, elf: &'e [u8], wanted: &str) -> Result<Option<&'e [u8]>> {
        let sections = self.sections(elf)?;
        let names = sections
            .get(self.shstrndx)
            .context("ELF section-name table index out of range")?;
        let names = slice(elf, names.offset, names.size)?;
        for section in &sections {
            let name = names.get(section.name..).unwrap_or_default();
            let name = name.split(|b| *b == 0).next().unwrap_or_default();
            if name == wanted.as_bytes() {
                return Ok(Some(slice(elf, section.offset, section.size)?));
            }
        }
        Ok(None)
    }
}

fn slice(bytes: &[u8], offset: usize, len: usize) -> Result<&[u8]> {
    offset
        .checked_add(len)
        .and_then(|end| bytes.get(offset..end))
        .with_context(|| format!("ELF range {offset}+{len} past the end of the file"))
}

fn le_u16(bytes: &[u8], at: usize) -> Result<u16> {
    let b = slice(bytes, at, 2)?;
    Ok(u16::from_le_bytes([b[0], b[1]]))
}

fn le_u32(bytes: &[u8], at: usize) -> Result<u32> {
    let b = slice(bytes, at, 4)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn le_u64(bytes: &[u8], at: usize) -> Result<u64> {
    let b = slice(bytes, at, 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Ok(u64::from_le_bytes(a))
}

/// The `depends=` list from a module's `.modinfo` section (NUL-separated `key=value` strings).
pub fn module_depends(ko: &[u8]) -> Result<Vec<String>> {
    let elf = Elf64::parse(ko)?;
    let modinfo = elf
        .section(ko, ".modinfo")?
        .context("no .modinfo section")?;
    Ok(parse_modinfo_depends(modinfo))
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

/// Finds the wanted modules and their dependencies in the unpacked tree, decompresses them into
/// `out_dir` and returns them in load order.
fn collect_modules(unpacked: &Path, release: &str, out_dir: &Path) -> Result<Vec<Module>> {
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
    let mut pending: Vec<String> = VSOCK_MODULES.iter().map(|n| normalize(n)).collect();
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
    let order = order_modules(VSOCK_MODULES, &depends)?;
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
    fn lz4_decodes_known_vectors() {
        assert_eq!(
            lz4_legacy_decode(&LZ4_HELLO).expect("valid vector"),
            b"hello hello hello hello hello world, abcabcabcabcabcabc!\n"
        );
        assert_eq!(
            lz4_legacy_decode(&LZ4_ALPHABET).expect("valid vector"),
            b"abcdefghijklmnopqrstuvwxyz"
        );
    }

    #[test]
    fn lz4_stops_at_the_appended_length() {
        // bzImage payloads end with the uncompressed size, which is not a plausible block.
        let mut stream = LZ4_ALPHABET.to_vec();
        stream.extend_from_slice(&26u32.to_le_bytes());
        assert_eq!(
            lz4_legacy_decode(&stream).expect("valid vector"),
            b"abcdefghijklmnopqrstuvwxyz"
        );
    }

    #[test]
    fn lz4_rejects_bad_offsets() {
        let mut stream = LZ4_HELLO;
        stream[15] = 0x40; // offset 64: before the block's start
        assert!(lz4_legacy_decode(&stream).is_err());
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
        let order = order_modules(VSOCK_MODULES, &depends).expect("acyclic");
        for (name, deps) in &depends {
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
        assert_eq!(
            parse_depends_package(apt).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        assert_eq!(parse_depends_package("linux-image-cloud-amd64\n"), None);
    }
}
