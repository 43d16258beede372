//! What only a guest's agent has: the commands' cgroup under a fork bomb and a memory bomb, and
//! the identity commands run as. Each scenario ends with the guest serving normally again.
//!
//! Run in the VM only (the agent is the guest's init: [`Fixture::listener_pid`] 1). Over the
//! Unix socket the agent has no cgroup and runs commands as the test's user, and a bomb would hit
//! the host itself: there each of these scenarios says loudly that it was skipped, and passes.
//!
//! The bombs reach every command in the commands' cgroup (`kill_all` kills them all), and the
//! scenarios share one guest: a bomb runs alone ([`own_guest`]) while every other scenario holds
//! [`share_guest`] (the suite's macro takes it).

use std::io::Write;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread;
use std::time::{Duration, Instant};

use ferry_host::{Client, Command, ExitStatus};

use super::{sh, stdout_of, Fixture};

/// The commands' cgroup when the agent is a guest's init.
const COMMANDS_CGROUP: &str = "/sys/fs/cgroup/ferry-commands";
/// How long a health check may take while a bomb goes off.
const HEALTH_WITHIN: Duration = Duration::from_secs(2);

static GUEST: RwLock<()> = RwLock::new(());

/// Held by every scenario that does not go off like a bomb: they run side by side.
pub fn share_guest() -> RwLockReadGuard<'static, ()> {
    GUEST.read().unwrap_or_else(PoisonError::into_inner)
}

/// Held by a bomb: no other scenario's command runs meanwhile.
pub fn own_guest() -> RwLockWriteGuard<'static, ()> {
    GUEST.write().unwrap_or_else(PoisonError::into_inner)
}

/// A line on the test's stderr that the harness does not capture: skips and figures are seen
/// without `--nocapture`.
pub fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Whether `fixture` is a guest's agent; says loudly that `scenario` is skipped otherwise.
pub fn in_guest(fixture: &Fixture, scenario: &str) -> bool {
    if fixture.listener_pid == 1 {
        return true;
    }
    say(&format!(
        "SKIPPED {scenario}: runs only against an agent that is a guest's init (`cargo xtask e2e`); \
         this agent (pid {}) is not, and has no commands' cgroup",
        fixture.listener_pid
    ));
    false
}

/// Health checks until `until` says stop (at least one); the slowest, failing the scenario on
/// an error or one slower than [`HEALTH_WITHIN`].
fn health_while(client: &Client, what: &str, mut until: impl FnMut() -> bool) -> (Duration, u32) {
    let mut slowest = Duration::ZERO;
    let mut checks = 0;
    loop {
        let started = Instant::now();
        let health = client.health();
        let took = started.elapsed();
        if let Err(err) = health {
            panic!("health check {checks} during {what} failed after {took:?}: {err}");
        }
        assert!(
            took < HEALTH_WITHIN,
            "health check {checks} during {what} took {took:?}"
        );
        slowest = slowest.max(took);
        checks += 1;
        if until() {
            return (slowest, checks);
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Retries `true` until it runs and exits 0; how long that took.
fn until_an_exec_works(client: &Client, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        match client.output(&Command::new("true")) {
            Ok(output) if output.success() => return started.elapsed(),
            other => assert!(
                started.elapsed() < within,
                "no exec worked within {within:?}; the last: {other:?}"
            ),
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The pids in the commands' cgroup (every exec's cgroup in it), read by a `cat` that is one of
/// them; its own pid too.
fn commands_cgroup_procs(client: &Client) -> (Vec<u32>, u32) {
    let output = client
        .output(&sh(&format!(
            "exec cat {COMMANDS_CGROUP}/cgroup.procs {COMMANDS_CGROUP}/c[0-9]*/cgroup.procs \
             2>/dev/null"
        )))
        .unwrap();
    // A cgroup removed between the glob and the read is not an error here.
    let pids = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| line.trim().parse().unwrap())
        .collect();
    (pids, output.pid)
}

/// A field of the commands' `memory.events`, such as `oom` or `oom_kill`.
fn memory_event(client: &Client, field: &str) -> u64 {
    let text = stdout_of(
        client,
        Command::new("cat").arg(format!("{COMMANDS_CGROUP}/memory.events")),
    );
    text.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in memory.events: {text}"))
}

pub fn a_fork_bomb_is_contained_and_kill_all_ends_it(fixture: &Fixture) {
    const SCENARIO: &str = "a_fork_bomb_is_contained_and_kill_all_ends_it";
    if !in_guest(fixture, SCENARIO) {
        return;
    }
    let client = fixture.client();
    let bounds = client.health().unwrap().info.bounds;
    assert!(bounds.cgroup, "{bounds:?}");
    assert!(bounds.pids_max > 0, "{bounds:?}");

    // The shell starts the bomb in the background and exits; the bomb holds its output pipes
    // but never writes, so the exec ends once the agent stops waiting for them.
    let started = Instant::now();
    let output = client
        .output(Command::new("sh").args(["-c", "b(){ b | b & }; b"]))
        .unwrap();
    let exec_took = started.elapsed();
    assert!(output.success(), "{output:?}");
    assert!(
        exec_took < Duration::from_secs(10),
        "the exec took {exec_took:?}"
    );

    let bombing = Instant::now();
    let (slowest, checks) = health_while(&client, "the fork bomb", || {
        bombing.elapsed() >= Duration::from_secs(5)
    });
    // A new command, in a cgroup of its own beside the bomb's, gets its share of the CPU.
    let during = until_an_exec_works(&client, Duration::from_secs(30));
    // The bomb at its height: held at pids.max.
    let current = stdout_of(
        &client,
        Command::new("cat").arg(format!("{COMMANDS_CGROUP}/pids.current")),
    );

    let killing = Instant::now();
    let killed = client.kill_all().unwrap();
    let kill_took = killing.elapsed();
    let exec_again = until_an_exec_works(&client, Duration::from_secs(10));
    // Only the reader left: every bomb process killed and reaped.
    let emptied = loop {
        let (pids, cat) = commands_cgroup_procs(&client);
        if pids == [cat] {
            break killing.elapsed();
        }
        assert!(
            killing.elapsed() < Duration::from_secs(20),
            "{} processes left in the commands' cgroup 20 s after kill-all",
            pids.len().saturating_sub(1)
        );
        thread::sleep(Duration::from_millis(100));
    };
    say(&format!(
        "{SCENARIO}: exec returned in {exec_took:.2?}; {checks} health checks in 5 s, slowest \
         {slowest:.2?}; a new `true` during the bomb took {during:.2?}; pids.current {} \
         (pids.max {}); kill-all answered in {kill_took:.2?} \
         ({killed} processes); the next exec worked {exec_again:.2?} later, the cgroup was \
         empty {emptied:.2?} after the kill-all",
        current.trim(),
        bounds.pids_max,
    ));
    assert!(killed > 1, "kill-all found {killed} processes");
}

pub fn a_memory_bomb_meets_its_cgroups_oom_killer(fixture: &Fixture) {
    const SCENARIO: &str = "a_memory_bomb_meets_its_cgroups_oom_killer";
    if !in_guest(fixture, SCENARIO) {
        return;
    }
    let client = fixture.client();
    let bounds = client.health().unwrap().info.bounds;
    assert!(bounds.cgroup, "{bounds:?}");
    // The hello reports the memory.max in effect.
    let memory_max = stdout_of(
        &client,
        Command::new("cat").arg(format!("{COMMANDS_CGROUP}/memory.max")),
    );
    assert_eq!(
        memory_max.trim(),
        bounds.memory_max.to_string(),
        "{bounds:?}"
    );
    let ooms = memory_event(&client, "oom");
    let oom_kills = memory_event(&client, "oom_kill");

    let started = Instant::now();
    let bomb = {
        let client = fixture.client();
        thread::spawn(move || client.output(&sh("x=a; while :; do x=$x$x; done")))
    };
    let (slowest, checks) = health_while(&client, "the memory bomb", || {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the memory bomb was not stopped within 120 s"
        );
        bomb.is_finished()
    });
    let output = bomb.join().unwrap().unwrap();
    let killed_after = started.elapsed();
    assert_eq!(
        output.status,
        ExitStatus::Signal {
            number: 9,
            core_dumped: false
        },
        "{output:?}"
    );
    let exec_again = until_an_exec_works(&client, Duration::from_secs(10));
    // The cgroup's own limit was reached, and its OOM killer chose the bomb.
    assert!(memory_event(&client, "oom") > ooms);
    assert!(memory_event(&client, "oom_kill") > oom_kills);
    // The kernel said so: a memory cgroup's OOM, never the whole guest's.
    let log = stdout_of(&client, Command::new("dmesg").user("root"));
    let cgroup_ooms = log.matches("Memory cgroup out of memory").count();
    assert!(
        cgroup_ooms > 0,
        "no memory cgroup OOM in the kernel log:\n{log}"
    );
    assert!(
        !log.contains("Out of memory: Killed"),
        "the whole guest ran out of memory:\n{log}"
    );
    say(&format!(
        "{SCENARIO}: memory.max {} MiB; killed by signal 9 after {killed_after:.2?}; {checks} \
         health checks, slowest {slowest:.2?}; the next exec worked {exec_again:.2?} later",
        bounds.memory_max >> 20
    ));
}

pub fn commands_run_as_nobody_unless_root_is_allowed(fixture: &Fixture) {
    const SCENARIO: &str = "commands_run_as_nobody_unless_root_is_allowed";
    if !in_guest(fixture, SCENARIO) {
        return;
    }
    let client = fixture.client();
    let bounds = client.health().unwrap().info.bounds;
    assert_eq!((bounds.default_uid, bounds.default_gid), (65534, 65534));
    assert_eq!(stdout_of(&client, Command::new("id").arg("-u")), "65534\n");
    assert_eq!(stdout_of(&client, Command::new("id").arg("-g")), "65534\n");
    // The xtask guest's kernel command line allows root (`ferry.allow_users=root`).
    assert_eq!(
        stdout_of(&client, Command::new("id").arg("-u").user("root")),
        "0\n"
    );
    // The guest's copy of the secret is root's alone.
    assert_eq!(
        stdout_of(
            &client,
            Command::new("stat")
                .args(["-c", "%a %u", "/etc/ferry/secret"])
                .user("root")
        ),
        "400 0\n"
    );
    let output = client
        .output(Command::new("cat").arg("/etc/ferry/secret"))
        .unwrap();
    assert_eq!(output.status, ExitStatus::Code(1), "{output:?}");
    assert!(output.stdout.is_empty(), "65534 read the secret");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Permission denied"), "{stderr}");
    // Root can (without printing it).
    let root = client
        .output(sh("test -s /etc/ferry/secret && cat /etc/ferry/secret >/dev/null").user("root"))
        .unwrap();
    assert!(root.success(), "{root:?}");
}
