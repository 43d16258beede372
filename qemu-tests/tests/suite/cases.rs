//! The exec cases: one list, run through every driver (the blocking API, the async API, the
//! epoll example; see `drivers.rs`) on every transport. Bytes in and out, every way a command
//! ends, every way it fails to start.

use std::collections::BTreeSet;
use std::path::Path;

use ferry_host::ErrorCode;
use ferry_wire::limits::{MAX_ARG_LEN, STDIN_WINDOW};

use super::drivers::{Driver, Expected, Request};
use super::{pattern, write_file, Fixture};

pub fn binary_output_is_byte_exact_on_both_streams(fixture: &Fixture, driver: Driver) {
    let data = pattern(3 << 20);
    assert_eq!(data.iter().collect::<BTreeSet<_>>().len(), 256);
    let file = fixture.scratch_path("every-byte");
    write_file(&fixture.client(), &file, &data, 0o644);
    // Both streams at once: each must arrive whole, in order, and apart from the other.
    let script = "cat \"$1\" & cat \"$1\" >&2; wait";
    let argv = ["/bin/sh", "-c", script, "sh", path_str(&file)];
    let outcome = driver.run(fixture, &Request::new(&argv));
    outcome.assert_end(Expected::Exit(0));
    outcome.assert_stdout(&data);
    outcome.assert_stderr(&data);
}

pub fn stdin_round_trips_byte_exact_within_credit(fixture: &Fixture, driver: Driver) {
    let data = pattern(4 << 20);
    assert!(data.len() > 16 * STDIN_WINDOW);
    // The command reads nothing at first, so the writer soon waits for credit; then every byte
    // comes back, on both streams.
    let argv = ["/bin/sh", "-c", "sleep 0.2; exec tee /dev/stderr"];
    let outcome = driver.run(fixture, &Request::new(&argv).stdin(&data));
    outcome.assert_end(Expected::Exit(0));
    outcome.assert_stdout(&data);
    outcome.assert_stderr(&data);
}

pub fn exit_codes_are_exact(fixture: &Fixture, driver: Driver) {
    for code in [0u8, 1, 2, 3, 126, 127, 128, 255] {
        let script = format!("printf out; printf err >&2; exit {code}");
        let outcome = driver.run(fixture, &Request::new(&["/bin/sh", "-c", &script]));
        outcome.assert_end(Expected::Exit(code));
        outcome.assert_stdout(b"out");
        outcome.assert_stderr(b"err");
    }
}

pub fn signal_deaths_are_exact(fixture: &Fixture, driver: Driver) {
    // PIPE and HUP: a shell cannot undo a disposition it was started with ignored, so these
    // also show the command did not inherit the agent's.
    let signals = [
        ("KILL", 9u8),
        ("TERM", 15),
        ("INT", 2),
        ("USR1", 10),
        ("PIPE", 13),
        ("HUP", 1),
    ];
    for (signal, number) in signals {
        let script = format!("kill -{signal} $$");
        let outcome = driver.run(fixture, &Request::new(&["/bin/sh", "-c", &script]));
        outcome.assert_end(Expected::Signal(number));
        outcome.assert_stdout(b"");
        outcome.assert_stderr(b"");
    }
}

pub fn a_missing_program_is_not_found(fixture: &Fixture, driver: Driver) {
    let not_found = Expected::Refused {
        code: ErrorCode::NotFound,
        errno: 2,
    };
    // Searched for on the default path, and named by a path.
    for program in ["no-such-program-ferry", "/no/such/path"] {
        let outcome = driver.run(fixture, &Request::new(&[program]));
        outcome.assert_end(not_found);
        outcome.assert_stdout(b"");
    }
}

pub fn what_cannot_be_executed_names_its_cause(fixture: &Fixture, driver: Driver) {
    let client = fixture.client();
    let not_executable = fixture.scratch_path("not-executable");
    write_file(&client, &not_executable, b"#!/bin/sh\necho hi\n", 0o644);
    let bad_format = fixture.scratch_path("bad-format");
    write_file(&client, &bad_format, b"\x7fELF\0\0\0\0", 0o755);

    let denied = |errno| Expected::Refused {
        code: ErrorCode::PermissionDenied,
        errno,
    };
    let cases = [
        (path_str(&not_executable), denied(13)),
        (path_str(&fixture.scratch), denied(13)),
        (
            path_str(&bad_format),
            Expected::Refused {
                code: ErrorCode::ExecFormat,
                errno: 8,
            },
        ),
    ];
    for (program, expected) in cases {
        let outcome = driver.run(fixture, &Request::new(&[program]));
        outcome.assert_end(expected);
        outcome.assert_stdout(b"");
    }
}

pub fn a_missing_working_directory_is_refused(fixture: &Fixture, driver: Driver) {
    let outcome = driver.run(fixture, &Request::new(&["true"]).cwd("/no/such/dir"));
    outcome.assert_end(Expected::Refused {
        code: ErrorCode::BadCwd,
        errno: 2,
    });
}

pub fn invalid_requests_are_refused_locally(fixture: &Fixture, driver: Driver) {
    // The protocol's limits are Linux's: an argument one byte past them cannot reach the example
    // through its own command line, and a NUL in one cannot either.
    if driver != Driver::Example {
        let huge = "x".repeat(MAX_ARG_LEN);
        let outcome = driver.run(fixture, &Request::new(&["true", &huge]));
        outcome.assert_end(Expected::InvalidRequest);
        let outcome = driver.run(fixture, &Request::new(&["a\0b"]));
        outcome.assert_end(Expected::InvalidRequest);
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}
