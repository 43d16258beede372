//! The shipped agent's per-command bounds on a Unix socket: the runtime and output limits its
//! pump enforces, and the rlimits its child applies (`--set KEY=VALUE` policy flags).
#![allow(clippy::unwrap_used)] // a test reports failure by panicking

mod common;

use std::time::{Duration, Instant};

use common::Agent;
use ferry_host::{Command, ExitStatus};

const KILLED: ExitStatus = ExitStatus::Signal {
    number: 9,
    core_dumped: false,
};

fn sh(script: &str) -> Command {
    let mut command = Command::new("sh");
    command.arg("-c").arg(script);
    command
}

#[test]
fn output_exactly_at_the_limit_completes_and_one_byte_more_is_cut() {
    let agent = Agent::start_with(&["--set", "max_output=10"]);
    let client = agent.client();

    // Stdout and stderr count together: 4 + 6 = 10.
    let exact = client
        .output(&sh("printf 0123; printf 456789 >&2"))
        .unwrap();
    assert_eq!(exact.status, ExitStatus::Code(0));
    assert!(!exact.output_dropped);
    assert_eq!(exact.stdout.len() + exact.stderr.len(), 10);

    // One byte more: the first 10 arrive, the rest is dropped and said to be.
    let over = client.output(&sh("printf 0123456789X")).unwrap();
    assert!(over.output_dropped);
    assert_eq!(over.stdout, b"0123456789");

    // A command that keeps writing is killed.
    let endless = client.output(&Command::new("yes")).unwrap();
    assert_eq!(endless.status, KILLED);
    assert!(endless.output_dropped);
    assert_eq!(endless.stdout, b"y\ny\ny\ny\ny\n");
}

#[test]
fn a_command_past_its_runtime_is_killed_with_its_group() {
    let agent = Agent::start_with(&["--set", "max_runtime=1s"]);
    let client = agent.client();

    let quick = client.output(&sh("sleep 0.1; echo done")).unwrap();
    assert_eq!(quick.status, ExitStatus::Code(0));
    assert_eq!(quick.stdout, b"done\n");

    let started = Instant::now();
    // The background sleep holds the output pipe: it must die too (same process group).
    let slow = client.output(&sh("sleep 30 & sleep 30")).unwrap();
    let took = started.elapsed();
    assert_eq!(slow.status, KILLED);
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(!slow.output_dropped);
}

#[test]
fn commands_get_the_policys_rlimits() {
    let agent = Agent::start_with(&["--set", "rlimit_nofile=77", "--set", "rlimit_core=0"]);
    let out = agent
        .client()
        .output(&sh("ulimit -n; ulimit -H -n; ulimit -c"))
        .unwrap();
    assert_eq!(out.status, ExitStatus::Code(0));
    assert_eq!(out.stdout, b"77\n77\n0\n");
}
