//! `examples/epoll_exec.rs`, the embedding example, run as a program against the shipped agent:
//! what only the example has (stdin from a regular file, which epoll refuses; `-n`; its own
//! failures; the hybrid-vsock handshake through a fake VMM socket). The exec cases every driver
//! passes (byte-exact output, stdin within credit, exit codes, signal deaths, start failures,
//! local refusals) run through the example in the shared suite: `host/tests/agent.rs` here,
//! `cargo xtask e2e` in QEMU.
#![allow(clippy::unwrap_used)] // a test reports failure by panicking

mod common;
#[path = "../../qemu-tests/tests/suite/epoll_exec.rs"]
mod epoll_exec;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Output};
use std::thread;

use common::Agent;

/// `epoll_exec TARGET -- ARGV…` with the test agents' secret, fed `input`.
fn exec_at(target: &str, argv: &[&str], input: Option<&[u8]>) -> Output {
    let mut args = vec![target, "--"];
    args.extend_from_slice(argv);
    epoll_exec::run(Some(common::secret_path()), &args, input)
}

#[test]
fn stdin_from_a_regular_file_is_forwarded() {
    let agent = Agent::start();
    // Every byte value, several MB. epoll refuses a regular file; reads from it never block.
    let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i ^ (i >> 8)) as u8).collect();
    let file = agent.socket.parent().unwrap().join("input");
    std::fs::write(&file, &data).unwrap();
    let output = Command::new(epoll_exec::binary())
        .env(epoll_exec::SECRET_VAR, agent.secret_path())
        .args([&agent.target_url(), "--", "cat"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(output.stdout == data, "stdout differs");
}

#[test]
fn with_n_the_commands_stdin_is_null() {
    let agent = Agent::start();
    let args = ["-n", &agent.target_url(), "--", "cat"];
    let output = epoll_exec::run(Some(agent.secret_path()), &args, Some(b"ignored"));
    assert_eq!(output.status.code(), Some(0));
    assert!(output.stdout.is_empty());
}

#[test]
fn its_own_failures_exit_255() {
    let agent = Agent::start();
    for args in [
        &["unix:///nonexistent/ferry.sock", "--", "true"][..],
        &["tcp://1.2.3.4:5", "--", "true"],
        &[&agent.target_url(), "true"],
        &[&agent.target_url(), "--"],
    ] {
        let output = epoll_exec::run(Some(agent.secret_path()), args, None);
        assert_eq!(output.status.code(), Some(255), "{args:?}: {output:?}");
        assert!(!output.stderr.is_empty());
    }
}

#[test]
fn hybrid_vsock_handshake_through_a_fake_vmm() {
    let agent = Agent::start();
    let path = agent.socket.parent().unwrap().join("vm.vsock");
    let listener = UnixListener::bind(&path).unwrap();
    let agent_socket = agent.socket.clone();
    // A fake VMM: `CONNECT 1024` gets `OK` and a splice to the agent; any other port an error.
    thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut line = Vec::new();
            let mut byte = [0u8];
            while stream.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
                line.push(byte[0]);
            }
            if line != b"CONNECT 1024" {
                stream.write_all(b"ERR no listener\n").unwrap();
                continue;
            }
            stream.write_all(b"OK 1073741824\n").unwrap();
            let agent = UnixStream::connect(&agent_socket).unwrap();
            splice(stream.try_clone().unwrap(), agent.try_clone().unwrap());
            splice(agent, stream);
        }
    });
    let target = format!("hvsock://{}:1024", path.display());
    let output = exec_at(&target, &["sh", "-c", "echo hi; cat"], Some(b"there\n"));
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(output.stdout, b"hi\nthere\n");

    let target = format!("hvsock://{}:9", path.display());
    let output = exec_at(&target, &["true"], None);
    assert_eq!(output.status.code(), Some(255));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("ERR no listener"), "{stderr}");
}

/// A VMM that drops the first handshakes (nothing accepts on the port yet) and then connects:
/// the example retries, as the library does; one that never accepts fails it with 255.
#[test]
fn a_handshake_ended_by_eof_is_retried() {
    let agent = Agent::start();
    let path = agent.socket.parent().unwrap().join("late.vsock");
    let listener = UnixListener::bind(&path).unwrap();
    let agent_socket = agent.socket.clone();
    thread::spawn(move || {
        for (attempt, stream) in listener.incoming().enumerate() {
            let mut stream = stream.unwrap();
            let mut line = Vec::new();
            let mut byte = [0u8];
            while stream.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
                line.push(byte[0]);
            }
            // Port 1024 comes up on the third attempt; port 9 never does.
            if line != b"CONNECT 1024" || attempt < 2 {
                continue; // dropped: EOF for the client
            }
            stream.write_all(b"OK 7\n").unwrap();
            let agent = UnixStream::connect(&agent_socket).unwrap();
            splice(stream.try_clone().unwrap(), agent.try_clone().unwrap());
            splice(agent, stream);
        }
    });
    let target = format!("hvsock://{}:1024", path.display());
    let output = exec_at(&target, &["echo", "late"], None);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(output.stdout, b"late\n");

    let target = format!("hvsock://{}:9", path.display());
    let output = exec_at(&target, &["true"], None);
    assert_eq!(output.status.code(), Some(255), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("every time"), "{stderr}");
}

#[test]
fn authentication_failures_exit_255_and_say_why() {
    let agent = Agent::start();
    let target = agent.target_url();
    let args = ["-n", &target, "--", "true"];
    // No secret for an agent that requires one.
    let output = epoll_exec::run(None, &args, None);
    assert_eq!(output.status.code(), Some(255), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(epoll_exec::SECRET_VAR), "{stderr}");
    // Another secret: the agent refuses our proof.
    let other = agent.socket.parent().unwrap().join("other-secret");
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&other)
            .and_then(|mut file| file.write_all(b"not the agent's secret, not at all"))
            .unwrap();
    }
    let output = epoll_exec::run(Some(&other), &args, None);
    assert_eq!(output.status.code(), Some(255), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("refused our proof"), "{stderr}");
    // An insecure agent and a secret: refused before anything is sent; without one, it runs.
    let insecure = Agent::start_with(&["--insecure"]);
    let target = insecure.target_url();
    let args = ["-n", &target, "--", "true"];
    let output = epoll_exec::run(Some(agent.secret_path()), &args, None);
    assert_eq!(output.status.code(), Some(255), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("--insecure"));
    assert_eq!(epoll_exec::run(None, &args, None).status.code(), Some(0));
}

/// Copies `from` to `to` on a thread until EOF, then half-closes `to`.
fn splice(mut from: UnixStream, mut to: UnixStream) {
    thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}

/// An agent that stops answering mid-command (its connection process stopped) ends the example
/// after three keepalive intervals with "agent stopped answering", exit 255.
#[test]
fn a_frozen_agent_ends_the_example() {
    use std::io::BufRead;
    let agent = Agent::start();
    let mut child = Command::new(epoll_exec::binary())
        .env(epoll_exec::SECRET_VAR, agent.secret_path())
        .args([
            &agent.target_url(),
            "--",
            "sh",
            "-c",
            "echo $PPID; exec sleep 100",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let connection: i32 = line.trim().parse().unwrap();
    // SAFETY: kill has no memory effects.
    #[allow(unsafe_code)]
    let stop = |signal| unsafe { libc::kill(connection, signal) };
    stop(libc::SIGSTOP);
    let status = child.wait().unwrap();
    stop(libc::SIGCONT);
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(255), "{stderr}");
    assert!(stderr.contains("agent stopped answering"), "{stderr}");
}
