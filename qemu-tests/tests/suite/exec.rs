//! Commands through the blocking API: what a command starts with, what it sees, and what only
//! the library reports of its end. Exit codes, signal deaths and start failures are exec cases
//! (`cases.rs`), run through every driver.

use std::time::Duration;

use ferry_host::{Command, ExitStatus};

use super::{parse_stat, sh, stdout_of, Fixture};

pub fn health_reports_versions_and_limits(fixture: &Fixture) {
    let health = fixture.client().health().unwrap();
    assert_eq!(health.info.protocol_version, ferry_wire::PROTOCOL_VERSION);
    // The agent shares the workspace's version with every crate that includes this suite.
    assert_eq!(health.info.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(
        health.info.limits,
        ferry_wire::Limits {
            idle_ms: ferry_wire::limits::DEFAULT_IDLE_MS,
            ..ferry_wire::Limits::CURRENT
        }
    );
}

/// The machine the agent runs on is the one the harness built it for: `FERRY_GUEST_ARCH` (set
/// by `cargo xtask e2e --arch`), or this host's own architecture for an agent run here. The
/// agent's `uname` (info) and a command's agree with it; on aarch64 this is also the first
/// exec through the agent's arm64 `clone` trampoline.
pub fn the_machine_is_the_architecture_built_for(fixture: &Fixture) {
    let expected =
        std::env::var("FERRY_GUEST_ARCH").unwrap_or_else(|_| std::env::consts::ARCH.to_owned());
    let client = fixture.client();
    assert_eq!(client.info().unwrap().machine, expected);
    let output = client.output(Command::new("uname").arg("-m")).unwrap();
    assert_eq!(output.status, ExitStatus::Code(0));
    assert_eq!(String::from_utf8(output.stdout).unwrap().trim(), expected);
}

pub fn a_command_leads_a_session_of_its_own(fixture: &Fixture) {
    let client = fixture.client();
    let output = client.output(Command::new("uname").arg("-a")).unwrap();
    assert_eq!(output.status, ExitStatus::Code(0));
    let uname = String::from_utf8(output.stdout).unwrap();
    assert!(uname.starts_with("Linux "), "{uname}");
    assert!(output.stderr.is_empty());
    assert!(!output.output_dropped);

    // The pid reported is the program's own, and it leads its session and process group (which
    // is what lets the agent kill everything it started).
    let output = client
        .output(Command::new("cat").arg("/proc/self/stat"))
        .unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    let stat = parse_stat(text.trim_end()).unwrap();
    assert_eq!(stat.pid, output.pid, "{stat:?}");
    assert_eq!(stat.pgid, output.pid, "{stat:?}");
    assert_eq!(stat.session, output.pid, "{stat:?}");
    let output = client.output(&sh("echo $$")).unwrap();
    assert_eq!(output.stdout, format!("{}\n", output.pid).as_bytes());
}

pub fn commands_start_with_default_signal_state(fixture: &Fixture) {
    // The agent ignores SIGCHLD (the listener) and SIGPIPE (a connection process) for itself;
    // ignored dispositions and the signal mask survive execve, so a command would inherit them
    // unless the agent resets them. What the agent was itself started with ignored (a guest's
    // init: nothing) passes through, as it would through any service.
    let client = fixture.client();
    let mask = |pid: &str, field: &str| {
        let status = stdout_of(
            &client,
            Command::new("cat").arg(format!("/proc/{pid}/status")),
        );
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'));
        let line = line.unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
        u64::from_str_radix(line.trim(), 16).unwrap()
    };
    let bit = |signal: u32| 1u64 << (signal - 1);
    let agents_own = bit(13) | bit(17);
    let listener = fixture.listener_pid.to_string();
    let inherited = mask(&listener, "SigIgn") & !agents_own;
    let ignored = mask("self", "SigIgn");
    assert_eq!(ignored, inherited, "ignored: {ignored:#x}");
    assert_eq!(mask("self", "SigBlk"), 0);
}

/// What only the library reports of how a command ended: a death that may dump core, and how
/// long it ran. Exit codes and signal deaths are exec cases (`cases.rs`), checked through every
/// driver.
pub fn core_dumps_and_durations_are_reported(fixture: &Fixture) {
    let client = fixture.client();
    // A core dump is reported as such when the kernel writes one (core_pattern permitting). In
    // the scratch directory: a core file must not land anywhere that matters.
    let mut segv = sh("ulimit -c unlimited 2>/dev/null; kill -SEGV $$");
    segv.current_dir(&fixture.scratch);
    let output = client.output(&segv).unwrap();
    assert!(
        matches!(output.status, ExitStatus::Signal { number: 11, .. }),
        "{:?}",
        output.status
    );
    // Duration is measured by the agent's monotonic clock.
    let output = client.output(&sh("sleep 0.3")).unwrap();
    let duration = output.duration;
    assert!(duration >= Duration::from_millis(290), "{duration:?}");
    assert!(duration < Duration::from_secs(5), "{duration:?}");
}

pub fn shell_pipelines_and_their_status(fixture: &Fixture) {
    let client = fixture.client();
    let output = stdout_of(&client, &sh("printf 'b\\na\\nc\\n' | sort | tr a-z A-Z"));
    assert_eq!(output, "A\nB\nC\n");
    // A pipeline's status is its last command's.
    assert_eq!(
        client.output(&sh("true | false")).unwrap().status,
        ExitStatus::Code(1)
    );
    assert_eq!(
        client.output(&sh("false | true")).unwrap().status,
        ExitStatus::Code(0)
    );
    // The writer of a pipe whose reader left dies of SIGPIPE, and the pipeline goes on.
    assert_eq!(stdout_of(&client, &sh("yes | head -n 2")), "y\ny\n");
    // Statuses of nested shells and redirections between the two output streams.
    let output = client
        .output(&sh(
            "sh -c 'exit 3'; echo $?; echo to-err 1>&2; (echo via-err 1>&2) 2>&1",
        ))
        .unwrap();
    assert!(output.success());
    assert_eq!(output.stdout, b"3\nvia-err\n");
    assert_eq!(output.stderr, b"to-err\n");
}

pub fn env_and_cwd(fixture: &Fixture) {
    let client = fixture.client();
    let mut command = Command::new("env");
    command
        .env("FERRY_TEST", "a b=c\u{e9}")
        .env("PATH", "/usr/bin:/bin");
    let env = stdout_of(&client, &command);
    assert!(env.lines().any(|l| l == "FERRY_TEST=a b=c\u{e9}"), "{env}");
    assert!(env.lines().any(|l| l == "PATH=/usr/bin:/bin"), "{env}");
    // Inherited: the agent's own environment is there too.
    assert!(env.lines().count() > 2, "{env}");

    // A clean environment holds exactly what was asked for, whether the program is named by
    // path or found on the default search path.
    for program in ["/usr/bin/env", "env"] {
        let mut command = Command::new(program);
        command.env_clear().env("ONLY", "1");
        assert_eq!(stdout_of(&client, &command), "ONLY=1\n", "{program}");
    }

    let mut command = sh("echo \"$FERRY_TEST\"; pwd");
    command
        .env("FERRY_TEST", "x y")
        .current_dir(&fixture.scratch);
    let expected = format!("x y\n{}\n", fixture.scratch.display());
    assert_eq!(stdout_of(&client, &command), expected);
    let mut command = Command::new("pwd");
    command.current_dir("/");
    assert_eq!(stdout_of(&client, &command), "/\n");
}
