//! `cargo xtask fuzz`: coverage-guided fuzzing of the wire crate with cargo-fuzz (libFuzzer).
//!
//! The targets live in `wire/fuzz/` (their own Cargo workspace). Each runs for a fixed time from
//! a corpus under `target/fuzz-corpus/<target>/` (kept between runs, never committed) that is
//! seeded from the golden transcripts in `wire/transcripts/`, so the fuzzers start from real
//! conversations. A crash fails the run with the path of the input that caused it.
//!
//! What it needs is installed when missing: a nightly toolchain (sanitizer coverage is a nightly
//! flag) and cargo-fuzz, pinned. Without a nightly toolchain to be had, the default toolchain is
//! used with `RUSTC_BOOTSTRAP=1`, which cargo-fuzz supports.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::util::{cargo, project_root, run};

/// The fuzz project, relative to the root.
const FUZZ_DIR: &str = "wire/fuzz";
/// cargo-fuzz, pinned: its command line is what this module speaks.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Seconds per target for `--smoke`: enough to replay the corpus and run fresh inputs.
pub const SMOKE_SECS: u64 = 5;
/// An input that takes longer than this is a finding (a stall), not a slow run.
const INPUT_TIMEOUT_SECS: u64 = 10;

/// Which golden transcript files seed a target, and how.
#[derive(Debug, Clone, Copy)]
enum Seeds {
    /// Both directions, as raw bytes.
    RawStreams,
    /// Both directions, followed by an empty set of driver choices (see `wire/fuzz/src/lib.rs`).
    Streams,
    /// What a client sends (`*.client.bin`), followed by an empty set of driver choices.
    ClientStreams,
    /// What an agent sends (`*.agent.bin`), followed by an empty set of driver choices.
    AgentStreams,
}

/// The fuzz targets, in the order they run (cheapest first).
const TARGETS: &[(&str, Seeds)] = &[
    ("decode_frames", Seeds::RawStreams),
    ("recv_buf", Seeds::Streams),
    ("agent_session", Seeds::ClientStreams),
    ("client_session", Seeds::AgentStreams),
    // Its first byte picks how the stream is built around the right opening; the transcripts'
    // proofs are for another secret, so raw streams seed it.
    ("auth", Seeds::RawStreams),
];

/// What to fuzz and for how long.
#[derive(Debug, Clone)]
pub struct FuzzOptions {
    /// Seconds per target.
    pub secs: u64,
    /// The targets to run; all when empty.
    pub targets: Vec<String>,
    /// Only install the tools and build the targets.
    pub prepare_only: bool,
}

impl FuzzOptions {
    /// A few seconds per target: the check `cargo xtask test` runs.
    pub fn smoke() -> FuzzOptions {
        FuzzOptions {
            secs: SMOKE_SECS,
            targets: Vec::new(),
            prepare_only: false,
        }
    }
}

/// One target's result.
#[derive(Debug)]
struct Outcome {
    target: &'static str,
    executions: u64,
    corpus: usize,
}

/// Installs what is missing, builds the targets, runs each for `options.secs` seconds and prints
/// the executions per target. Fails at the first crash, naming its input.
pub fn run_fuzz(options: &FuzzOptions) -> Result<()> {
    let targets = select(&options.targets)?;
    let toolchain = Toolchain::ensure()?;
    ensure_cargo_fuzz(&toolchain)?;
    let root = project_root();
    eprintln!("fuzz: building the targets ({})", toolchain.describe());
    run(toolchain
        .cargo_fuzz(&root)
        .args(["build", "--fuzz-dir", FUZZ_DIR, "--sanitizer", "none"]))
    .context("building the fuzz targets")?;
    if options.prepare_only {
        return Ok(());
    }
    let mut outcomes = Vec::new();
    for &(target, seeds) in &targets {
        outcomes.push(fuzz_one(&toolchain, &root, target, seeds, options.secs)?);
    }
    println!("\n{:<16} {:>14} {:>8}", "target", "executions", "corpus");
    for outcome in &outcomes {
        println!(
            "{:<16} {:>14} {:>8}",
            outcome.target, outcome.executions, outcome.corpus
        );
    }
    println!("no crashes ({} s per target)", options.secs);
    Ok(())
}

fn select(names: &[String]) -> Result<Vec<(&'static str, Seeds)>> {
    if names.is_empty() {
        return Ok(TARGETS.to_vec());
    }
    names
        .iter()
        .map(|name| {
            TARGETS
                .iter()
                .find(|(target, _)| target == name)
                .copied()
                .with_context(|| {
                    let known: Vec<&str> = TARGETS.iter().map(|(target, _)| *target).collect();
                    format!("no fuzz target {name:?} (known: {})", known.join(", "))
                })
        })
        .collect()
}

/// Runs one target from its seeded corpus; its libFuzzer output goes to a log file.
fn fuzz_one(
    toolchain: &Toolchain,
    root: &Path,
    target: &'static str,
    seeds: Seeds,
    secs: u64,
) -> Result<Outcome> {
    let corpus = root.join("target/fuzz-corpus").join(target);
    seed_corpus(root, &corpus, seeds)?;
    let artifacts = root.join("target/fuzz-artifacts").join(target);
    fs::create_dir_all(&artifacts).with_context(|| format!("creating {}", artifacts.display()))?;
    let before = list(&artifacts)?;
    let log_dir = root.join("target/fuzz-logs");
    fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let log_path = log_dir.join(format!("{target}.log"));
    let log =
        fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;

    eprintln!("fuzz: {target} for {secs} s");
    let started = Instant::now();
    let mut artifact_prefix = artifacts.clone().into_os_string();
    artifact_prefix.push("/");
    let mut artifact_arg = std::ffi::OsString::from("-artifact_prefix=");
    artifact_arg.push(&artifact_prefix);
    let status = toolchain
        .cargo_fuzz(root)
        .args(["run", "--fuzz-dir", FUZZ_DIR, "--sanitizer", "none", target])
        .arg(&corpus)
        .arg("--")
        .arg(format!("-max_total_time={secs}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .arg("-print_final_stats=1")
        .arg(artifact_arg)
        .stdout(log.try_clone().context("duplicating the log file")?)
        .stderr(log)
        .status()
        .context("cannot start cargo fuzz")?;
    let output =
        fs::read_to_string(&log_path).with_context(|| format!("reading {}", log_path.display()))?;
    if !status.success() {
        let tail: Vec<&str> = output.lines().rev().take(40).collect();
        for line in tail.iter().rev() {
            eprintln!("  {line}");
        }
        let found: Vec<PathBuf> = list(&artifacts)?
            .into_iter()
            .filter(|path| !before.contains(path))
            .collect();
        let Some(artifact) = found.first() else {
            bail!(
                "fuzz target {target} failed ({status}) without leaving an input; log: {}",
                log_path.display()
            );
        };
        bail!(
            "fuzz target {target} CRASHED: input {}\n  reproduce: cargo +nightly fuzz run --fuzz-dir {FUZZ_DIR} -s none {target} {}\n  log: {}",
            artifact.display(),
            artifact.display(),
            log_path.display()
        );
    }
    let executions = final_stat(&output, "number_of_executed_units")
        .with_context(|| format!("no final stats from {target} (log: {})", log_path.display()))?;
    eprintln!(
        "fuzz: {target}: {executions} executions in {:.0?}",
        started.elapsed()
    );
    Ok(Outcome {
        target,
        executions,
        corpus: list(&corpus)?.len(),
    })
}

/// `stat::NAME: VALUE` from libFuzzer's `-print_final_stats=1` output.
fn final_stat(output: &str, name: &str) -> Option<u64> {
    let key = format!("stat::{name}:");
    output
        .lines()
        .rev()
        .find_map(|line| line.trim().strip_prefix(&key))
        .and_then(|value| value.trim().parse().ok())
}

/// Writes the golden transcripts into the corpus in the target's input format (idempotent).
fn seed_corpus(root: &Path, corpus: &Path, seeds: Seeds) -> Result<()> {
    fs::create_dir_all(corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let transcripts = root.join("wire/transcripts");
    let mut seeded = 0;
    for path in list(&transcripts)? {
        let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
            continue;
        };
        let wanted = match seeds {
            Seeds::RawStreams | Seeds::Streams => name.ends_with(".bin"),
            Seeds::ClientStreams => name.ends_with(".client.bin"),
            Seeds::AgentStreams => name.ends_with(".agent.bin"),
        };
        if !wanted {
            continue;
        }
        let stream = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let input = match seeds {
            Seeds::RawStreams => stream,
            // No driver choices: the target's default script runs the conversation.
            _ => [&stream[..], &[0u8]].concat(),
        };
        let seed = corpus.join(format!("golden-{name}"));
        fs::write(&seed, input).with_context(|| format!("writing {}", seed.display()))?;
        seeded += 1;
    }
    if seeded == 0 {
        bail!("no golden transcripts in {}", transcripts.display());
    }
    Ok(())
}

fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        paths.push(
            entry
                .with_context(|| format!("listing {}", dir.display()))?
                .path(),
        );
    }
    paths.sort();
    Ok(paths)
}

/// The toolchain the targets are built with.
#[derive(Debug)]
enum Toolchain {
    /// rustup's `nightly`.
    Nightly,
    /// The default toolchain with nightly features unlocked (`RUSTC_BOOTSTRAP=1`): for machines
    /// where no nightly can be installed.
    Bootstrapped,
}

impl Toolchain {
    /// A nightly toolchain, installed (minimal profile) when missing.
    fn ensure() -> Result<Toolchain> {
        if rustup_nightly_works() {
            return Ok(Toolchain::Nightly);
        }
        eprintln!("fuzz: installing a nightly toolchain (rustup, minimal profile)");
        let installed = Command::new("rustup")
            .args(["toolchain", "install", "nightly", "--profile", "minimal"])
            .status()
            .is_ok_and(|status| status.success());
        if installed && rustup_nightly_works() {
            return Ok(Toolchain::Nightly);
        }
        eprintln!(
            "fuzz: WARNING: no nightly toolchain could be installed; using the default toolchain \
             with RUSTC_BOOTSTRAP=1"
        );
        Ok(Toolchain::Bootstrapped)
    }

    fn describe(&self) -> &'static str {
        match self {
            Toolchain::Nightly => "nightly",
            Toolchain::Bootstrapped => "default toolchain, RUSTC_BOOTSTRAP=1",
        }
    }

    /// `cargo fuzz` on this toolchain, run from the project root.
    fn cargo_fuzz(&self, root: &Path) -> Command {
        let mut cmd = match self {
            Toolchain::Nightly => {
                let mut cmd = Command::new("rustup");
                cmd.args(["run", "nightly", "cargo"]);
                cmd
            }
            Toolchain::Bootstrapped => {
                let mut cmd = Command::new("cargo");
                cmd.env("RUSTC_BOOTSTRAP", "1");
                cmd
            }
        };
        cmd.arg("fuzz").current_dir(root);
        cmd
    }
}

fn rustup_nightly_works() -> bool {
    Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|output| output.status.success())
}

/// cargo-fuzz at the pinned version, installed from crates.io when missing (a few minutes; no
/// prebuilt binary is reachable).
fn ensure_cargo_fuzz(toolchain: &Toolchain) -> Result<()> {
    let version = toolchain
        .cargo_fuzz(&project_root())
        .arg("--version")
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string());
    let wanted = format!("cargo-fuzz {CARGO_FUZZ_VERSION}");
    if version.as_deref() == Some(wanted.as_str()) {
        return Ok(());
    }
    eprintln!(
        "fuzz: installing cargo-fuzz {CARGO_FUZZ_VERSION} (found: {})",
        version.as_deref().unwrap_or("none")
    );
    run(cargo().args([
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
    ]))
    .context("installing cargo-fuzz")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_stats_are_read_from_the_last_report() {
        let output = "INFO: seed\n#2 INITED\nstat::number_of_executed_units: 12\n\
                      stat::average_exec_per_sec:     3\nstat::number_of_executed_units: 4567\n";
        assert_eq!(final_stat(output, "number_of_executed_units"), Some(4567));
        assert_eq!(final_stat(output, "average_exec_per_sec"), Some(3));
        assert_eq!(final_stat("crash", "number_of_executed_units"), None);
    }

    #[test]
    fn targets_are_selected_by_name() {
        assert_eq!(select(&[]).unwrap().len(), TARGETS.len());
        let one = select(&["recv_buf".to_string()]).unwrap();
        assert_eq!(one.len(), 1);
        assert!(select(&["nope".to_string()]).is_err());
    }
}
