//! `cargo xtask`: ferry's build, image, VM and benchmark automation (no shell scripts).

mod arch;
mod bench;
mod bench_files;
mod bench_peers;
mod bench_plot;
mod bench_qga;
mod bench_vm;
mod build_agent;
mod cpio;
mod deps;
mod e2e;
mod e2e_system;
mod foreign_apt;
mod fuzz;
mod initramfs;
mod kernel;
mod machine;
mod ready;
mod sys;
mod test;
mod util;
mod vm;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::arch::Arch;
use crate::machine::Machine;

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
    BuildAgent {
        /// The guest architecture to build for.
        #[arg(long, value_enum, default_value_t)]
        arch: Arch,
    },
    /// Build the guest image: a newc cpio with the agent as /init, the vsock modules and (unless
    /// --minimal) a static busybox; fetches the Debian cloud kernel into target/ferry-vm/.
    Initramfs {
        /// The guest architecture (its agent, kernel modules and busybox).
        #[arg(long, value_enum, default_value_t)]
        arch: Arch,
        /// Only the agent and the kernel modules: no busybox, no shell.
        #[arg(long)]
        minimal: bool,
        /// The machine the image is for: its vsock device's bus decides the modules it loads
        /// (default: the architecture's first, microvm or virt).
        #[arg(long, value_enum)]
        machine: Option<Machine>,
        /// Where to write the image (default target/ferry-vm/[aarch64/]initramfs[-minimal][-pci].cpio).
        #[arg(long, value_name = "PATH")]
        out: Option<std::path::PathBuf>,
    },
    /// Boot the agent as PID 1 in QEMU. With a command: run it in the guest through ferry, power
    /// off, exit with its status. Without: print FERRY_CONNECT=... and run until Ctrl-C/SIGTERM.
    Vm {
        /// The guest architecture: x86_64 boots QEMU `microvm`, aarch64 `virt` (TCG on an
        /// x86_64 host).
        #[arg(long, value_enum, default_value_t)]
        arch: Arch,
        /// Boot the agent-only image (no busybox: `ferry health` works, `sh` does not).
        #[arg(long)]
        minimal: bool,
        /// The QEMU machine. x86_64: microvm (virtio-mmio, the default) or q35 (PCI:
        /// vhost-vsock-pci, or vhost-user-vsock-pci without /dev/vhost-vsock). aarch64: virt
        /// (virtio-mmio, the default) or virt-pci (the same machine, the device on PCI).
        #[arg(long, value_enum)]
        machine: Option<Machine>,
        /// Give up when the agent has not announced itself this long after QEMU started.
        #[arg(long, default_value_t = 60)]
        ready_timeout_secs: u64,
        /// The program to run in the guest, and its arguments (after `--`).
        #[arg(last = true, value_name = "PROG")]
        command: Vec<String>,
    },
    /// The QEMU end-to-end suite: install or check the tools, build, boot, run qemu-tests, then
    /// check the agent-only image; everything torn down after.
    E2e {
        /// The guest architecture.
        #[arg(long, value_enum, default_value_t)]
        arch: Arch,
        /// Wall-clock limit for the whole run.
        #[arg(long, default_value_t = e2e::DEFAULT_E2E_TIMEOUT.as_secs())]
        timeout_secs: u64,
        /// The QEMU machine the guests boot on (see `vm --machine`).
        #[arg(long, value_enum)]
        machine: Option<Machine>,
    },
    /// Everything CI runs: build the agent, run every crate's tests against it, a few seconds
    /// of each wire fuzz target, then the QEMU end-to-end suite on both architectures' machine
    /// types (x86_64 microvm and q35, aarch64 virt and virt-pci).
    Test {
        /// Skip the QEMU end-to-end suite.
        #[arg(long)]
        skip_e2e: bool,
    },
    /// Coverage-guided fuzzing of the wire crate (cargo-fuzz, libFuzzer; wire/fuzz/): every
    /// target, or the named ones, from corpora in target/fuzz-corpus/ seeded with the golden
    /// transcripts. Installs a nightly toolchain and cargo-fuzz when missing; fails on a crash,
    /// naming the input.
    Fuzz {
        /// Seconds per target.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        time: u64,
        /// A few seconds per target (the check `cargo xtask test` runs).
        #[arg(long, conflicts_with = "time")]
        smoke: bool,
        /// Only install the tools and build the targets.
        #[arg(long)]
        prepare: bool,
        /// The targets to run (default: all).
        #[arg(value_name = "TARGET")]
        targets: Vec<String>,
    },
    /// Measure ferry next to its baselines; print the table and write BENCHMARKS.md (each of
    /// `bench` and `bench --peers` rewrites its own section of it).
    Bench {
        /// Exec round trips per side (with --peers: rounds, each one exec of every peer).
        #[arg(long, default_value_t = 2000)]
        runs: usize,
        /// MiB per stream throughput trial (default 1024; with --peers 256).
        #[arg(long)]
        stream_mib: Option<u64>,
        /// Also boot the guest and measure over real virtio-vsock.
        #[arg(long, conflicts_with = "peers")]
        vm: bool,
        /// Instead: ferry side by side with qemu-guest-agent, OpenSSH and dropbear (Debian
        /// packages unpacked under target/, run as plain processes here), interleaved round by
        /// round; writes a table and docs/bench-peers.png.
        #[arg(long)]
        peers: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::BuildAgent { arch } => {
            build_agent::build_agent_for(arch)?;
        }
        Command::Initramfs {
            arch,
            minimal,
            machine,
            out,
        } => {
            let machine = machine_for(arch, machine)?;
            initramfs::build_initramfs(arch, minimal, machine.transport(), out.as_deref())?;
        }
        Command::Vm {
            arch,
            minimal,
            machine,
            ready_timeout_secs,
            command,
        } => {
            let options = vm::VmOptions {
                arch,
                minimal,
                machine: machine_for(arch, machine)?,
                ready_timeout: std::time::Duration::from_secs(ready_timeout_secs),
                ..vm::VmOptions::default()
            };
            let code = e2e::run_vm(&options, &command)?;
            std::process::exit(code);
        }
        Command::E2e {
            arch,
            timeout_secs,
            machine,
        } => e2e::run_e2e(&e2e::E2eOptions {
            arch,
            timeout: std::time::Duration::from_secs(timeout_secs),
            machine: machine_for(arch, machine)?,
        })?,
        Command::Test { skip_e2e } => test::run_test(skip_e2e)?,
        Command::Fuzz {
            time,
            smoke,
            prepare,
            targets,
        } => fuzz::run_fuzz(&fuzz::FuzzOptions {
            secs: if smoke { fuzz::SMOKE_SECS } else { time },
            targets,
            prepare_only: prepare,
        })?,
        Command::Bench {
            runs,
            stream_mib,
            vm: _,
            peers: true,
        } => bench_peers::run_peers(&bench_peers::PeersOptions {
            runs,
            stream_bytes: stream_mib.unwrap_or(256) << 20,
        })?,
        Command::Bench {
            runs,
            stream_mib,
            vm,
            peers: false,
        } => bench::run_bench(&bench::BenchOptions {
            runs,
            stream_bytes: stream_mib.unwrap_or(1024) << 20,
            vm,
        })?,
    }
    Ok(())
}

/// `--machine`, or the architecture's default; refused when it belongs to another architecture.
fn machine_for(arch: Arch, machine: Option<Machine>) -> Result<Machine> {
    machine
        .unwrap_or(Machine::default_for(arch))
        .check_arch(arch)
}
