//! `cargo xtask test`: the whole suite, the way CI runs it.

use anyhow::{Context, Result};

use std::time::Instant;

use crate::arch::Arch;
use crate::build_agent::{build_agent, build_agent_for};
use crate::machine::Machine;
use crate::util::{cargo, project_root, run};

/// Builds the static agent, runs every crate's tests against that very binary, then a few seconds
/// of each wire fuzz target, then (unless told not to) the QEMU end-to-end suite on every machine
/// type of each guest architecture, x86_64 first. The aarch64 agent is built (and its size
/// checked) up front, so a build failure shows before the long runs.
pub fn run_test(skip_e2e: bool) -> Result<()> {
    let agent = build_agent()?;
    build_agent_for(Arch::Aarch64)?;
    // The tests' scratch directories, sockets and secrets go to a temp dir of the run's own,
    // removed when the tests pass (kept for a look when they fail): a test that panics leaves
    // its directory behind, and thousands of runs' worth piled up in /tmp.
    let scratch = project_root().join("target").join("test-tmp");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    run(cargo()
        // The async API's tests need its feature; `--all-features` would also switch on the
        // QEMU scenarios, which `e2e` runs against a booted guest.
        .args(["test", "--workspace", "--features", "ferry-host/tokio"])
        .env("FERRY_AGENT_BIN", &agent)
        .env("TMPDIR", &scratch))
    .with_context(|| {
        format!(
            "unit and integration tests (their scratch files are in {})",
            scratch.display()
        )
    })?;
    std::fs::remove_dir_all(&scratch).with_context(|| format!("removing {}", scratch.display()))?;
    crate::fuzz::run_fuzz(&crate::fuzz::FuzzOptions::smoke()).context("fuzz smoke run")?;
    if skip_e2e {
        eprintln!("skipping the QEMU end-to-end suite (--skip-e2e)");
        return Ok(());
    }
    // Every machine type of each architecture, so both virtio transports (mmio and PCI) and
    // their modules are exercised on both; the default machine first.
    let mut took = Vec::new();
    for arch in Arch::ALL {
        for machine in Machine::all(arch) {
            let started = Instant::now();
            crate::e2e::run_e2e(&crate::e2e::E2eOptions {
                arch,
                machine,
                ..crate::e2e::E2eOptions::default()
            })
            .with_context(|| format!("the QEMU end-to-end suite on {arch} {machine}"))?;
            let line = format!("{arch} {machine} {:.0} s", started.elapsed().as_secs_f64());
            eprintln!("test: e2e on {line}");
            took.push(line);
        }
    }
    eprintln!("test: e2e took {}", took.join(", "));
    Ok(())
}
