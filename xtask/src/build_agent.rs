//! `cargo xtask build-agent`: the static guest agent, measured against its size budget.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::util::{cargo, project_root, run};

/// The only target the agent ships for: static, musl's crt and libc.a, flags in `.cargo/config.toml`.
pub const AGENT_TARGET: &str = "x86_64-unknown-linux-musl";
/// The design's hard limit: a build above it fails.
pub const HARD_LIMIT_BYTES: u64 = 500 * 1000;
/// The current target from the foundation issue: a build above it warns.
pub const TARGET_BYTES: u64 = 64 * 1024;

/// Builds `ferry-agent` in release mode for [`AGENT_TARGET`] and returns the binary's path.
pub fn build_agent() -> Result<PathBuf> {
    run(cargo().args([
        "build",
        "--quiet",
        "--release",
        "--package",
        "ferry-agent",
        "--target",
        AGENT_TARGET,
    ]))
    .context("building the agent (is the musl target installed? `rustup target add x86_64-unknown-linux-musl`)")?;
    let path = agent_path();
    let size = std::fs::metadata(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    eprintln!(
        "ferry-agent: {size} bytes stripped, static ({:.1}% of the {TARGET_BYTES}-byte target, hard limit {HARD_LIMIT_BYTES})",
        size as f64 * 100.0 / TARGET_BYTES as f64
    );
    if size > HARD_LIMIT_BYTES {
        bail!("ferry-agent is {size} bytes, above the {HARD_LIMIT_BYTES}-byte hard limit");
    }
    if size > TARGET_BYTES {
        eprintln!("warning: ferry-agent is above its {TARGET_BYTES}-byte target");
    }
    Ok(path)
}

/// Where [`build_agent`] leaves the binary.
pub fn agent_path() -> PathBuf {
    project_root()
        .join("target")
        .join(AGENT_TARGET)
        .join("release")
        .join("ferry-agent")
}

/// Builds `vsock-probe` (qemu-tests' guest-side client of the peer-check scenario) in release
/// mode for [`AGENT_TARGET`], static like the agent, and returns the binary's path. The full
/// image ships it as `/bin/vsock-probe`.
pub fn build_vsock_probe() -> Result<PathBuf> {
    run(cargo().args([
        "build",
        "--quiet",
        "--release",
        "--package",
        "qemu-tests",
        "--bin",
        "vsock-probe",
        "--target",
        AGENT_TARGET,
    ]))
    .context("building vsock-probe")?;
    Ok(project_root()
        .join("target")
        .join(AGENT_TARGET)
        .join("release")
        .join("vsock-probe"))
}
