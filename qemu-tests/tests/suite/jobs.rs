//! Detached jobs (`ferry exec --detach`, `attach`, `wait`, `kill`, `jobs`): a job outlives the
//! client that started it, is followed byte for byte from another, ends with its status, and the
//! registry is bounded. Each scenario removes the jobs it made (the guest's registry is shared by
//! every scenario of a run).

use std::process::Output;
use std::time::{Duration, Instant};

use ferry_host::{AttachEvent, AttachOptions, ExitStatus, Stream};

use super::bombs::{in_guest, say};
use super::cli::ferry;
use super::json::{parse, Json};
use super::trees::{until_gone, until_running};
use super::Fixture;

/// `ferry ARGS`, failing the scenario (instead of hanging the suite) when it has not ended
/// within [`CLI_LIMIT`].
fn run(fixture: &Fixture, args: &[&str]) -> Output {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = ferry(fixture, args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let stdout = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = out.read_to_end(&mut bytes);
        bytes
    });
    let stderr = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = err.read_to_end(&mut bytes);
        bytes
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > CLI_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            let (out, err) = (stdout.join().unwrap(), stderr.join().unwrap());
            panic!(
                "ferry {args:?} did not end within {CLI_LIMIT:?}; it printed {} bytes, stderr {:?}",
                out.len(),
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// The longest any one CLI run of these scenarios may take in an emulated guest.
const CLI_LIMIT: Duration = Duration::from_secs(120);

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `ferry exec --detach ARGS`: the id, checking that stdout was one line with it and nothing
/// else.
fn detach(fixture: &Fixture, args: &[&str]) -> String {
    let mut all = vec!["exec", "--detach"];
    all.extend_from_slice(args);
    let output = run(fixture, &all);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = String::from_utf8(output.stdout).unwrap();
    let id = text
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("{text:?}"));
    assert!(
        !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()),
        "one line with the id: {text:?}"
    );
    id.to_owned()
}

/// Kills (if needed), waits for and removes `ids`.
fn clean_up(fixture: &Fixture, ids: &[String]) {
    for id in ids {
        let _ = run(fixture, &["kill", id, "--grace", "0"]);
    }
    for id in ids {
        let _ = run(fixture, &["wait", id]);
        let removed = run(fixture, &["rm", id]);
        assert_eq!(
            removed.status.code(),
            Some(0),
            "rm {id}: {}",
            stderr(&removed)
        );
    }
}

/// `COUNT` numbered lines: `line 1\n` …
fn numbered(from: u32, to: u32) -> Vec<u8> {
    (from..=to)
        .flat_map(|i| format!("line {i}\n").into_bytes())
        .collect()
}

pub fn a_detached_job_is_followed_from_another_client_byte_for_byte(fixture: &Fixture) {
    // The CLI that starts it exits at once: the job must not need it. A first part, a pause in
    // which we attach, a second part, stderr, a status.
    let id = detach(
        fixture,
        &[
            "--",
            "sh",
            "-c",
            "i=1; while [ $i -le 3000 ]; do echo line $i; i=$((i+1)); done; \
             while [ ! -e \"$0\" ]; do sleep 0.05; done; \
             while [ $i -le 6000 ]; do echo line $i; i=$((i+1)); done; echo bye >&2; exit 3",
            fixture.scratch_path("go").to_str().unwrap(),
        ],
    );
    let client = fixture.client();
    let mut attachment = client
        .job(id.as_str())
        .attach(AttachOptions::default())
        .unwrap();
    assert!(attachment.header().running, "{:?}", attachment.header());
    assert_eq!(attachment.header().stdout.from, 0);
    let (mut stdout, mut stderr_bytes) = (Vec::new(), Vec::new());
    let mut released = false;
    let first_part = numbered(1, 3000).len();
    let end = loop {
        match attachment.next_event().unwrap().expect("an event") {
            AttachEvent::Stdout { offset, data } => {
                assert_eq!(offset, stdout.len() as u64, "offsets tile stdout");
                stdout.extend_from_slice(data);
                // Mid-run: the first part replayed, the job waiting; let it go on.
                if !released && stdout.len() == first_part {
                    released = true;
                    let mut go = super::sh("touch \"$1\"");
                    go.arg("sh").arg(fixture.scratch_path("go"));
                    super::stdout_of(&client, &go);
                }
            }
            AttachEvent::Stderr { offset, data } => {
                assert_eq!(offset, stderr_bytes.len() as u64, "offsets tile stderr");
                stderr_bytes.extend_from_slice(data);
            }
            AttachEvent::Lost { .. } => panic!("nothing is lost below the spool's size"),
            AttachEvent::Exited(end) => break end,
            AttachEvent::StillRunning => panic!("following"),
        }
    };
    assert!(released, "the first part came while the job waited");
    assert_eq!(stdout, numbered(1, 6000));
    assert_eq!(stderr_bytes, b"bye\n");
    assert_eq!(end.status, ExitStatus::Code(3));
    assert_eq!(attachment.offset(Stream::Stdout), stdout.len() as u64);

    // The CLI: a replay from an offset, and wait's status.
    let whole = numbered(1, 6000);
    let since = run(
        fixture,
        &[
            "attach",
            &id,
            "--since-stdout",
            "1000",
            "--since-stderr",
            "1",
        ],
    );
    assert_eq!(since.stdout, whole[1000..]);
    assert_eq!(stderr(&since), "ye\n");
    assert_eq!(since.status.code(), Some(3));
    assert_eq!(run(fixture, &["wait", &id]).status.code(), Some(3));
    clean_up(fixture, &[id]);
}

pub fn a_wrapped_spool_says_exactly_what_was_lost(fixture: &Fixture) {
    // Beyond the default head (64 KiB) and ring (256 KiB): 60000 lines are ~590 KB.
    let id = detach(
        fixture,
        &[
            "--",
            "sh",
            "-c",
            "i=1; while [ $i -le 60000 ]; do echo line $i; i=$((i+1)); done",
        ],
    );
    assert_eq!(run(fixture, &["wait", &id]).status.code(), Some(0));
    let whole = numbered(1, 60000);
    let output = run(fixture, &["attach", &id]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let (head, ring) = (64 * 1024, 256 * 1024);
    let lost = whole.len() - head - ring;
    assert_eq!(
        stderr(&output),
        format!(
            "ferry: stdout: {lost} bytes lost at offsets {head}..{} (the job's spool no longer \
             held them)\n",
            head + lost
        )
    );
    let mut kept = whole[..head].to_vec();
    kept.extend_from_slice(&whole[whole.len() - ring..]);
    assert!(output.stdout == kept, "the head and the ring, exactly");
    clean_up(fixture, &[id]);
}

pub fn wait_exits_with_the_jobs_status(fixture: &Fixture) {
    let code = detach(fixture, &["--", "sh", "-c", "sleep 0.3; exit 7"]);
    let signal = detach(fixture, &["--", "sh", "-c", "sleep 0.3; kill -TERM $$"]);
    let timeout = detach(fixture, &["--timeout", "300ms", "--", "sleep", "30"]);
    assert_eq!(run(fixture, &["wait", &code]).status.code(), Some(7));
    assert_eq!(run(fixture, &["wait", &signal]).status.code(), Some(143));
    let timed_out = run(fixture, &["wait", &timeout]);
    assert_eq!(timed_out.status.code(), Some(124), "{}", stderr(&timed_out));
    let status = fixture.client().job(signal.as_str()).wait().unwrap().status;
    assert_eq!(
        status,
        ExitStatus::Signal {
            number: 15,
            core_dumped: false
        }
    );
    clean_up(fixture, &[code, signal, timeout]);
}

pub fn kill_ends_a_jobs_tree_setsid_escapees_included(fixture: &Fixture) {
    const SCENARIO: &str = "kill_ends_a_jobs_tree_setsid_escapees_included";
    if !in_guest(fixture, SCENARIO) {
        return;
    }
    let client = fixture.client();
    let id = detach(
        fixture,
        &[
            "--",
            "sh",
            "-c",
            "setsid sleep 100789 & sleep 100789 & exec sleep 100789",
        ],
    );
    until_running(&client, "100789", 3);
    let started = Instant::now();
    let killed = run(fixture, &["kill", &id]);
    assert_eq!(killed.status.code(), Some(0), "{}", stderr(&killed));
    assert_eq!(run(fixture, &["wait", &id]).status.code(), Some(143));
    let gone = until_gone(&client, "100789", Duration::from_secs(5))
        .unwrap_or_else(|left| panic!("left 5 s after the kill: {left:?}"));
    say(&format!(
        "{SCENARIO}: every process gone {gone:.2?} after the kill ({:.2?} since it was sent)",
        started.elapsed()
    ));
    let ended = run(fixture, &["kill", &id]);
    assert_eq!(ended.status.code(), Some(255));
    assert!(stderr(&ended).contains("has ended"), "{}", stderr(&ended));
    clean_up(fixture, &[id]);
}

pub fn sixty_four_jobs_run_and_the_sixty_fifth_is_refused(fixture: &Fixture) {
    let ids: Vec<String> = (0..64)
        .map(|_| detach(fixture, &["--", "sleep", "100654"]))
        .collect();
    let refused = run(fixture, &["exec", "--detach", "--", "sleep", "100654"]);
    assert!(refused.stdout.is_empty(), "no id for a refused job");
    assert_eq!(refused.status.code(), Some(255));
    assert_eq!(stderr(&refused).lines().count(), 1, "{}", stderr(&refused));
    assert!(stderr(&refused).contains("busy"), "{}", stderr(&refused));

    let listed = run(fixture, &["jobs", "--json"]);
    assert_eq!(listed.status.code(), Some(0), "{}", stderr(&listed));
    let json = parse(std::str::from_utf8(&listed.stdout).unwrap());
    let running: Vec<String> = json
        .get("jobs")
        .list()
        .iter()
        .filter(|job| job.get("state").text() == "running")
        .map(|job| {
            assert!(job.get("termination").is_null());
            assert_eq!(job.get("argv").list()[0], Json::Text("sleep".into()));
            (job.get("id").num() as u64).to_string()
        })
        .collect();
    assert_eq!(running, ids);
    clean_up(fixture, &ids);
}
