//! `cargo xtask`: ferry's build, image, VM and benchmark automation (no shell scripts).

mod build_agent;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "ferry's build, image, VM and benchmark automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the static agent (musl, no_std) and check its size against the budget.
    BuildAgent,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::BuildAgent => {
            build_agent::build_agent()?;
        }
    }
    Ok(())
}
