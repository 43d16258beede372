//! The agent's peer check over real vsock: connections from the guest itself (CID 1,
//! `VMADDR_CID_LOCAL`, and the guest's own CID) are refused before the hello, closed without a
//! byte and logged (one rate-limited line), while the host's connections are served.
//!
//! Run in the VM only (the agent is the guest's init: [`Fixture::listener_pid`] 1): the full image
//! ships `/bin/vsock-probe` (qemu-tests' `src/bin/vsock-probe.rs`) and loads vsock's loopback
//! transport, without which nothing in the guest can reach its own CIDs. Over the Unix socket
//! there is no vsock peer to check: there the scenario says loudly that it was skipped, and
//! passes.

use std::time::{Duration, Instant};

use ferry_host::Command;

use super::bombs::say;
use super::{stdout_of, Fixture};

/// The port the guest's agent listens on (xtask's `AGENT_PORT`).
const AGENT_PORT: u32 = 1024;
/// The guest console's log on the host; `cargo xtask e2e` sets it.
const CONSOLE_VAR: &str = "FERRY_GUEST_CONSOLE";
/// What the agent logs for each refused peer.
const REFUSAL: &str = "refused a vsock connection from CID ";

/// What `vsock-probe CID PORT` saw, run in the guest.
fn probe(fixture: &Fixture, cid: u32) -> String {
    let line = stdout_of(
        &fixture.client(),
        Command::new("/bin/vsock-probe")
            .arg(cid.to_string())
            .arg(AGENT_PORT.to_string()),
    );
    line.trim_end().to_owned()
}

/// The refusal lines in the guest's console log so far.
fn refusals(console: &std::path::Path) -> Vec<String> {
    std::fs::read(console)
        .map(|bytes| {
            String::from_utf8_lossy(&bytes)
                .lines()
                .filter(|line| line.contains(REFUSAL))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

pub fn the_guest_itself_is_refused_before_the_hello(fixture: &Fixture) {
    const SCENARIO: &str = "the_guest_itself_is_refused_before_the_hello";
    if fixture.listener_pid != 1 {
        say(&format!(
            "SKIPPED {SCENARIO}: runs only against an agent that is a guest's init (`cargo xtask e2e`); \
             this agent (pid {}) listens on a Unix socket, where no vsock peer exists to refuse",
            fixture.listener_pid
        ));
        return;
    }
    let client = fixture.client();
    // /dev/vsock is root's (the xtask guest allows root: `ferry.allow_users=root`).
    let own: u32 = stdout_of(
        &client,
        Command::new("/bin/vsock-probe").arg("cid").user("root"),
    )
    .trim()
    .parse()
    .unwrap();
    assert!(own > 2, "the guest's CID is {own}");
    let console = std::env::var_os(CONSOLE_VAR).map(std::path::PathBuf::from);
    let before = console.as_deref().map_or(0, |c| refusals(c).len());

    for cid in [1, own] {
        assert_eq!(
            probe(fixture, cid),
            "closed-without-a-byte",
            "a connection from the guest to CID {cid} port {AGENT_PORT}"
        );
    }
    // The host's connections are still served.
    assert_eq!(
        stdout_of(&client, Command::new("echo").arg("served")),
        "served\n"
    );
    assert!(client.health().is_ok());

    let Some(console) = console else {
        say(&format!(
            "{SCENARIO}: {CONSOLE_VAR} is unset; the agent's refusal lines are not checked"
        ));
        return;
    };
    // The lines are rate-limited across every agent process, and other scenarios run beside
    // this one: another refused probe every second or so, until one line makes it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = refusals(&console);
        if let Some(new) = lines.get(before..).filter(|new| !new.is_empty()) {
            say(&format!(
                "{SCENARIO}: the agent logged: {}",
                new.join(" | ")
            ));
            assert!(
                new.iter().all(|line| {
                    let cid = line.split(REFUSAL).nth(1).unwrap_or_default();
                    cid.starts_with("1 ") || cid.starts_with(&format!("{own} "))
                }),
                "{new:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no `{REFUSAL}` line in {} after the probes",
            console.display()
        );
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(probe(fixture, own), "closed-without-a-byte");
    }
}
