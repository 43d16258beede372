//! `cargo xtask build-agent`: the static guest agent, measured against its size budget.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::arch::Arch;
use crate::util::{cargo, project_root, run};

/// The design's hard limit: a build above it fails, on every architecture.
pub const HARD_LIMIT_BYTES: u64 = 500 * 1000;
/// The current target from the foundation issue: a build above it warns.
pub const TARGET_BYTES: u64 = 64 * 1024;

/// Builds `ferry-agent` in release mode for x86_64 (the host benchmarks' agent) and returns the
/// binary's path.
pub fn build_agent() -> Result<PathBuf> {
    build_agent_for(Arch::X86_64)
}

/// Builds `ferry-agent` in release mode for `arch`'s static target, checks its size against the
/// budget and returns the binary's path.
pub fn build_agent_for(arch: Arch) -> Result<PathBuf> {
    // `cargo xtask test` on a fresh machine starts here: the target is added when missing.
    crate::deps::ensure_musl_target(arch)?;
    let target = arch.agent_target();
    run(cargo().args([
        "build",
        "--quiet",
        "--release",
        "--package",
        "ferry-agent",
        "--target",
        target,
    ]))
    .with_context(|| {
        format!("building the agent (is the musl target installed? `rustup target add {target}`)")
    })?;
    let path = agent_path(arch);
    let size = std::fs::metadata(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    eprintln!(
        "ferry-agent ({arch}): {size} bytes stripped, static ({:.1}% of the {TARGET_BYTES}-byte target, hard limit {HARD_LIMIT_BYTES})",
        size as f64 * 100.0 / TARGET_BYTES as f64
    );
    check_budget(arch, size)?;
    Ok(path)
}

/// Fails above the hard limit, warns above the target.
fn check_budget(arch: Arch, size: u64) -> Result<()> {
    if size > HARD_LIMIT_BYTES {
        bail!("ferry-agent ({arch}) is {size} bytes, above the {HARD_LIMIT_BYTES}-byte hard limit");
    }
    if size > TARGET_BYTES {
        eprintln!("warning: ferry-agent ({arch}) is above its {TARGET_BYTES}-byte target");
    }
    Ok(())
}

/// Where [`build_agent_for`] leaves the binary.
pub fn agent_path(arch: Arch) -> PathBuf {
    release_dir(arch).join("ferry-agent")
}

fn release_dir(arch: Arch) -> PathBuf {
    project_root()
        .join("target")
        .join(arch.agent_target())
        .join("release")
}

/// Builds `vsock-probe` (qemu-tests' guest-side client of the peer-check scenario) in release
/// mode for `arch`, static like the agent, and returns the binary's path. The full image ships
/// it as `/bin/vsock-probe`.
pub fn build_vsock_probe(arch: Arch) -> Result<PathBuf> {
    run(cargo().args([
        "build",
        "--quiet",
        "--release",
        "--package",
        "qemu-tests",
        "--bin",
        "vsock-probe",
        "--target",
        arch.agent_target(),
    ]))
    .context("building vsock-probe")?;
    Ok(release_dir(arch).join("vsock-probe"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hard_limit_holds_on_every_architecture() {
        for arch in Arch::ALL {
            assert!(check_budget(arch, TARGET_BYTES).is_ok());
            assert!(check_budget(arch, HARD_LIMIT_BYTES + 1).is_err());
        }
    }
}
