//! A command's tree and its exec cgroup (`ferry-commands/c<connection pid>`): killed whole when
//! the exec ends by a disconnect or its connection process dies, `setsid` escapees included;
//! left alone (daemons and all) when it ends normally; its directory removed once empty.
//!
//! Run in the VM only (the agent is the guest's init): over the Unix socket the agent has no
//! cgroup, and a process that leaves the command's group escapes by design there. Each
//! scenario's processes carry a marker argument of its own (`sleep 100123`), found by scanning
//! `/proc/*/cmdline`.

use std::io::Write;
use std::thread;
use std::time::{Duration, Instant};

use ferry_host::{Command, Event};

use super::bombs::{in_guest, say};
use super::{sh, stdout_of, Fixture};

/// The commands' cgroup when the agent is a guest's init.
const COMMANDS_CGROUP: &str = "/sys/fs/cgroup/ferry-commands";

/// The pids whose command line holds `sleep MARKER`.
pub fn with_marker(client: &ferry_host::Client, marker: &str) -> Vec<u32> {
    with_marker_as(client, marker, Some("root"))
}

/// [`with_marker`], the scan run as `user` (`None`: the agent's default, for an agent that
/// serves only its own user).
///
/// One `head` reads every `/proc/PID/cmdline` (it heads each file's bytes with `==> PATH <==`)
/// and the matching happens here: a scan is one exec, a snapshot taken within milliseconds. A
/// scan with a `tr | grep` per process took over a second in an emulated arm64 guest, long
/// enough that the processes it reported alive had died early in it, and the scenarios'
/// deadlines measured the scan rather than the agent. Neither the scanning shell's command line
/// nor `head`'s holds the marker.
pub fn with_marker_as(client: &ferry_host::Client, marker: &str, user: Option<&str>) -> Vec<u32> {
    let mut command = sh("head -c 4096 /proc/[0-9]*/cmdline 2>/dev/null; true");
    if let Some(user) = user {
        command.user(user);
    }
    let output = client.output(&command).unwrap();
    assert!(output.success(), "{command:?}: {:?}", output.status);
    let listing = String::from_utf8_lossy(&output.stdout).replace('\0', " ");
    let wanted = format!("sleep {marker}");
    listing
        .split("==> /proc/")
        .filter_map(|entry| {
            let (pid, cmdline) = entry.split_once("/cmdline <==")?;
            cmdline
                .contains(&wanted)
                .then(|| pid.parse().ok())
                .flatten()
        })
        .collect()
}

/// Waits until no process carries `marker`; how long that took, or the ones left.
pub fn until_gone(
    client: &ferry_host::Client,
    marker: &str,
    within: Duration,
) -> Result<Duration, Vec<u32>> {
    let started = Instant::now();
    loop {
        let left = with_marker(client, marker);
        if left.is_empty() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > within {
            return Err(left);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `count` processes carry `marker`.
pub fn until_running(client: &ferry_host::Client, marker: &str, count: usize) {
    let started = Instant::now();
    loop {
        let found = with_marker(client, marker);
        if found.len() >= count {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{found:?}: not {count} processes with {marker}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

pub fn a_disconnect_kills_the_whole_tree_setsid_included(fixture: &Fixture) {
    const SCENARIO: &str = "a_disconnect_kills_the_whole_tree_setsid_included";
    if !in_guest(fixture, SCENARIO) {
        return;
    }
    let client = fixture.client();
    let mut execution = client
        .spawn(&sh(
            "sleep 100123 & setsid sleep 100123 & echo up; exec sleep 100123",
        ))
        .unwrap();
    match execution.next_event().unwrap() {
        Some(Event::Stdout(b"up\n")) => {}
        other => panic!("{other:?}"),
    }
    until_running(&client, "100123", 3);
    let dropped = Instant::now();
    drop(execution);
    let gone = until_gone(&client, "100123", Duration::from_secs(2))
        .unwrap_or_else(|left| panic!("left 2 s after the disconnect: {left:?}"));
    say(&format!(
        "{SCENARIO}: every process gone {gone:.2?} after the disconnect ({:.2?} since the drop)",
        dropped.elapsed()
    ));
}

pub fn a_killed_connection_process_takes_its_tree_along(fixture: &Fixture) {
    const SCENARIO: &str = "a_killed_connection_process_takes_its_tree_along";
    if !in_guest(fixture, SCENARIO) {
        return;
    }
    let client = fixture.client();
    // Root: commands run as nobody, who may not kill the agent's connection process.
    let mut execution = client
        .spawn(
            sh(
                "setsid sleep 100456 & sleep 100456 & echo up; read x; kill -9 $PPID; \
                exec sleep 100456",
            )
            .user("root")
            .stdin(ferry_host::Stdin::Pipe),
        )
        .unwrap();
    match execution.next_event().unwrap() {
        Some(Event::Stdout(b"up\n")) => {}
        other => panic!("{other:?}"),
    }
    until_running(&client, "100456", 2);
    let killed = Instant::now();
    let mut stdin = execution.take_stdin().unwrap();
    stdin.write_all(b"go\n").unwrap();
    // The connection ends without a final frame.
    loop {
        match execution.next_event() {
            Ok(Some(Event::Exited(termination))) => panic!("exited: {termination:?}"),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    let gone = until_gone(&client, "100456", Duration::from_secs(2))
        .unwrap_or_else(|left| panic!("left 2 s after the connection process died: {left:?}"));
    say(&format!(
        "{SCENARIO}: every process gone {gone:.2?} after the connection ended ({:.2?} since \
         the kill)",
        killed.elapsed()
    ));
}

pub fn a_normal_end_leaves_daemons_and_their_cgroup_until_they_end(fixture: &Fixture) {
    const SCENARIO: &str = "a_normal_end_leaves_daemons_and_their_cgroup_until_they_end";
    if !in_guest(fixture, SCENARIO) {
        return;
    }
    let client = fixture.client();
    let pid = stdout_of(
        &client,
        &sh("setsid sleep 100789 >/dev/null 2>&1 & echo $PPID"),
    );
    let cgroup = format!("{COMMANDS_CGROUP}/c{}", pid.trim());
    until_running(&client, "100789", 1);
    // Past the listener's retry pause: the daemon runs on, and its cgroup stays.
    thread::sleep(Duration::from_secs(3));
    assert_eq!(with_marker(&client, "100789").len(), 1);
    let procs = stdout_of(
        &client,
        Command::new("cat").arg(format!("{cgroup}/cgroup.procs")),
    );
    assert_eq!(procs.lines().count(), 1, "{cgroup}: {procs:?}");
    // Once it ends, its cgroup goes too.
    let killing = Instant::now();
    assert!(client.kill_all().unwrap() >= 1);
    until_gone(&client, "100789", Duration::from_secs(5)).unwrap();
    loop {
        let left = stdout_of(
            &client,
            &sh(&format!("test -d {cgroup} && echo left; true")),
        );
        if left.is_empty() {
            break;
        }
        assert!(
            killing.elapsed() < Duration::from_secs(10),
            "{cgroup} still there 10 s after its last process was killed"
        );
        thread::sleep(Duration::from_millis(100));
    }
    say(&format!(
        "{SCENARIO}: the daemon's cgroup was removed {:.2?} after kill-all",
        killing.elapsed()
    ));
}

pub fn execs_leave_no_cgroup_behind(fixture: &Fixture) {
    const SCENARIO: &str = "execs_leave_no_cgroup_behind";
    if !in_guest(fixture, SCENARIO) {
        return;
    }
    let client = fixture.client();
    // A command is in its connection's own cgroup.
    let text = stdout_of(&client, &sh("echo $PPID; cat /proc/self/cgroup"));
    let mut lines = text.lines();
    let ppid = lines.next().unwrap();
    assert_eq!(
        lines.next(),
        Some(format!("0::/ferry-commands/c{ppid}").as_str()),
        "{text}"
    );
    for _ in 0..100 {
        assert!(client.output(&Command::new("true")).unwrap().success());
    }
    // Each directory left is a live process's (a spare's, this connection's) or holds
    // processes (daemons of earlier scenarios). An exec's own removal may have raced its
    // child's exit: then the listener removes it at its next wake.
    let script = format!(
        "cd {COMMANDS_CGROUP} && for d in c[0-9]*; do [ -d /proc/${{d#c}} ] || \
         [ -s $d/cgroup.procs ] || echo $d; done; true"
    );
    let started = Instant::now();
    loop {
        let stale = stdout_of(&client, &sh(&script));
        if stale.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "exec cgroups left behind: {stale}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let all = stdout_of(
        &client,
        &sh(&format!("cd {COMMANDS_CGROUP} && ls -d c[0-9]* | wc -l")),
    );
    say(&format!(
        "{SCENARIO}: after 100 execs, {} exec cgroups (live ones only), {:.2?} after the last",
        all.trim(),
        started.elapsed()
    ));
}
