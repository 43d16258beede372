//! Debian packages of a guest architecture the host does not run (arm64's kernel and busybox on
//! an amd64 host), fetched through apt with a private state under `target/`: the host's
//! sources.list and archive keys, but package lists, cache and an empty dpkg status of its own.
//! Nothing is installed and the host's configuration stays as it was: no
//! `dpkg --add-architecture`, no change to its package lists.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::run;

/// An apt state for one foreign architecture, in its own directory.
pub struct ForeignApt {
    /// Holds `lists/`, `cache/` and `status`; downloads land in it too.
    dir: PathBuf,
    /// Debian's name for the architecture (`arm64`).
    debian_arch: &'static str,
}

impl ForeignApt {
    /// The state in `dir` (created on first use).
    pub fn new(dir: PathBuf, debian_arch: &'static str) -> ForeignApt {
        ForeignApt { dir, debian_arch }
    }

    /// `program` (apt-get, apt-cache) pointed at this state and architecture only.
    fn command(&self, program: &str) -> Command {
        let dir = self.dir.display();
        let mut cmd = Command::new(program);
        cmd.arg("-q");
        for option in [
            format!("APT::Architecture={}", self.debian_arch),
            // `::=` empties the list first: only this architecture, not the host's too.
            format!("APT::Architectures::={}", self.debian_arch),
            format!("Dir::State::Lists={dir}/lists"),
            format!("Dir::Cache={dir}/cache"),
            format!("Dir::State::Status={dir}/status"),
            // Only the package lists: no AppStream metadata or translations.
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".to_owned(),
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".to_owned(),
            "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false".to_owned(),
            "Acquire::Languages=none".to_owned(),
        ] {
            cmd.arg("-o").arg(option);
        }
        // As root, apt would drop to the _apt user, which cannot write into target/.
        if crate::deps::running_as_root() {
            cmd.args(["-o", "APT::Sandbox::User=root"]);
        }
        cmd.current_dir(&self.dir);
        cmd
    }

    fn ensure_dirs(&self) -> Result<()> {
        for sub in ["lists/partial", "cache/archives/partial"] {
            let path = self.dir.join(sub);
            std::fs::create_dir_all(&path)
                .with_context(|| format!("creating {}", path.display()))?;
        }
        let status = self.dir.join("status");
        if !status.exists() {
            std::fs::write(&status, b"")
                .with_context(|| format!("writing {}", status.display()))?;
        }
        Ok(())
    }

    /// `apt-get update` into the private lists.
    pub fn update(&self) -> Result<()> {
        self.ensure_dirs()?;
        eprintln!("deps: apt-get update ({}, private lists)", self.debian_arch);
        run(self.command("apt-get").arg("update"))
            .with_context(|| format!("apt-get update for {}", self.debian_arch))
    }

    fn has_lists(&self) -> bool {
        std::fs::read_dir(self.dir.join("lists")).is_ok_and(|entries| {
            entries.flatten().any(|entry| {
                let name = entry.file_name();
                name.to_string_lossy().contains("_Packages")
            })
        })
    }

    /// The versioned package a metapackage depends on (`linux-image-cloud-arm64` →
    /// `linux-image-6.1.0-56-cloud-arm64`).
    pub fn depends_on(&self, metapackage: &str) -> Result<String> {
        if !self.has_lists() {
            self.update()?;
        }
        let output = self
            .command("apt-cache")
            .args(["depends", metapackage])
            .output()
            .context("running apt-cache")?;
        if !output.status.success() {
            bail!(
                "apt-cache depends {metapackage} ({}): {}",
                self.debian_arch,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        crate::kernel::parse_depends_package(&String::from_utf8_lossy(&output.stdout), metapackage)
            .with_context(|| format!("no linux-image dependency of {metapackage}"))
    }

    /// Downloads `package` and unpacks it into `dest` with `dpkg-deb -x` (no maintainer scripts;
    /// `dest` is replaced whole, through a staging directory). Stale lists (the mirror moved
    /// on) are refreshed once.
    pub fn fetch_and_unpack(&self, package: &str, dest: &Path) -> Result<()> {
        if !self.has_lists() {
            self.update()?;
        }
        eprintln!("deps: fetching {package} ({})", self.debian_arch);
        let download = || run(self.command("apt-get").args(["download", package]));
        if download().is_err() {
            self.update()?;
            download().with_context(|| format!("downloading {package}"))?;
        }
        let deb = std::fs::read_dir(&self.dir)?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .find(|path| {
                path.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
            })
            .with_context(|| {
                format!(
                    "apt-get download left no {package}_*.deb in {}",
                    self.dir.display()
                )
            })?;
        let staging = dest.with_extension(format!("partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&staging))
            .with_context(|| format!("unpacking {}", deb.display()))?;
        let _ = std::fs::remove_dir_all(dest);
        std::fs::rename(&staging, dest)
            .with_context(|| format!("renaming to {}", dest.display()))?;
        // The unpacked tree is the cache; the .deb would only double the disk use.
        let _ = std::fs::remove_file(&deb);
        Ok(())
    }
}
