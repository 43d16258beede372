//! The scenario suite against the agent running as PID 1 in QEMU, over real virtio-vsock, plus
//! what only a guest's init has. Run by `cargo xtask e2e`, which boots the guest once and passes
//! its address in `FERRY_CONNECT`; every scenario shares that guest.
#![allow(clippy::unwrap_used)] // a test reports failure by panicking

mod suite;

use std::path::PathBuf;

use ferry_host::Command;
use suite::{processes, stdout_of, Fixture, Scale};

/// The shared guest, with an empty scratch directory of the scenario's own under its `/tmp`.
fn guest(scenario: &'static str) -> Fixture {
    let fixture = Fixture {
        target: qemu_tests::target().unwrap(),
        secret_file: qemu_tests::secret_file(),
        // The agent is the guest's init.
        listener_pid: 1,
        scratch: PathBuf::from("/tmp").join(scenario),
        // TCG emulates one CPU: half the host run's volume, a quarter of its clients.
        scale: Scale {
            bulk_bytes: 256 << 20,
            parallel_execs: 16,
        },
        keep_alive: None,
    };
    // Emptied first: a guest outlives one run of the suite when it is booted by hand
    // (`cargo xtask vm`) and the tests are run against it again.
    let mut fresh = suite::sh("rm -rf \"$1\" && mkdir -p \"$1\"");
    fresh.arg("sh").arg(&fixture.scratch);
    stdout_of(&fixture.client(), &fresh);
    fixture
}

suite::scenario_tests!(guest);

#[test]
fn the_agent_is_the_guests_init() {
    let _guest = suite::bombs::share_guest();
    let fixture = guest("the_agent_is_the_guests_init");
    let client = fixture.client();
    let cmdline = stdout_of(&client, Command::new("cat").arg("/proc/1/cmdline"));
    assert!(cmdline.starts_with("/init\0"), "{cmdline:?}");
    let init = &processes(&client)[&1];
    assert_eq!(init.ppid, 0, "{init:?}");
    assert!(init.state != 'Z', "{init:?}");
}
