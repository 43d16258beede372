//! Processes and connections over time: cancellation, daemons, orphans, many clients at once.

use std::thread;
use std::time::{Duration, Instant};

use ferry_host::{Command, ConnectOptions, Event, ExitStatus};

use super::{group_members, kill_group, processes, sh, stdout_of, wait_group_gone, Fixture};

pub fn dropping_an_execution_kills_its_whole_group(fixture: &Fixture) {
    let client = fixture.client();
    // Children, a grandchild in the background, and a shell that ignores SIGTERM/SIGHUP.
    let mut execution = client
        .spawn(&sh(
            "trap '' TERM HUP; sleep 1000 & (sleep 1000 &); echo up; wait",
        ))
        .unwrap();
    let pgid = execution.pid();
    match execution.next_event().unwrap() {
        Some(Event::Stdout(b"up\n")) => {}
        other => panic!("{other:?}"),
    }
    let members = group_members(&client, pgid);
    assert!(members.len() >= 3, "{members:?}");
    drop(execution);
    // Killed and reaped: no survivor and no zombie.
    if let Err(left) = wait_group_gone(&client, pgid, Duration::from_secs(10)) {
        panic!("processes left in group {pgid}: {left:?}");
    }
}

pub fn a_daemonized_child_holding_stdout_does_not_hang_the_exec(fixture: &Fixture) {
    let client = fixture.client();
    let started = Instant::now();
    let output = client.output(&sh("(sleep 30 &); echo main done")).unwrap();
    let elapsed = started.elapsed();
    assert!(output.success());
    assert_eq!(output.stdout, b"main done\n");
    assert!(elapsed < Duration::from_secs(5), "exec took {elapsed:?}");
    // The sleeper outlives the exec, in the command's group.
    assert!(!group_members(&client, output.pid).is_empty());
    kill_group(&client, output.pid);
}

pub fn a_daemon_that_keeps_writing_is_cut_off(fixture: &Fixture) {
    let client = fixture.client();
    let cpus: u32 = stdout_of(&client, &Command::new("nproc"))
        .trim()
        .parse()
        .unwrap();
    let started = Instant::now();
    let output = client.output(&sh("(yes &); echo main done")).unwrap();
    assert!(output.success());
    assert!(started.elapsed() < Duration::from_secs(20));
    let len = output.stdout.len();
    // Never beyond 4 MiB forwarded after the shell exited (plus one chunk, and what arrived
    // before the exit was seen), and reported as dropped only when that limit cut it.
    assert!(
        len < 16 << 20,
        "{len} bytes: the daemon was not cut off at 4 MiB"
    );
    if output.output_dropped {
        assert!(len > 4 << 20, "cut off after only {len} bytes");
    }
    // With a CPU to spare, `yes` writes while the agent reads: its pipe is never idle, so the cut
    // comes at the drain limit, and says so. On one CPU the agent empties the pipe whenever it
    // runs, and the first idle moment after the grace period closes it.
    if cpus > 1 {
        assert!(output.output_dropped, "{len} bytes, none reported dropped");
    }
    kill_group(&client, output.pid);
}

pub fn orphans_are_reaped_by_the_listener(fixture: &Fixture) {
    let client = fixture.client();
    // The subshell exits at once; its sleeping child is orphaned.
    let text = stdout_of(&client, &sh("(sleep 3 >/dev/null 2>&1 & echo $!)"));
    let orphan: u32 = text.trim().parse().unwrap();
    // Adopted by the listener (init in a guest, a subreaper on a host), which reaps it when it
    // ends: it disappears, it does not linger as a zombie.
    match processes(&client).get(&orphan) {
        Some(process) => assert_eq!(process.ppid, fixture.listener_pid, "{process:?}"),
        None => panic!("the orphan {orphan} ended before it was looked at"),
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while let Some(process) = processes(&client).remove(&orphan) {
        assert!(Instant::now() < deadline, "orphan not reaped: {process:?}");
        thread::sleep(Duration::from_millis(100));
    }
}

pub fn many_execs_run_side_by_side(fixture: &Fixture) {
    let client = fixture.client();
    let parallel = fixture.scale.parallel_execs;
    let barrier = fixture.scratch_path("barrier");
    stdout_of(&client, Command::new("mkdir").arg(&barrier));
    // Each command checks in, then waits until all have: they finish only if all of them run
    // at once. 99 says one gave up waiting.
    let script = format!(
        ": > \"$BARRIER/$I\"; tries=0; \
         while set -- \"$BARRIER\"/*; [ $# -lt {parallel} ]; do \
             tries=$((tries + 1)); [ $tries -gt 300 ] && exit 99; sleep 0.1; \
         done; \
         echo $I; echo e$I >&2; exit $((I % 7))"
    );
    let handles: Vec<_> = (0..parallel)
        .map(|i| {
            let client = client.clone();
            let mut command = sh(&script);
            command.env("BARRIER", &barrier).env("I", i.to_string());
            thread::spawn(move || (i, client.output(&command).unwrap()))
        })
        .collect();
    for handle in handles {
        let (i, output) = handle.join().unwrap();
        assert_ne!(
            output.status,
            ExitStatus::Code(99),
            "command {i} never saw all {parallel} running at once"
        );
        assert_eq!(output.stdout, format!("{i}\n").as_bytes());
        assert_eq!(output.stderr, format!("e{i}\n").as_bytes());
        assert_eq!(output.status, ExitStatus::Code((i % 7) as u8));
    }
}

pub fn a_silent_client_delays_nobody(fixture: &Fixture) {
    use std::io::Write;

    let open = || {
        let options = ConnectOptions::default();
        fixture.target.open_stream(&options).unwrap()
    };
    // Connected, said nothing; another half-way through its hello.
    let _silent = open();
    let mut partial = open();
    partial.write_all(&[9, 0]).unwrap();
    // Our hello after the agent's, no proof, no request: its process waits for the proof.
    let mut hello_only = open();
    hello_only.write_all(&super::frames::hello()).unwrap();
    // A command that runs for a while, started by a connection that never reads.
    let client = fixture.client();
    let _running = client.spawn(Command::new("sleep").arg("30")).unwrap();
    // Any of them holding up the others would cost the agent's 30 s handshake timeout.
    let started = Instant::now();
    for _ in 0..10 {
        assert!(client.output(&Command::new("true")).unwrap().success());
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(5),
        "10 execs took {elapsed:?}"
    );
}
