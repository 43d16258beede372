//! `ferry info`, `shutdown`, `time-sync` and `reseed`: the operations on the guest itself.

use std::process::ExitCode;
use std::time::Duration;

use ferry_host::{Client, SystemReport};

use crate::{fail, units};

#[derive(clap::Args)]
pub struct InfoArgs {
    /// Print the stable JSON document (field names in docs/cli.md) instead of a summary
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct ShutdownArgs {
    /// Reboot instead of powering off
    #[arg(long)]
    reboot: bool,
    /// Time between SIGTERM and SIGKILL for the guest's processes (e.g. 500ms, 5s; at most 10m)
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = units::parse_duration)]
    grace: Duration,
}

#[derive(clap::Args)]
pub struct ReseedArgs {
    /// How many random bytes of the host's to add (1 to 512)
    #[arg(long, value_name = "N", default_value_t = 64)]
    bytes: usize,
}

pub fn info(client: &Client, args: InfoArgs) -> ExitCode {
    let report = match client.info() {
        Ok(report) => report,
        Err(err) => return fail(&err),
    };
    if args.json {
        println!("{}", report.to_json());
    } else {
        print_summary(&report);
    }
    ExitCode::SUCCESS
}

fn print_summary(report: &SystemReport) {
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    println!("hostname:   {}", report.hostname);
    println!(
        "kernel:     {} {} ({})",
        report.kernel_release, report.machine, report.kernel_version
    );
    let uptime = report.uptime_ms / 1000;
    println!(
        "uptime:     {}d {:02}:{:02}:{:02} (booted {})",
        uptime / 86_400,
        uptime % 86_400 / 3600,
        uptime % 3600 / 60,
        uptime % 60,
        ferry_host::rfc3339(report.boot_time_ms())
    );
    println!("clock:      {}", ferry_host::rfc3339(report.clock_ms));
    let model = if report.cpu_model.is_empty() {
        String::new()
    } else {
        format!(" ({})", report.cpu_model)
    };
    println!(
        "cpus:       {}{model}, load {:.2} {:.2} {:.2}, {} processes",
        report.cpus, report.load[0], report.load[1], report.load[2], report.processes
    );
    println!(
        "memory:     {:.1} MiB total, {:.1} MiB available",
        mib(report.memory_total),
        mib(report.memory_available)
    );
    for mount in &report.mounts {
        println!(
            "mount:      {} on {} ({}{}) {:.1}/{:.1} MiB free",
            mount.source,
            mount.target,
            mount.fstype,
            if mount.read_only { ", ro" } else { "" },
            mib(mount.available),
            mib(mount.total)
        );
    }
    for interface in &report.interfaces {
        println!(
            "interface:  {} {} mtu {}{}{} rx {} B tx {} B",
            interface.name,
            if interface.up { "up" } else { "down" },
            interface.mtu,
            if interface.mac.is_empty() {
                String::new()
            } else {
                format!(" {}", interface.mac)
            },
            interface
                .addresses
                .iter()
                .map(|a| format!(" {a}"))
                .collect::<String>(),
            interface.rx_bytes,
            interface.tx_bytes
        );
    }
    let agent = &report.agent;
    println!(
        "agent:      ferry-agent {} (protocol {}), pid {} ({}), {:.1} MiB resident, {}",
        agent.version,
        agent.protocol,
        agent.pid,
        agent.mode,
        mib(agent.rss),
        agent.security
    );
}

pub fn shutdown(client: &Client, args: ShutdownArgs) -> ExitCode {
    match client.shutdown(args.reboot, args.grace) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(&err),
    }
}

pub fn time_sync(client: &Client) -> ExitCode {
    let step = match client.time_sync() {
        Ok(step) => step,
        Err(err) => return fail(&err),
    };
    let ms = |time: std::time::SystemTime| match time.duration_since(std::time::UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_millis()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_millis()).unwrap_or(i64::MAX),
    };
    let seconds = step.step_seconds();
    let step_text = if seconds.abs() >= 86_400.0 {
        format!("{:+.0} days", seconds / 86_400.0)
    } else {
        format!("{seconds:+.3} s")
    };
    println!(
        "guest clock was {}, set to {}; step {step_text}",
        ferry_host::rfc3339(ms(step.previous)),
        ferry_host::rfc3339(ms(step.set_to))
    );
    ExitCode::SUCCESS
}

pub fn reseed(client: &Client, args: ReseedArgs) -> ExitCode {
    match client.reseed(args.bytes) {
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => fail(&err),
    }
}
