//! Detached jobs against the shipped agent on its Unix socket, driven by `ferry_wire`'s client
//! session directly (the agent's side: the supervisor, its runners, spools and attachers).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::Agent;
use ferry_wire::{
    Bytes, ErrorCode, ExitStatus, JobQuery, JobRequest, JobState, KillJob, StdinMode,
};

use common::jobs::*;

fn attach(agent: &Agent, job: &str) -> Vec<Said> {
    attach_with(agent, job, (0, 0), true, false).all()
}

fn remove(agent: &Agent, job: &str) -> Vec<Said> {
    let request = JobRequest {
        job: Bytes(job.as_bytes()),
        user: None,
    };
    simple(agent, |s, out| s.start_remove(&request, out).unwrap())
}

fn list(agent: &Agent) -> Vec<Said> {
    let query = JobQuery { user: None };
    simple(agent, |s, out| s.start_jobs(&query, out).unwrap())
}

fn refused(said: &[Said]) -> ErrorCode {
    match said {
        [Said::Refused(code, _)] => *code,
        other => panic!("not refused: {other:?}"),
    }
}

#[test]
fn a_detached_job_is_attached_mid_run_byte_for_byte() {
    let agent = insecure(&[]);
    // Enough output to cross several records, on both streams, over a while.
    let script = "i=0; while [ $i -lt 40 ]; do seq $((i*100)) $((i*100+99)); echo e$i >&2; i=$((i+1)); sleep 0.02; done; exit 3";
    let id = start_job(&agent, Some("build"), &exec(&sh(script))).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Mid-run, from another connection, by name.
    let said = attach(&agent, "build");
    let Said::Attached(header) = said[0] else {
        panic!("{said:?}")
    };
    assert_eq!(header.id, id);
    assert!(header.running, "attached mid-run");
    assert_eq!((header.stdout.from, header.stdout.lost), (0, 0));
    let expected: Vec<u8> = (0..4000)
        .flat_map(|n| format!("{n}\n").into_bytes())
        .collect();
    assert_eq!(stream(&said, 0), expected);
    let errors: Vec<u8> = (0..40)
        .flat_map(|n| format!("e{n}\n").into_bytes())
        .collect();
    assert_eq!(stream(&said, 1), errors);
    assert_eq!(exited(&said).status, ExitStatus::Code(3));
    // Wait returns the status; attach again from an offset: the rest exactly.
    assert_eq!(
        exited(&wait(&agent, &id.to_string())).status,
        ExitStatus::Code(3)
    );
    let said = attach_with(&agent, "build", (100, 5), true, false).all();
    assert_eq!(stream(&said, 0), expected[100..]);
    assert_eq!(stream(&said, 1), errors[5..]);
}

#[test]
fn a_spool_smaller_than_the_output_reports_the_loss_exactly() {
    let agent = insecure(&[
        "--set",
        "job_spool_head=1000",
        "--set",
        "job_spool_ring=3000",
    ]);
    let id = start_job(&agent, None, &exec(&sh("seq 1 20000"))).unwrap();
    let end = exited(&wait(&agent, &id.to_string()));
    let all: Vec<u8> = (1..=20000)
        .flat_map(|n| format!("{n}\n").into_bytes())
        .collect();
    let total = all.len() as u64;
    assert_eq!(end.stdout.bytes, total);
    let said = attach(&agent, &id.to_string());
    let Said::Attached(header) = said[0] else {
        panic!("{said:?}")
    };
    assert_eq!(header.stdout, ferry_wire::Resume { from: 0, lost: 0 });
    let lost = total - 3000 - 1000;
    // The head, the loss at its end, the ring.
    assert!(said.contains(&Said::Dropped(0, lost)), "{:?}", &said[..3]);
    let mut expected = all[..1000].to_vec();
    expected.extend_from_slice(&all[(total - 3000) as usize..]);
    assert_eq!(stream(&said, 0), expected);
    // From inside the lost part: the header says where it resumes and how much is lost.
    let said = attach_with(&agent, &id.to_string(), (2000, 0), false, false).all();
    let Said::Attached(header) = said[0] else {
        panic!("{said:?}")
    };
    assert_eq!(header.stdout.from, total - 3000);
    assert_eq!(header.stdout.lost, total - 3000 - 2000);
    assert_eq!(stream(&said, 0), all[(total - 3000) as usize..]);
}

#[test]
fn the_registry_is_bounded_and_listed() {
    let agent = insecure(&["--set", "max_jobs=4"]);
    let sleeper = exec(b"/bin/sleep\x0030\x00");
    for _ in 0..4 {
        start_job(&agent, None, &sleeper).unwrap();
    }
    let (code, message) = start_job(&agent, None, &sleeper).unwrap_err();
    assert_eq!(code, ErrorCode::Busy, "{message}");
    let said = list(&agent);
    assert_eq!(said.len(), 5, "{said:?}");
    assert_eq!(said[4], Said::Done(4));
    assert!(said[..4].iter().all(|s| matches!(s, Said::Job { state: JobState::Running, argv, .. } if argv == b"/bin/sleep\x0030\x00")));
    // A finished job makes room: the oldest finished is evicted for a new one.
    assert_eq!(kill(&agent, "1"), [Said::Done(0)]);
    assert!(matches!(
        exited(&wait(&agent, "1")).status,
        ExitStatus::Signal { number: 15, .. }
    ));
    let said = list(&agent);
    assert!(
        matches!(
            &said[0],
            Said::Job {
                id: 1,
                state: JobState::Killed,
                ..
            }
        ),
        "{said:?}"
    );
    let id = start_job(&agent, None, &sleeper).unwrap();
    assert_eq!(id, 5);
    let ids: Vec<u32> = list(&agent)
        .iter()
        .filter_map(|s| match s {
            Said::Job { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(ids, [2, 3, 4, 5]);
    for id in ids {
        assert_eq!(kill(&agent, &id.to_string()), [Said::Done(0)]);
    }
}

#[test]
fn sixty_four_jobs_run_and_the_sixty_fifth_is_busy() {
    let agent = insecure(&[]);
    let sleeper = exec(b"/bin/sleep\x0030\x00");
    for _ in 0..64 {
        start_job(&agent, None, &sleeper).unwrap();
    }
    let (code, _) = start_job(&agent, None, &sleeper).unwrap_err();
    assert_eq!(code, ErrorCode::Busy);
    let said = list(&agent);
    assert_eq!(said.last(), Some(&Said::Done(64)));
}

#[test]
fn edges_have_defined_answers() {
    let agent = insecure(&[]);
    // An unknown id, a name never given.
    assert_eq!(refused(&attach(&agent, "99")), ErrorCode::NoSuchJob);
    assert_eq!(refused(&wait(&agent, "nope")), ErrorCode::NoSuchJob);
    // A start that fails: the exec's error, no id, nothing left in the registry.
    let (code, _) = start_job(&agent, Some("bad"), &exec(b"/nonexistent/program\0")).unwrap_err();
    assert_eq!(code, ErrorCode::NotFound);
    assert_eq!(list(&agent), [Said::Done(0)]);
    // A name in use.
    let id = start_job(&agent, Some("srv"), &exec(&sh("sleep 30"))).unwrap();
    let (code, _) = start_job(&agent, Some("srv"), &exec(b"/bin/true\0")).unwrap_err();
    assert_eq!(code, ErrorCode::AlreadyExists);
    // Remove of a running job; kill; kill of an ended one; remove; then it is unknown.
    assert_eq!(refused(&remove(&agent, "srv")), ErrorCode::JobRunning);
    assert_eq!(kill(&agent, "srv"), [Said::Done(0)]);
    let end = exited(&wait(&agent, &id.to_string()));
    assert_eq!(end.ending, ferry_wire::Ending::Cancelled);
    assert_eq!(refused(&kill(&agent, "srv")), ErrorCode::JobEnded);
    assert_eq!(remove(&agent, "srv"), [Said::Done(0)]);
    assert_eq!(
        refused(&attach(&agent, &id.to_string())),
        ErrorCode::NoSuchJob
    );
    // Without follow, a running job's retained output, then Done.
    start_job(&agent, Some("talk"), &exec(&sh("echo early; sleep 30"))).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let said = attach_with(&agent, "talk", (0, 0), false, false).all();
    assert_eq!(stream(&said, 0), b"early\n");
    assert_eq!(said.last(), Some(&Said::Done(0)));
    assert_eq!(kill(&agent, "talk"), [Said::Done(0)]);
}

#[test]
fn kill_ends_the_whole_tree_setsid_escapees_included() {
    let agent = insecure(&[]);
    let dir = common::fresh_dir("ferry-jobs-tree");
    let pidfile = dir.join("escapee");
    let script = format!(
        "setsid sh -c 'echo $$ > {}; exec sleep 60' & sleep 60",
        pidfile.display()
    );
    let id = start_job(&agent, None, &exec(&sh(&script))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(&pidfile).map_or(true, |s| s.trim().is_empty()) {
        assert!(Instant::now() < deadline, "the escapee did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let escapee: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(kill(&agent, &id.to_string()), [Said::Done(0)]);
    let end = exited(&wait(&agent, &id.to_string()));
    let gone = |pid: i32| {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat.is_empty() || stat.contains(") Z") {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // The job's own group is always gone; the escapee too when a cgroup held the tree (in
    // QEMU). Without one (here) the record says the process group was killed, which a setsid
    // leaves: the test cleans up after it.
    if end.tree_kill == ferry_wire::TreeKill::Cgroup {
        assert!(gone(escapee), "the setsid escapee survived the kill");
    } else {
        assert_eq!(end.tree_kill, ferry_wire::TreeKill::ProcessGroup);
        unsafe_kill(escapee as u32);
    }
}

#[test]
fn two_attachers_both_get_the_output_and_stdin_goes_to_the_first() {
    let agent = insecure(&[]);
    let argv = sh("while read line; do echo got $line; done; echo end");
    let mut request = exec(&argv);
    request.stdin = StdinMode::Pipe;
    let id = start_job(&agent, Some("cat"), &request).unwrap();
    let mut first = attach_with(&agent, "cat", (0, 0), true, true);
    let Some(Said::Attached(header)) = first.next() else {
        panic!()
    };
    assert!(header.stdin && header.running);
    let mut second = attach_with(&agent, &id.to_string(), (0, 0), true, true);
    let Some(Said::Attached(header)) = second.next() else {
        panic!()
    };
    assert!(!header.stdin, "stdin belongs to the first attacher");
    first.send_stdin(b"one\ntwo\n");
    first.close_stdin();
    let a = first.all();
    let b = second.all();
    assert_eq!(stream(&a, 0), b"got one\ngot two\nend\n");
    assert_eq!(stream(&b, 0), b"got one\ngot two\nend\n");
    assert_eq!(exited(&a).status, ExitStatus::Code(0));
    assert_eq!(exited(&b).status, ExitStatus::Code(0));
}

#[test]
fn a_job_of_another_user_is_refused_unless_the_policy_allows() {
    // The requests name a user the policy allows; its jobs are its own.
    let agent = insecure(&["--allow-users", "*"]);
    let mut request = exec(b"/bin/sleep\x0030\x00");
    request.user = Some(Bytes(b"1234"));
    let id = start_job(&agent, None, &request).unwrap();
    let name = id.to_string();
    let as_user = |user: &'static [u8]| {
        let kill = KillJob {
            job: Bytes(name.as_bytes()),
            user: Some(Bytes(user)),
            signal: 15,
            grace_ms: None,
        };
        simple(&agent, |s, out| s.start_kill(&kill, out).unwrap())
    };
    assert_eq!(refused(&as_user(b"4321")), ErrorCode::PermissionDenied);
    let query = JobQuery {
        user: Some(Bytes(b"4321")),
    };
    assert_eq!(
        simple(&agent, |s, out| s.start_jobs(&query, out).unwrap()),
        [Said::Done(0)]
    );
    // Its own user may; root sees all.
    assert_eq!(as_user(b"1234"), [Said::Done(0)]);
    exited(&wait(&agent, &name));
    drop(agent);
    let agent = insecure(&["--allow-users", "*", "--set", "jobs_any_user=true"]);
    let id = start_job(&agent, None, &request).unwrap();
    let name = id.to_string();
    let kill = KillJob {
        job: Bytes(name.as_bytes()),
        user: Some(Bytes(b"4321")),
        signal: 0,
        grace_ms: None,
    };
    assert_eq!(
        simple(&agent, |s, out| s.start_kill(&kill, out).unwrap()),
        [Said::Done(0)]
    );
}

/// The agent's jobs' supervisor, waited for (it may just have been forked again).
#[test]
fn a_killed_supervisor_ends_its_jobs_and_a_new_one_serves() {
    let agent = insecure(&[]);
    let id = start_job(&agent, None, &exec(&sh("sleep 60"))).unwrap();
    assert_eq!(id, 1);
    let supervisor = supervisor(&agent);
    let runners = common::all_children(supervisor);
    assert_eq!(runners.len(), 1, "one runner");
    let sleep_group = common::all_children(runners[0]);
    assert_eq!(sleep_group.len(), 1);
    unsafe_kill(supervisor);
    // The runner sees its client gone and kills its command's tree.
    common::wait_group_gone(sleep_group[0], Duration::from_secs(5)).unwrap();
    // A new supervisor, empty, serves new jobs.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match start_job(&agent, None, &exec(b"/bin/true\0")) {
            Ok(id) => {
                assert_eq!(id, 1, "a new registry");
                break;
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(other) => panic!("{other:?}"),
        }
    }
    assert_eq!(exited(&wait(&agent, "1")).status, ExitStatus::Code(0));
}

#[test]
fn a_killed_runner_leaves_its_job_lost() {
    let agent = insecure(&[]);
    let id = start_job(&agent, None, &exec(&sh("sleep 60"))).unwrap();
    let supervisor = supervisor(&agent);
    let runner = common::all_children(supervisor)[0];
    unsafe_kill(runner);
    let said = wait(&agent, &id.to_string());
    assert_eq!(refused(&said), ErrorCode::Internal);
    let said = list(&agent);
    assert!(
        matches!(
            &said[0],
            Said::Job {
                state: JobState::Lost,
                ..
            }
        ),
        "{said:?}"
    );
}

#[test]
fn an_attacher_that_stops_reading_blocks_nobody() {
    let agent = insecure(&[]);
    let id = start_job(
        &agent,
        None,
        &exec(&sh(
            "i=0; while [ $i -lt 400 ]; do head -c 10000 /dev/zero; i=$((i+1)); done; echo done",
        )),
    )
    .unwrap();
    // This one never reads.
    let _stuck = attach_with(&agent, &id.to_string(), (0, 0), true, false);
    let said = attach(&agent, &id.to_string());
    assert_eq!(exited(&said).status, ExitStatus::Code(0));
    // What it did not get, it was told of: every byte is accounted for.
    let dropped: u64 = said
        .iter()
        .map(|s| match s {
            Said::Dropped(0, n) => *n,
            _ => 0,
        })
        .sum();
    assert_eq!(stream(&said, 0).len() as u64 + dropped, 4_000_005);
    assert_eq!(
        exited(&wait(&agent, &id.to_string())).status,
        ExitStatus::Code(0)
    );
    assert_eq!(list(&agent).len(), 2);
}

fn unsafe_kill(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// An ended job's replay longer than one turn of the supervisor (eight records) comes whole,
/// with nothing else to wake it (it once waited for another event).
#[test]
fn a_long_replay_of_an_ended_job_ends() {
    let agent = insecure(&[]);
    let id = start_job(&agent, None, &exec(&sh("head -c 1000000 /dev/zero"))).unwrap();
    exited(&wait(&agent, &id.to_string()));
    let started = Instant::now();
    let said = attach(&agent, &id.to_string());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(exited(&said).status, ExitStatus::Code(0));
    let kept = 64 * 1024 + 256 * 1024;
    assert_eq!(stream(&said, 0).len(), kept);
    assert!(said.contains(&Said::Dropped(0, 1_000_000 - kept as u64)));
}
