//! The `ferry` CLI against the shipped agent: streams, stdin, exit codes users script against.
#![allow(clippy::unwrap_used)] // a test reports failure by panicking

mod common;

use std::io::{Read, Write};
use std::process::{Command, Output, Stdio};

use common::{ferry, stderr, Agent};

fn run(agent: &Agent, args: &[&str]) -> Output {
    ferry(agent)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn exec_streams_both_outputs_and_exits_with_the_remote_code() {
    let agent = Agent::start();
    let output = run(
        &agent,
        &[
            "exec",
            "--",
            "sh",
            "-c",
            "printf 'a\\000b'; echo err >&2; exit 3",
        ],
    );
    assert_eq!(output.status.code(), Some(3));
    assert_eq!(output.stdout, b"a\0b");
    assert_eq!(output.stderr, b"err\n");
}

#[test]
fn signal_deaths_exit_128_plus_n() {
    let agent = Agent::start();
    for (signal, code) in [("KILL", 137), ("TERM", 143), ("SEGV", 139)] {
        let output = run(
            &agent,
            &[
                "exec",
                "-w",
                "/tmp",
                "--",
                "sh",
                "-c",
                &format!("ulimit -c 0; kill -{signal} $$"),
            ],
        );
        assert_eq!(output.status.code(), Some(code), "{signal}");
    }
}

#[test]
fn start_failures_exit_127_and_126_with_the_reason() {
    let agent = Agent::start();
    let output = run(&agent, &["exec", "--", "no-such-program-ferry"]);
    assert_eq!(output.status.code(), Some(127));
    assert!(
        stderr(&output).contains("no-such-program-ferry"),
        "{}",
        stderr(&output)
    );
    assert!(stderr(&output).contains("ENOENT"), "{}", stderr(&output));

    let output = run(&agent, &["exec", "--", "/etc/passwd"]);
    assert_eq!(output.status.code(), Some(126));
    assert!(
        stderr(&output).contains("permission denied"),
        "{}",
        stderr(&output)
    );

    let output = run(&agent, &["exec", "-w", "/no/such/dir", "--", "true"]);
    assert_eq!(output.status.code(), Some(126));
    assert!(
        stderr(&output).contains("working directory"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn stdin_is_forwarded_only_with_dash_i() {
    let agent = Agent::start();
    let data: Vec<u8> = (0..(5 << 20)).map(|i: u32| (i % 253) as u8).collect();
    let mut child = ferry(&agent)
        .args(["exec", "-i", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let sent = data.clone();
    let writer = std::thread::spawn(move || stdin.write_all(&sent).unwrap());
    let mut echoed = Vec::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut echoed)
        .unwrap();
    writer.join().unwrap();
    assert!(child.wait().unwrap().success());
    assert!(echoed == data);

    // Without -i the command reads /dev/null, even when ours has data.
    let mut child = ferry(&agent)
        .args(["exec", "--", "wc", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"ignored").unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.stdout, b"0\n");
}

#[test]
fn env_workdir_and_clean_env() {
    let agent = Agent::start();
    let output = run(
        &agent,
        &[
            "exec",
            "-e",
            "A=1",
            "-e",
            "B=x=y",
            "--clean-env",
            "-w",
            "/tmp",
            "--",
            "/usr/bin/env",
        ],
    );
    assert_eq!(output.stdout, b"A=1\nB=x=y\n");
    let output = run(&agent, &["exec", "-w", "/", "--", "pwd"]);
    assert_eq!(output.stdout, b"/\n");
    // Arguments that look like flags belong to the remote program.
    let output = run(
        &agent,
        &["exec", "--", "printf", "%s|", "-e", "--clean-env"],
    );
    assert_eq!(output.stdout, b"-e|--clean-env|");
}

#[test]
fn a_closed_stdout_exits_141_and_stops_the_command() {
    let agent = Agent::start();
    let mut child = ferry(&agent)
        .args(["exec", "--", "yes"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 4];
    out.read_exact(&mut first).unwrap();
    drop(out);
    assert_eq!(child.wait().unwrap().code(), Some(141));
}

#[test]
fn health_prints_versions() {
    let agent = Agent::start();
    let output = run(&agent, &["health"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        text.contains(&format!("ferry-agent {}", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    assert!(
        text.contains(&format!("protocol:   {}", ferry_wire::PROTOCOL_VERSION)),
        "{text}"
    );
    assert!(text.contains("security:   authenticated"), "{text}");
    // --connect overrides the environment.
    let output = ferry(&agent)
        .env("FERRY_CONNECT", "unix:///nonexistent")
        .args(["--connect", &agent.target_url(), "health"])
        .output()
        .unwrap();
    assert!(output.status.success());
}

#[test]
fn ferrys_own_errors_exit_255() {
    let agent = Agent::start();
    for args in [
        &["--connect", "unix:///nonexistent/sock", "health"][..],
        &["--connect", "tcp://1.2.3.4:5", "exec", "--", "true"],
        &[
            "--connect",
            "unix:///nonexistent/sock",
            "exec",
            "--",
            "true",
        ],
        &["exec"],
        &["exec", "-e", "NOEQUALS", "--", "true"],
        &["frobnicate"],
    ] {
        let output = run(&agent, args);
        assert_eq!(
            output.status.code(),
            Some(255),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(!output.stderr.is_empty(), "{args:?}");
    }
    let output = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .env_remove("FERRY_CONNECT")
        .arg("health")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(255));
}

/// A 0600 file holding `bytes`, in a fresh directory.
fn secret_file(bytes: &[u8]) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = common::fresh_dir("ferry-cli-secret").join("secret");
    std::fs::write(&path, bytes).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

#[test]
fn authentication_failures_are_clear_and_exit_255() {
    let agent = Agent::start();
    // Another secret: the agent refuses the proof, and nothing runs.
    let wrong = secret_file(b"not the agent's secret, 32 bytes");
    let output = ferry(&agent)
        .env("FERRY_SECRET_FILE", &wrong)
        .args(["exec", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(255));
    assert!(
        stderr(&output).contains("unauthenticated"),
        "{}",
        stderr(&output)
    );
    // No secret at all: the CLI says what to give.
    let output = ferry(&agent)
        .env_remove("FERRY_SECRET_FILE")
        .args(["health"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(255));
    assert!(
        stderr(&output).contains("--secret-file"),
        "{}",
        stderr(&output)
    );
    // A secret file others may read is refused before anything is sent.
    use std::os::unix::fs::PermissionsExt;
    let exposed = secret_file(b"0123456789abcdef0123456789abcdef");
    std::fs::set_permissions(&exposed, std::fs::Permissions::from_mode(0o644)).unwrap();
    let output = ferry(&agent)
        .env("FERRY_SECRET_FILE", &exposed)
        .args(["health"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(255));
    assert!(stderr(&output).contains("chmod 600"), "{}", stderr(&output));
}

#[test]
fn an_insecure_agent_is_warned_about_once_and_refused_with_a_secret() {
    let agent = Agent::start_with(&["--insecure"]);
    let output = ferry(&agent)
        .env_remove("FERRY_SECRET_FILE")
        .args(["exec", "--", "echo", "hi"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(output.stdout, b"hi\n");
    let warnings = stderr(&output).matches("without authentication").count();
    assert_eq!(warnings, 1, "{}", stderr(&output));
    // A client with a secret will not talk to an agent that cannot prove it.
    let output = run(&agent, &["exec", "--", "true"]);
    assert_eq!(output.status.code(), Some(255));
    assert!(
        stderr(&output).contains("--insecure"),
        "{}",
        stderr(&output)
    );
}

/// An option `exec` does not know, before the program, is a usage error that names it: it is
/// never run as a program (`ferry exec -X -- tty` must not run a program called `-X`). After the program, or after `--`, every argument is the command's.
#[test]
fn an_unknown_option_before_the_program_is_a_usage_error() {
    let agent = Agent::start();
    for args in [
        &["exec", "-X", "--", "tty"][..],
        &["exec", "--bogus", "true"],
    ] {
        let output = run(&agent, args);
        assert_eq!(output.status.code(), Some(255), "{args:?}");
        let option = args[1];
        assert!(
            stderr(&output).contains(&format!("unexpected argument '{option}'")),
            "{}",
            stderr(&output)
        );
    }
    let output = run(&agent, &["exec", "echo", "-t", "--bogus"]);
    assert_eq!(output.stdout, b"-t --bogus\n");
    let output = run(&agent, &["exec", "--", "-no-such-program"]);
    assert_eq!(output.status.code(), Some(127), "{}", stderr(&output));
}
