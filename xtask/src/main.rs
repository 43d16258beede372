//! `cargo xtask`: ferry's build, image, VM and benchmark automation (no shell scripts).

mod bench;
mod bench_vm;
mod build_agent;
mod e2e_entry;
mod sys;
mod test;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "ferry's build, image, VM and benchmark automation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the static agent (musl, no_std) and check its size against the budget.
    BuildAgent,
    /// Everything CI runs: build the agent, run every crate's tests against it, then the QEMU
    /// end-to-end suite.
    Test {
        /// Skip the QEMU end-to-end suite.
        #[arg(long)]
        skip_e2e: bool,
    },
    /// Measure ferry next to its baselines; print the table and write BENCHMARKS.md.
    Bench {
        /// Exec round trips per side.
        #[arg(long, default_value_t = 2000)]
        runs: usize,
        /// MiB per stream throughput trial.
        #[arg(long, default_value_t = 1024)]
        stream_mib: u64,
        /// Also boot the guest and measure over real virtio-vsock.
        #[arg(long)]
        vm: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::BuildAgent => {
            build_agent::build_agent()?;
        }
        Command::Test { skip_e2e } => test::run_test(skip_e2e)?,
        Command::Bench {
            runs,
            stream_mib,
            vm,
        } => bench::run_bench(&bench::BenchOptions {
            runs,
            stream_bytes: stream_mib << 20,
            vm,
        })?,
    }
    Ok(())
}
