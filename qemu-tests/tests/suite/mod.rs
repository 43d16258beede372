//! The scenario suite: one list of end-to-end scenarios, run against the real agent over every
//! transport it serves.
//!
//! Two runners include this module and call [`scenario_tests!`] with a fixture of their own:
//! `host/tests/agent.rs` (the shipped agent on a private Unix socket, a fresh agent per scenario;
//! plain `cargo test`) and `qemu-tests/tests/scenarios.rs` (the agent as PID 1 in QEMU over real
//! virtio-vsock, one guest for the whole run; `cargo xtask e2e`). A scenario sees the agent's
//! machine only through the agent itself: it lists processes, reads `/proc`, and writes files by
//! running commands, so the same code checks the host and the guest.
//!
//! The exec cases (`cases.rs`) run once per driver: the blocking API, the async API and the
//! embedding example (`drivers.rs`), so all three are held to the same outcomes on both
//! transports.
//!
//! Included with `#[path]` rather than shared through a crate: `qemu-tests` depends on
//! `ferry-host`, and a dev-dependency back would make a cycle. The module must stay at the crate
//! root as `suite` (the macro names it so), and uses nothing but std, `ferry_host`,
//! `ferry_wire`, `libc` (the CLI scenarios' terminal), and for the async driver `tokio` behind a
//! feature named `tokio` (each including crate has one). `frames.rs` is also included on its own, by `host/tests/hostile.rs`: it uses
//! nothing of the rest of the suite.
#![allow(clippy::unwrap_used)] // a scenario reports failure by panicking

pub mod bombs;
pub mod cases;
pub mod cli;
pub mod drivers;
pub mod epoll_exec;
pub mod exec;
pub mod files;
pub mod frames;
pub mod interactive;
pub mod jobs;
pub mod json;
pub mod lifecycle;
pub mod peers;
pub mod raw;
pub mod streams;
pub mod trees;

use std::any::Any;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_host::{Client, Command, ConnectOptions, Stdin, Target};

/// The agent a scenario runs against, and what differs between the places it runs.
pub struct Fixture {
    /// Where the agent listens.
    pub target: Target,
    /// The agent's secret file (`None`: the agent runs `--insecure`). Clients prove it; the
    /// example gets it as `FERRY_SECRET_FILE`.
    pub secret_file: Option<PathBuf>,
    /// The agent's listener, as its own machine numbers it (1 when it is a guest's init).
    pub listener_pid: u32,
    /// A directory on the agent's machine that exists and is this scenario's alone.
    pub scratch: PathBuf,
    /// How hard the heavy scenarios push.
    pub scale: Scale,
    /// Whatever keeps the agent running until the scenario ends (the Unix-socket runner's agent
    /// process); dropped after it.
    #[allow(dead_code)] // held, never read
    pub keep_alive: Option<Box<dyn Any>>,
}

/// The sizes that differ between a host and an emulated guest.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    /// Bytes the bulk-output scenario streams.
    pub bulk_bytes: u64,
    /// Commands the concurrency scenario runs at once.
    pub parallel_execs: usize,
}

impl Fixture {
    /// A client for the agent. Connecting is lazy: each operation opens its own connection.
    pub fn client(&self) -> Client {
        Client::new(&self.target, self.options())
    }

    /// Connect options with the agent's secret.
    pub fn options(&self) -> ConnectOptions {
        ConnectOptions {
            secret: self.secret(),
            ..ConnectOptions::default()
        }
    }

    /// The agent's secret, read from [`Fixture::secret_file`].
    pub fn secret(&self) -> Option<ferry_host::Secret> {
        let path = self.secret_file.as_ref()?;
        Some(ferry_host::read_secret_file(path).unwrap())
    }

    /// A path inside [`Fixture::scratch`].
    pub fn scratch_path(&self, name: &str) -> PathBuf {
        self.scratch.join(name)
    }
}

/// Generates one `#[test]` per shared scenario, and one per exec case per driver (in modules
/// `via_blocking`, `via_tokio` and `via_example`). `$fixture` names a `fn(&'static str) ->
/// Fixture` at the crate root, called with the test's name at the start of each test.
///
/// Every test shares the agent's machine ([`bombs::share_guest`]) except the `@alone` ones,
/// which reach every command (a bomb, kill-all) and so run with nothing beside them.
///
/// NOTE: a scenario or case left out of these lists is dead code, which clippy (`-D warnings`)
/// rejects: a scenario cannot silently stop running. The async driver's cases exist only with
/// the crate's `tokio` feature (`cargo xtask test` and the `qemu` switch turn it on).
macro_rules! scenario_tests {
    ($fixture:ident) => {
        $crate::suite::scenario_tests!(@each $fixture;
            exec::health_reports_versions_and_limits,
            exec::the_machine_is_the_architecture_built_for,
            exec::a_command_leads_a_session_of_its_own,
            exec::commands_start_with_default_signal_state,
            exec::core_dumps_and_durations_are_reported,
            exec::shell_pipelines_and_their_status,
            exec::env_and_cwd,
            streams::bulk_output_streams_with_bounded_agent_memory,
            streams::stdin_is_null_unless_asked_and_eof_is_delivered,
            lifecycle::dropping_an_execution_kills_its_whole_group,
            lifecycle::a_daemonized_child_holding_stdout_does_not_hang_the_exec,
            lifecycle::a_daemon_that_keeps_writing_is_cut_off,
            lifecycle::orphans_are_reaped_by_the_listener,
            lifecycle::many_execs_run_side_by_side,
            lifecycle::a_silent_client_delays_nobody,
            raw::a_hello_only_connection_is_answered_and_closed,
            raw::a_pipelined_hello_and_exec_run_to_the_end,
            raw::stdin_credit_is_returned_as_the_command_reads,
            raw::bad_frames_are_refused_and_the_agent_keeps_serving,
            raw::noise_of_any_size_is_refused_or_dropped,
            raw::requests_out_of_place_are_refused,
            raw::stdin_beyond_credit_is_refused,
            files::a_put_and_a_get_round_trip,
            files::a_tree_round_trips_and_escapes_are_refused,
            bombs::commands_run_as_nobody_unless_root_is_allowed,
            peers::the_guest_itself_is_refused_before_the_hello,
            trees::a_disconnect_kills_the_whole_tree_setsid_included,
            trees::a_killed_connection_process_takes_its_tree_along,
            interactive::a_terminal_knows_its_name_and_size,
            interactive::a_resize_reaches_the_command,
            interactive::control_c_interrupts_the_command,
            interactive::a_timeout_ends_the_whole_tree_and_exits_124,
            interactive::sigterm_to_the_cli_is_forwarded_and_exits_143,
            interactive::output_caps_keep_the_exact_head_and_tail,
            interactive::argv_as_large_as_linux_takes,
            jobs::a_detached_job_is_followed_from_another_client_byte_for_byte,
            jobs::a_wrapped_spool_says_exactly_what_was_lost,
            jobs::wait_exits_with_the_jobs_status,
            jobs::kill_ends_a_jobs_tree_setsid_escapees_included,
            jobs::kill_with_a_signal_reaches_a_jobs_whole_tree,
        );
        // Alone on the agent's machine (they reach every command); the VM's agent only.
        $crate::suite::scenario_tests!(@alone $fixture;
            bombs::a_fork_bomb_is_contained_and_kill_all_ends_it,
            bombs::a_memory_bomb_meets_its_cgroups_oom_killer,
            trees::a_normal_end_leaves_daemons_and_their_cgroup_until_they_end,
            trees::execs_leave_no_cgroup_behind,
            // The registry's bound: no other scenario's job may hold a slot meanwhile.
            jobs::sixty_four_jobs_run_and_the_sixty_fifth_is_refused,
        );
        $crate::suite::scenario_tests!(@cases $fixture;
            every driver:
                binary_output_is_byte_exact_on_both_streams,
                stdin_round_trips_byte_exact_within_credit,
                exit_codes_are_exact,
                signal_deaths_are_exact,
                a_missing_program_is_not_found,
                what_cannot_be_executed_names_its_cause,
                a_missing_working_directory_is_refused,
                invalid_requests_are_refused_locally;
        );
    };
    (@each $fixture:ident; $($module:ident :: $name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let _guest = $crate::suite::bombs::share_guest();
                let fixture = $fixture(stringify!($name));
                $crate::suite::$module::$name(&fixture);
            }
        )*
    };
    (@alone $fixture:ident; $($module:ident :: $name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let _guest = $crate::suite::bombs::own_guest();
                let fixture = $fixture(stringify!($name));
                $crate::suite::$module::$name(&fixture);
            }
        )*
    };
    (@cases $fixture:ident;
        every driver: $($case:ident),* $(,)?;
    ) => {
        /// The exec cases through `ferry_host::Client`.
        mod via_blocking {
            $crate::suite::scenario_tests!(@driver $fixture, via_blocking, Blocking; $($case,)*);
        }
        /// The exec cases through `ferry_host::tokio::Client`.
        #[cfg(feature = "tokio")]
        mod via_tokio {
            $crate::suite::scenario_tests!(@driver $fixture, via_tokio, Async; $($case,)*);
        }
        /// The exec cases through `examples/epoll_exec.rs`, run as a program.
        mod via_example {
            $crate::suite::scenario_tests!(@driver $fixture, via_example, Example; $($case,)*);
        }
    };
    (@driver $fixture:ident, $module:ident, $driver:ident; $($case:ident,)*) => {
        $(
            #[test]
            fn $case() {
                let _guest = $crate::suite::bombs::share_guest();
                // Named by driver and case: a scenario's scratch directory is its own.
                let fixture = super::$fixture(concat!(stringify!($module), "/", stringify!($case)));
                $crate::suite::cases::$case(&fixture, $crate::suite::drivers::Driver::$driver);
            }
        )*
    };
}
pub(crate) use scenario_tests;

/// `/bin/sh -c SCRIPT`.
pub fn sh(script: &str) -> Command {
    let mut command = Command::new("/bin/sh");
    command.arg("-c").arg(script);
    command
}

/// Bytes of every value, NUL and invalid UTF-8 included, in a sequence that exposes reordering.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i ^ (i >> 8) ^ (i >> 16)) as u8).collect()
}

/// Runs `command` and returns its stdout, failing the scenario unless it exits 0.
pub fn stdout_of(client: &Client, command: &Command) -> String {
    let output = client.output(command).unwrap();
    assert!(
        output.success(),
        "{command:?}: {:?}, stderr {:?}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Writes `bytes` to `path` on the agent's machine (through the agent) with permissions `mode`.
pub fn write_file(client: &Client, path: &Path, bytes: &[u8], mode: u32) {
    let mut command = sh("cat > \"$1\" && chmod \"$2\" \"$1\"");
    command
        .arg("sh")
        .arg(path)
        .arg(format!("{mode:o}"))
        .stdin(Stdin::Bytes(bytes.to_vec()));
    stdout_of(client, &command);
}

/// One process on the agent's machine, as `/proc/PID/stat` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    pub comm: String,
    pub state: char,
    pub ppid: u32,
    pub pgid: u32,
    pub session: u32,
}

/// Parses one `/proc/PID/stat` line. The command name may hold spaces and parentheses, so the
/// fields after it are found from the last `)`.
pub fn parse_stat(line: &str) -> Option<Process> {
    let open = line.find(" (")?;
    let close = line.rfind(')')?;
    let pid = line[..open].trim().parse().ok()?;
    let comm = line.get(open + 2..close)?.to_owned();
    let mut rest = line.get(close + 1..)?.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    let pgid = rest.next()?.parse().ok()?;
    let session = rest.next()?.parse().ok()?;
    Some(Process {
        pid,
        comm,
        state,
        ppid,
        pgid,
        session,
    })
}

/// Every process on the agent's machine, by pid, read through an exec of `cat` (which itself
/// shows up in the list).
pub fn processes(client: &Client) -> BTreeMap<u32, Process> {
    // Processes may exit between the glob and the read: those errors are expected and ignored.
    let text = stdout_of(client, &sh("cat /proc/[0-9]*/stat 2>/dev/null; true"));
    text.lines()
        .map(|line| {
            let process = parse_stat(line);
            let process = process.unwrap_or_else(|| panic!("unparsable /proc stat line {line:?}"));
            (process.pid, process)
        })
        .collect()
}

/// The processes (zombies included) in process group `pgid`.
pub fn group_members(client: &Client, pgid: u32) -> Vec<Process> {
    processes(client)
        .into_values()
        .filter(|p| p.pgid == pgid)
        .collect()
}

/// Waits until no process (zombie or not) is left in group `pgid`; the ones left at the deadline
/// otherwise.
pub fn wait_group_gone(client: &Client, pgid: u32, within: Duration) -> Result<(), Vec<Process>> {
    let deadline = Instant::now() + within;
    loop {
        let left = group_members(client, pgid);
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(left);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills every process in group `pgid` and waits until they are gone (reaped, not zombies).
pub fn kill_group(client: &Client, pgid: u32) {
    // `kill -9 -PGID`: the one spelling dash and busybox ash both take.
    let output = client.output(&sh(&format!("kill -9 -{pgid}"))).unwrap();
    assert!(output.status.shell_code() <= 1, "{output:?}");
    if let Err(left) = wait_group_gone(client, pgid, Duration::from_secs(10)) {
        panic!("group {pgid} survived kill -9: {left:?}");
    }
}

/// A field (in KiB) of `/proc/PID/status` on the agent's machine, such as `VmHWM`.
pub fn status_kib(client: &Client, pid: u32, field: &str) -> u64 {
    let text = stdout_of(
        client,
        Command::new("cat").arg(format!("/proc/{pid}/status")),
    );
    text.lines()
        .find_map(|line| {
            let value = line.strip_prefix(field)?.strip_prefix(':')?;
            value.trim().trim_end_matches("kB").trim().parse().ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status: {text}"))
}

#[test]
fn stat_lines_with_awkward_names_parse() {
    let line = "42 (a (b) c) S 1 42 40 0 -1 4194560 100";
    assert_eq!(
        parse_stat(line),
        Some(Process {
            pid: 42,
            comm: "a (b) c".into(),
            state: 'S',
            ppid: 1,
            pgid: 42,
            session: 40,
        })
    );
    assert_eq!(parse_stat("1 (init) Z 0 1"), None);
    assert_eq!(parse_stat("garbage"), None);
}
