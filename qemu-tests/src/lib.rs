//! The booted guest the QEMU run of the scenario suite talks to.
//!
//! The suite itself (`tests/suite/`) is shared with the Unix-socket run in `host/tests/agent.rs`;
//! `tests/scenarios.rs` runs it, and the scenarios only a guest has, against the agent as PID 1
//! over real virtio-vsock. `cargo xtask e2e` boots the guest once per run and hands its address
//! to the test binary in `FERRY_CONNECT`; every test in the binary shares that one boot.

use anyhow::{Context, Result};
use ferry_host::Target;

/// The environment variable that carries the guest's address.
pub const TARGET_VAR: &str = "FERRY_CONNECT";

/// The guest agent's secret file, from `FERRY_SECRET_FILE` (`cargo xtask e2e` sets it); `None`
/// when unset, for a guest whose agent runs `--insecure`.
pub fn secret_file() -> Option<std::path::PathBuf> {
    std::env::var_os(ferry_host::SECRET_FILE_ENV)
        .filter(|path| !path.is_empty())
        .map(Into::into)
}

/// The guest's address, from `FERRY_CONNECT`.
pub fn target() -> Result<Target> {
    let text = std::env::var(TARGET_VAR).with_context(|| {
        format!("{TARGET_VAR} is not set: the QEMU scenarios need a booted guest; run them with `cargo xtask e2e`")
    })?;
    text.parse()
        .with_context(|| format!("{TARGET_VAR}={text} is not a ferry target"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_target_says_how_to_run() {
        if std::env::var_os(TARGET_VAR).is_none() {
            let err = target().expect_err("unset");
            assert!(format!("{err:#}").contains("cargo xtask e2e"), "{err:#}");
        }
    }
}
