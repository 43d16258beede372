//! `examples/epoll_exec.rs`, the embedding example, run as a program against the shipped agent:
//! byte-exact output, stdin forwarded within credit (from a pipe and from a file), the CLI's
//! exit statuses, and the hybrid-vsock handshake through a fake VMM socket.
#![allow(clippy::unwrap_used)] // a test reports failure by panicking

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::thread;

use common::Agent;

/// The example, built once per test run into a target dir of its own (the outer `cargo test`
/// holds the workspace's), or `FERRY_EXAMPLE_BIN`.
fn example_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        if let Some(path) = std::env::var_os("FERRY_EXAMPLE_BIN") {
            return PathBuf::from(path);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let target_dir = root.join("target").join("test-example");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(root)
            .args([
                "build",
                "--quiet",
                "--package",
                "ferry-host",
                "--example",
                "epoll_exec",
                "--target-dir",
            ])
            .arg(&target_dir)
            .status()
            .expect("running cargo to build the example");
        assert!(status.success(), "building the example failed");
        target_dir.join("debug/examples/epoll_exec")
    })
}

/// Runs the example with `args`, feeding `input` through a pipe (`None`: stdin is /dev/null).
fn run(args: &[&str], input: Option<&[u8]>) -> Output {
    let mut child = Command::new(example_binary())
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let feeder = input.map(|input| {
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_vec();
        // A thread: the example reads its stdin only as the agent grants credit.
        thread::spawn(move || {
            let _ = stdin.write_all(&input);
        })
    });
    let output = child.wait_with_output().unwrap();
    if let Some(feeder) = feeder {
        feeder.join().unwrap();
    }
    output
}

fn exec(agent: &Agent, argv: &[&str], input: Option<&[u8]>) -> Output {
    let target = agent.target_url();
    let mut args = vec![target.as_str(), "--"];
    args.extend_from_slice(argv);
    run(&args, input)
}

fn pattern(len: usize) -> Vec<u8> {
    // Every byte value, NUL and invalid UTF-8 included, in a sequence that exposes reordering.
    (0..len).map(|i| (i ^ (i >> 8) ^ (i >> 16)) as u8).collect()
}

#[test]
fn binary_output_and_stdin_round_trip_are_byte_exact() {
    let agent = Agent::start();
    let data = pattern(4 << 20);
    // From a pipe: epoll tells when our stdin is readable.
    let output = exec(&agent, &["/bin/sh", "-c", "tee /dev/stderr"], Some(&data));
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(output.stdout == data, "stdout differs");
    assert!(output.stderr == data, "stderr differs");

    // From a regular file: epoll refuses it, and reads never block.
    let file = agent.socket.parent().unwrap().join("input");
    std::fs::write(&file, &data).unwrap();
    let output = Command::new(example_binary())
        .args([&agent.target_url(), "--", "cat"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert!(output.stdout == data, "stdout differs");

    // Output only: every byte value, several MB.
    let output = exec(&agent, &["cat", file.to_str().unwrap()], None);
    assert!(output.stdout == data, "stdout differs");
}

#[test]
fn stdin_is_forwarded_within_credit_and_null_with_n() {
    let agent = Agent::start();
    // The command reads nothing for a while: only credit lets bytes through, then it all
    // arrives.
    let data = vec![b'x'; 3 << 20];
    let output = exec(&agent, &["/bin/sh", "-c", "sleep 0.3; wc -c"], Some(&data));
    assert_eq!(output.stdout, format!("{}\n", data.len()).as_bytes());

    let args = ["-n", &agent.target_url(), "--", "cat"];
    let output = run(&args, Some(b"ignored"));
    assert_eq!(output.status.code(), Some(0));
    assert!(output.stdout.is_empty());
}

#[test]
fn exit_statuses_are_the_clis() {
    let agent = Agent::start();
    let scratch = agent.socket.parent().unwrap();
    let not_exec = scratch.join("not-executable");
    std::fs::write(&not_exec, "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&not_exec, std::fs::Permissions::from_mode(0o644)).unwrap();
    let not_exec = not_exec.to_str().unwrap();
    for (argv, code) in [
        (&["/bin/sh", "-c", "exit 0"][..], 0),
        (&["/bin/sh", "-c", "exit 3"], 3),
        (&["/bin/sh", "-c", "exit 255"], 255),
        (&["/bin/sh", "-c", "kill -9 $$"], 137),
        (&["/bin/sh", "-c", "kill -TERM $$"], 143),
        (&["no-such-program-ferry"], 127),
        (&[not_exec], 126),
    ] {
        let output = exec(&agent, argv, None);
        assert_eq!(output.status.code(), Some(code), "{argv:?}: {output:?}");
    }
    // Our own failures: 255.
    for args in [
        &["unix:///nonexistent/ferry.sock", "--", "true"][..],
        &["tcp://1.2.3.4:5", "--", "true"],
        &[&agent.target_url(), "true"],
        &[&agent.target_url(), "--"],
    ] {
        let output = run(args, None);
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
    let output = run(
        &[&target, "--", "sh", "-c", "echo hi; cat"],
        Some(b"there\n"),
    );
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(output.stdout, b"hi\nthere\n");

    let target = format!("hvsock://{}:9", path.display());
    let output = run(&[&target, "--", "true"], None);
    assert_eq!(output.status.code(), Some(255));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("ERR no listener"), "{stderr}");
}

/// Copies `from` to `to` on a thread until EOF, then half-closes `to`.
fn splice(mut from: UnixStream, mut to: UnixStream) {
    thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}
