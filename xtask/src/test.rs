//! `cargo xtask test`: the whole suite, the way CI runs it.

use anyhow::{Context, Result};

use std::time::Instant;

use crate::arch::Arch;
use crate::build_agent::{build_agent, build_agent_for};
use crate::util::{cargo, run};

/// Builds the static agent, runs every crate's tests against that very binary, then a few seconds
/// of each wire fuzz target, then (unless told not to) the QEMU end-to-end suite on each guest
/// architecture, x86_64 first. The aarch64 agent is built (and its size checked) up front, so a
/// build failure shows before the long runs.
pub fn run_test(skip_e2e: bool) -> Result<()> {
    let agent = build_agent()?;
    build_agent_for(Arch::Aarch64)?;
    run(cargo()
        // The async API's tests need its feature; `--all-features` would also switch on the
        // QEMU scenarios, which `e2e` runs against a booted guest.
        .args(["test", "--workspace", "--features", "ferry-host/tokio"])
        .env("FERRY_AGENT_BIN", &agent))
    .context("unit and integration tests")?;
    crate::fuzz::run_fuzz(&crate::fuzz::FuzzOptions::smoke()).context("fuzz smoke run")?;
    if skip_e2e {
        eprintln!("skipping the QEMU end-to-end suite (--skip-e2e)");
        return Ok(());
    }
    let mut took = Vec::new();
    for arch in Arch::ALL {
        let started = Instant::now();
        crate::e2e::run_e2e(&crate::e2e::E2eOptions {
            arch,
            ..crate::e2e::E2eOptions::default()
        })
        .with_context(|| format!("the QEMU end-to-end suite on {arch}"))?;
        took.push(format!("{arch} {:.0} s", started.elapsed().as_secs_f64()));
    }
    eprintln!("e2e: {}", took.join(", "));
    Ok(())
}
