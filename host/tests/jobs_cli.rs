//! Detached jobs through the `ferry` CLI against the shipped agent: `exec --detach` prints one
//! line, `attach` replays and follows byte for byte with offsets, `wait` exits as exec does,
//! `kill`, `rm`, `jobs --json`, and every refusal is one line and exit 255.
#![allow(clippy::unwrap_used)] // a test reports failure by panicking

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::json::{parse, Json};
use common::{stderr, Agent};

fn ferry(agent: &Agent, args: &[&str]) -> Output {
    common::ferry(agent)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `ferry exec --detach -- ARGS`: the id, checking that stdout was exactly one line with it.
fn detach(agent: &Agent, args: &[&str]) -> String {
    let mut all = vec!["exec", "--detach"];
    all.extend_from_slice(args);
    let output = ferry(agent, &all);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = String::from_utf8(output.stdout).unwrap();
    let id = text
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("{text:?}"));
    assert!(
        !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()),
        "one line with the id and nothing else: {text:?}"
    );
    id.to_owned()
}

/// Exactly one line on stderr, containing `needle`, and exit 255.
fn refused(output: &Output, needle: &str) {
    let text = stderr(output);
    assert_eq!(output.status.code(), Some(255), "{text}");
    assert_eq!(text.lines().count(), 1, "one line: {text:?}");
    assert!(text.contains(needle), "{needle:?} in {text:?}");
}

fn jobs_json(agent: &Agent) -> Json {
    let output = ferry(agent, &["jobs", "--json"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    parse(std::str::from_utf8(&output.stdout).unwrap())
}

fn job_entry(agent: &Agent, id: &str) -> Json {
    let json = jobs_json(agent);
    json.get("jobs")
        .list()
        .iter()
        .find(|job| job.get("id").num() as u64 == id.parse::<u64>().unwrap())
        .unwrap_or_else(|| panic!("job {id} in {json:?}"))
        .clone()
}

/// What `seq`-like output of `lines` numbered lines is, exactly.
fn numbered(lines: u32) -> Vec<u8> {
    (1..=lines)
        .flat_map(|i| format!("line {i}\n").into_bytes())
        .collect()
}

#[test]
fn detach_prints_the_id_and_attach_replays_then_follows_byte_for_byte() {
    let agent = Agent::start();
    // A first part now, a pause (attach lands in it), a second part, stderr, a status.
    let id = detach(
        &agent,
        &[
            "--",
            "sh",
            "-c",
            "i=1; while [ $i -le 2000 ]; do echo line $i; i=$((i+1)); done; sleep 1; \
             while [ $i -le 4000 ]; do echo line $i; i=$((i+1)); done; echo bye >&2; exit 3",
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    let output = ferry(&agent, &["attach", &id]);
    assert_eq!(output.stdout, numbered(4000));
    assert_eq!(stderr(&output), "bye\n");
    assert_eq!(output.status.code(), Some(3));

    // Once it ended, a second attach replays all of it, and wait answers at once.
    let again = ferry(&agent, &["attach", &id]);
    assert_eq!(again.stdout, numbered(4000));
    assert_eq!(again.status.code(), Some(3));
    assert_eq!(ferry(&agent, &["wait", &id]).status.code(), Some(3));

    // From offsets: both streams, or each its own.
    let whole = numbered(4000);
    let since = ferry(&agent, &["attach", &id, "--since", "2"]);
    assert_eq!(since.stdout, whole[2..]);
    assert_eq!(stderr(&since), "e\n");
    let split = ferry(
        &agent,
        &[
            "attach",
            &id,
            "--since-stdout",
            "100",
            "--since-stderr",
            "4",
        ],
    );
    assert_eq!(split.stdout, whole[100..]);
    assert_eq!(stderr(&split), "");
    assert_eq!(split.status.code(), Some(3));

    let entry = job_entry(&agent, &id);
    assert_eq!(entry.get("state").text(), "exited");
    assert_eq!(entry.get("stdout_bytes").num() as usize, whole.len());
    assert_eq!(entry.get("stderr_bytes").num() as usize, 4);
    assert_eq!(entry.get("termination").get("exit_code").num(), 3.0);
    assert_eq!(entry.get("argv").list()[0].text(), "sh");
}

#[test]
fn attach_without_follow_prints_what_is_kept_and_leaves_the_job_running() {
    let agent = Agent::start();
    let id = detach(&agent, &["--", "sh", "-c", "echo started; sleep 30"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    let output = loop {
        let output = ferry(&agent, &["attach", &id, "--no-follow"]);
        if !output.stdout.is_empty() || Instant::now() > deadline {
            break output;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(output.stdout, b"started\n");
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(job_entry(&agent, &id).get("state").text(), "running");
    // The default said out loud, and both at once is a usage error.
    let both = ferry(&agent, &["attach", &id, "--follow", "--no-follow"]);
    assert_eq!(both.status.code(), Some(255), "{}", stderr(&both));
    assert_eq!(ferry(&agent, &["kill", &id]).status.code(), Some(0));
    let followed = ferry(&agent, &["attach", "-f", &id]);
    assert_eq!(followed.stdout, b"started\n");
    assert_eq!(followed.status.code(), Some(143), "{}", stderr(&followed));
}

#[test]
fn wait_exits_as_exec_would() {
    let agent = Agent::start();
    let code = detach(&agent, &["--", "sh", "-c", "sleep 0.2; exit 7"]);
    let signal = detach(&agent, &["--", "sh", "-c", "sleep 0.2; kill -TERM $$"]);
    let timeout = detach(&agent, &["--timeout", "200ms", "--", "sleep", "30"]);
    assert_eq!(ferry(&agent, &["wait", &code]).status.code(), Some(7));
    assert_eq!(ferry(&agent, &["wait", &signal]).status.code(), Some(143));
    let timed_out = ferry(&agent, &["wait", &timeout]);
    assert_eq!(timed_out.status.code(), Some(124), "{}", stderr(&timed_out));
    assert!(
        stderr(&timed_out).contains("timed out"),
        "{}",
        stderr(&timed_out)
    );
    assert_eq!(job_entry(&agent, &signal).get("state").text(), "killed");
}

#[test]
fn kill_ends_the_tree_and_rm_forgets_only_ended_jobs() {
    let agent = Agent::start();
    // A child in its own session: the tree kill must reach it too.
    let id = detach(
        &agent,
        &[
            "--name",
            "tree",
            "--",
            "sh",
            "-c",
            "setsid sleep 60 & sleep 60",
        ],
    );
    refused(&ferry(&agent, &["rm", "tree"]), "still running");
    let pgid = job_entry(&agent, &id).get("pid").num() as u32;
    let started = Instant::now();
    let killed = ferry(&agent, &["kill", "tree", "--grace", "1s"]);
    assert_eq!(killed.status.code(), Some(0), "{}", stderr(&killed));
    let waited = ferry(&agent, &["wait", &id]);
    assert_eq!(waited.status.code(), Some(143), "{}", stderr(&waited));
    assert!(started.elapsed() < Duration::from_secs(10));
    if let Err(left) = common::wait_group_gone(pgid, Duration::from_secs(5)) {
        panic!("the job's group outlived its kill: {left:?}");
    }
    let entry = job_entry(&agent, &id);
    assert_eq!(entry.get("state").text(), "killed");
    assert_eq!(entry.get("name").text(), "tree");
    assert_eq!(entry.get("termination").get("ending").text(), "cancelled");

    refused(&ferry(&agent, &["kill", &id]), "has ended");
    assert_eq!(ferry(&agent, &["rm", &id]).status.code(), Some(0));
    refused(&ferry(&agent, &["attach", &id]), "no such job");
    refused(&ferry(&agent, &["wait", "tree"]), "no such job");
    // The name is free again.
    let again = detach(&agent, &["--name", "tree", "--", "true"]);
    assert_ne!(again, id, "ids are never reused");
}

#[test]
fn kill_with_a_signal_reaches_the_process_group() {
    let agent = Agent::start();
    let id = detach(
        &agent,
        &[
            "--",
            "sh",
            "-c",
            "trap 'echo usr1; exit 5' USR1; while :; do sleep 0.05; done",
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        ferry(&agent, &["kill", &id, "--signal", "USR1"])
            .status
            .code(),
        Some(0)
    );
    let output = ferry(&agent, &["attach", &id]);
    assert_eq!(output.stdout, b"usr1\n");
    assert_eq!(output.status.code(), Some(5));
}

#[test]
fn unknown_jobs_and_bad_references_are_one_line_each() {
    let agent = Agent::start();
    for args in [
        &["attach", "999"][..],
        &["wait", "999"],
        &["kill", "999"],
        &["rm", "999"],
        &["attach", "no-such-name"],
    ] {
        refused(&ferry(&agent, args), "no such job");
    }
    // Refused before anything is sent.
    for bad in ["0", "-x", "a/b", "01"] {
        let output = ferry(&agent, &["wait", "--", bad]);
        assert_eq!(
            output.status.code(),
            Some(255),
            "{bad}: {}",
            stderr(&output)
        );
        assert_eq!(stderr(&output).lines().count(), 1, "{}", stderr(&output));
    }
    let bad_name = ferry(&agent, &["exec", "--detach", "--name", "123", "--", "true"]);
    assert_eq!(bad_name.status.code(), Some(255));
    assert!(bad_name.stdout.is_empty());
}

#[test]
fn a_detach_that_cannot_start_prints_the_error_and_no_id() {
    let agent = Agent::start();
    let output = ferry(&agent, &["exec", "--detach", "--", "no-such-program-ferry"]);
    assert_eq!(output.status.code(), Some(127), "{}", stderr(&output));
    assert!(output.stdout.is_empty());
    assert!(stderr(&output).contains("no-such-program-ferry"));
    let output = ferry(
        &agent,
        &["exec", "--detach", "-w", "/no/such/dir", "--", "true"],
    );
    assert_eq!(output.status.code(), Some(126), "{}", stderr(&output));
    assert!(output.stdout.is_empty());
}

#[test]
fn exec_with_a_name_runs_as_exec_and_the_name_is_unique() {
    let agent = Agent::start();
    let output = ferry(
        &agent,
        &[
            "exec",
            "--name",
            "build",
            "--",
            "sh",
            "-c",
            "printf 'a\\000b'; echo err >&2; exit 4",
        ],
    );
    assert_eq!(output.stdout, b"a\0b");
    assert_eq!(stderr(&output), "err\n");
    assert_eq!(output.status.code(), Some(4));
    // The job stays listed, under its name, until removed.
    let json = jobs_json(&agent);
    let names: Vec<&str> = json
        .get("jobs")
        .list()
        .iter()
        .filter(|job| !job.get("name").is_null())
        .map(|job| job.get("name").text())
        .collect();
    assert_eq!(names, ["build"]);
    refused(
        &ferry(&agent, &["exec", "--name", "build", "--", "true"]),
        "exists",
    );
    assert_eq!(ferry(&agent, &["rm", "build"]).status.code(), Some(0));

    // -i: stdin goes to the job through the attachment.
    let mut child = common::ferry(&agent)
        .args(["exec", "-i", "--name", "cat", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"through the job\n").unwrap();
    }
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.stdout, b"through the job\n");
    assert_eq!(output.status.code(), Some(0));
}

#[test]
fn attach_i_feeds_a_detached_job_and_a_second_attacher_is_told() {
    let agent = Agent::start();
    let id = detach(&agent, &["-i", "--", "cat"]);
    let mut first = common::ferry(&agent)
        .args(["attach", "-i", &id])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // A second attacher gets the output but not the stdin, and says so.
    let second = common::ferry(&agent)
        .args(["attach", "-i", &id])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    {
        use std::io::Write;
        let mut stdin = first.stdin.take().unwrap();
        stdin.write_all(b"hello\n").unwrap();
    }
    let first = first.wait_with_output().unwrap();
    let second = second.wait_with_output().unwrap();
    assert_eq!(first.stdout, b"hello\n");
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    assert_eq!(second.stdout, b"hello\n");
    assert!(
        stderr(&second).contains("stdin is not ours"),
        "{}",
        stderr(&second)
    );
}

#[test]
fn a_wrapped_spool_is_reported_with_its_offsets() {
    let agent = Agent::start_with(&[
        "--set",
        "job_spool_head=4096",
        "--set",
        "job_spool_ring=8192",
    ]);
    // 20000 numbered lines, far beyond head + ring, with nobody attached.
    let id = detach(
        &agent,
        &[
            "--",
            "sh",
            "-c",
            "i=1; while [ $i -le 20000 ]; do echo line $i; i=$((i+1)); done",
        ],
    );
    assert_eq!(ferry(&agent, &["wait", &id]).status.code(), Some(0));
    let whole = numbered(20000);
    let output = ferry(&agent, &["attach", &id]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stderr(&output);
    let lost = whole.len() - 4096 - 8192;
    let note = format!(
        "ferry: stdout: {lost} bytes lost at offsets 4096..{} (the job's spool no longer held them)\n",
        4096 + lost
    );
    assert_eq!(text, note);
    let mut kept = whole[..4096].to_vec();
    kept.extend_from_slice(&whole[whole.len() - 8192..]);
    assert_eq!(output.stdout, kept);

    // From inside the gap: the loss starts where asked.
    let output = ferry(&agent, &["attach", &id, "--since", "5000"]);
    assert!(
        stderr(&output).contains(&format!(
            "{} bytes lost at offsets 5000..",
            4096 + lost - 5000
        )),
        "{}",
        stderr(&output)
    );
    assert_eq!(output.stdout, whole[whole.len() - 8192..]);
}

#[test]
fn sixty_four_jobs_run_the_sixty_fifth_is_refused_and_all_are_listed() {
    let agent = Agent::start();
    let ids: Vec<String> = (0..64)
        .map(|_| detach(&agent, &["--", "sleep", "60"]))
        .collect();
    let output = ferry(&agent, &["exec", "--detach", "--", "sleep", "60"]);
    assert!(output.stdout.is_empty());
    refused(&output, "busy");
    let json = jobs_json(&agent);
    let listed: Vec<String> = json
        .get("jobs")
        .list()
        .iter()
        .map(|job| {
            assert_eq!(job.get("state").text(), "running");
            assert!(job.get("termination").is_null());
            (job.get("id").num() as u64).to_string()
        })
        .collect();
    assert_eq!(listed, ids);
    // The table has a header and one line per job.
    let table = ferry(&agent, &["jobs"]);
    let text = String::from_utf8(table.stdout).unwrap();
    assert_eq!(text.lines().count(), 65, "{text}");
    assert!(text.starts_with("ID"), "{text}");
    // Once one ends, a new job may take its slot.
    assert_eq!(
        ferry(&agent, &["kill", &ids[0], "--signal", "KILL"])
            .status
            .code(),
        Some(0)
    );
    assert_eq!(ferry(&agent, &["wait", &ids[0]]).status.code(), Some(137));
    detach(&agent, &["--", "true"]);
    for id in &ids[1..] {
        let _ = ferry(&agent, &["kill", id, "--grace", "0"]);
    }
}

/// The job outlives the client that started it, and the CLI that attached to it: a `^C`
/// (the default SIGINT) ends `ferry attach`, not the job.
#[test]
fn the_job_outlives_its_clients() {
    let agent = Agent::start();
    let id = detach(&agent, &["--", "sh", "-c", "sleep 1; echo done"]);
    let mut attach = common::ferry(&agent);
    attach
        .args(["attach", &id])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let child = attach.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let mut child = child;
    let status = child.wait().unwrap();
    assert!(!status.success());
    let output = ferry(&agent, &["attach", &id]);
    assert_eq!(output.stdout, b"done\n");
    assert_eq!(output.status.code(), Some(0));
}

/// A job belongs to the user it runs as: another user neither sees nor touches it, unless the
/// policy says `jobs_any_user`.
#[test]
fn jobs_belong_to_their_user() {
    for any_user in [false, true] {
        let policy = if any_user {
            "jobs_any_user=true"
        } else {
            "jobs_any_user=false"
        };
        let agent = Agent::start_unprivileged(&["--allow-users", "nobody,1234", "--set", policy]);
        let nobody = detach(&agent, &["--", "sleep", "30"]);
        let other = detach(&agent, &["-u", "1234", "--", "sleep", "30"]);
        let listed = |user: Option<&str>| -> Vec<String> {
            let mut args = vec!["jobs", "--json"];
            args.extend(user.map(|user| ["-u", user]).into_iter().flatten());
            let output = ferry(&agent, &args);
            assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
            parse(std::str::from_utf8(&output.stdout).unwrap())
                .get("jobs")
                .list()
                .iter()
                .map(|job| (job.get("id").num() as u64).to_string())
                .collect()
        };
        if any_user {
            assert_eq!(listed(None), [nobody.clone(), other.clone()]);
            assert_eq!(listed(Some("1234")), [nobody.clone(), other.clone()]);
            let output = ferry(&agent, &["kill", "-u", "1234", &nobody, "--grace", "0"]);
            assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        } else {
            assert_eq!(listed(None), std::slice::from_ref(&nobody));
            assert_eq!(listed(Some("1234")), std::slice::from_ref(&other));
            refused(
                &ferry(&agent, &["attach", "-u", "1234", &nobody]),
                "permission denied",
            );
            refused(&ferry(&agent, &["kill", &other]), "permission denied");
            let entry = job_entry(&agent, &nobody);
            assert_eq!(entry.get("uid").num(), 65534.0);
            assert_eq!(
                ferry(&agent, &["kill", &nobody, "--grace", "0"])
                    .status
                    .code(),
                Some(0)
            );
        }
        assert_eq!(
            ferry(&agent, &["kill", "-u", "1234", &other, "--grace", "0"])
                .status
                .code(),
            Some(0)
        );
    }
}
