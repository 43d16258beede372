//! The shipped agent binary on a Unix socket: the scenario suite (shared with the QEMU run, see
//! `qemu-tests/tests/suite/`), each scenario against a fresh agent, plus what only an agent run as
//! a service has. The suite's exec cases run through the blocking API, the epoll example and,
//! with `--features tokio` (as `cargo xtask test` runs it), the async API.
#![allow(clippy::unwrap_used)] // a test reports failure by panicking

mod common;
#[path = "../../qemu-tests/tests/suite/mod.rs"]
mod suite;

use std::thread;
use std::time::{Duration, Instant};

use common::{children, Agent};
use suite::{Fixture, Scale};

/// A fresh agent of the scenario's own, killed with everything it started when the scenario ends.
fn unix_agent(_scenario: &'static str) -> Fixture {
    let agent = Agent::start();
    Fixture {
        target: agent.target(),
        secret_file: Some(agent.secret_path().to_owned()),
        listener_pid: agent.pid(),
        scratch: agent.scratch_dir(),
        scale: Scale {
            bulk_bytes: 512 << 20,
            parallel_execs: 64,
        },
        keep_alive: Some(Box::new(agent)),
    }
}

suite::scenario_tests!(unix_agent);

#[test]
fn stopping_the_agent_leaves_no_spare_behind() {
    let agent = Agent::start();
    let deadline = Instant::now() + Duration::from_secs(10);
    let spares = loop {
        let spares = children(agent.pid());
        if spares.len() >= 2 {
            break spares;
        }
        assert!(
            Instant::now() < deadline,
            "spares: {spares:?}, expected two"
        );
        thread::sleep(Duration::from_millis(5));
    };
    // A connection in progress is served to its end; an idle spare dies with the listener.
    drop(agent);
    let deadline = Instant::now() + Duration::from_secs(5);
    for spare in spares {
        loop {
            match std::fs::read_to_string(format!("/proc/{spare}/stat")) {
                Err(_) => break,
                Ok(stat) if stat.contains(") Z") => break,
                Ok(_) => assert!(
                    Instant::now() < deadline,
                    "spare {spare} outlived the agent"
                ),
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}
