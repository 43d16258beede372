//! Detached jobs (protocol 5), session against session: a job's start, a listing, an
//! attachment, a wait, a kill and a removal, each run through, and each rule broken once.

use super::tests::edges::{agent, client_frame, client_with, feed_agent, opening, secret, EXEC};
use super::*;
use crate::jobs::*;
use crate::limits::*;
use crate::msg::*;
use crate::ops::Timestamp;
use crate::{Bytes, DataKind, DATA_HEADROOM};

/// A client and an agent session; what each side's driver was handed, as text.
struct Pair {
    client: ClientSession,
    agent: AgentSession,
    got: Vec<String>,
    heard: Vec<String>,
}

impl Pair {
    fn new() -> Pair {
        let mut pair = Pair {
            client: client_with(Some(secret())),
            agent: agent(),
            got: Vec::new(),
            heard: Vec::new(),
        };
        pair.deliver_to_client().unwrap();
        pair
    }

    fn deliver_to_agent(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        let mut rest = bytes;
        while !rest.is_empty() {
            let input = self.agent.handle_input(rest, 0)?;
            assert!(input.consumed > 0, "bytes end mid-frame");
            match input.event {
                None | Some(AgentEvent::Hello | AgentEvent::Authenticated) => {}
                Some(event) => self.got.push(got(&event)),
            }
            rest = &rest[input.consumed..];
        }
        Ok(())
    }

    fn deliver_to_client(&mut self) -> Result<(), SessionError> {
        let mut out = vec![0u8; MAX_FRAME * 2];
        let n = self.agent.poll_transmit(&mut out).unwrap();
        self.bytes_to_client(&out[..n])
    }

    fn bytes_to_client(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        let mut rest = bytes;
        while !rest.is_empty() {
            let input = self.client.handle_input_at(rest, 0)?;
            assert!(input.consumed > 0, "bytes end mid-frame");
            match input.event {
                None | Some(ClientEvent::HelloAccepted(_) | ClientEvent::Authenticated) => {}
                Some(event) => self.heard.push(heard(&event)),
            }
            rest = &rest[input.consumed..];
        }
        Ok(())
    }

    fn start(
        &mut self,
        start: impl FnOnce(&mut ClientSession, &mut [u8]) -> Result<usize, SessionError>,
    ) -> Result<(), SessionError> {
        let mut out = vec![0u8; MAX_FRAME * 2];
        let n = start(&mut self.client, &mut out)?;
        self.deliver_to_agent(&out[..n])?;
        self.deliver_to_client()
    }

    /// The agent frames `data` as the job's stdout, to the client.
    fn output(&mut self, data: &[u8]) -> Result<(), SessionError> {
        let mut buf = vec![0u8; DATA_HEADROOM + data.len()];
        buf[DATA_HEADROOM..].copy_from_slice(data);
        let start = self
            .agent
            .frame_output(&mut buf, DataKind::Stdout, data.len(), 2_000)?;
        self.bytes_to_client(&buf[start..])
    }
}

fn got(event: &AgentEvent<'_>) -> String {
    match event {
        AgentEvent::StartJob(start) => format!("start {:?}", start.name.map(|n| n.0.to_vec())),
        AgentEvent::Exec(valid) => format!("exec job={}", valid.request().argv.len()),
        AgentEvent::Jobs(query) => format!("jobs {:?}", query.user.map(|u| u.0.to_vec())),
        AgentEvent::Attach(request) => format!(
            "attach {} {} {} follow={} stdin={}",
            String::from_utf8_lossy(request.job.0),
            request.since_stdout,
            request.since_stderr,
            request.follow,
            request.stdin
        ),
        AgentEvent::Wait(request) => format!("wait {}", String::from_utf8_lossy(request.job.0)),
        AgentEvent::Kill(kill) => format!(
            "kill {} {} {:?}",
            String::from_utf8_lossy(kill.job.0),
            kill.signal,
            kill.grace_ms
        ),
        AgentEvent::Remove(request) => {
            format!("remove {}", String::from_utf8_lossy(request.job.0))
        }
        AgentEvent::Stdin(data) => format!("stdin {}", String::from_utf8_lossy(data)),
        AgentEvent::StdinEof => "stdin eof".into(),
        AgentEvent::Signal(number) => format!("signal {number}"),
        other => format!("{other:?}"),
    }
}

fn heard(event: &ClientEvent<'_>) -> String {
    match event {
        ClientEvent::Detached(job) => format!("detached {} {}", job.id, job.pid),
        ClientEvent::Job(job) => format!("job {} {:?}", job.id, job.state),
        ClientEvent::Attached(header) => format!(
            "attached {} from {} lost {} stdin={}",
            header.id, header.stderr.from, header.stderr.lost, header.stdin
        ),
        ClientEvent::Stdout(data) => format!("stdout {}", String::from_utf8_lossy(data)),
        ClientEvent::OutputDropped(dropped) => format!("gap {}", dropped.bytes),
        ClientEvent::StdinCredit { available } => format!("credit {available}"),
        ClientEvent::Exited(end) => format!("exited {:?}", end.status),
        ClientEvent::Done(report) => format!("done {}", report.count),
        ClientEvent::Refused(err) => format!("refused {:?}", err.code),
        other => format!("{other:?}"),
    }
}

fn end(code: u8) -> Termination {
    Termination {
        status: ExitStatus::Code(code),
        duration_us: 5,
        output_dropped: false,
        ending: Ending::Exited,
        tree_kill: TreeKill::None,
        stdout: StreamRecord::default(),
        stderr: StreamRecord::default(),
        pipes_held: false,
        oom_killed: false,
        peak_memory: 0,
    }
}

const RECORD: JobRecord<'static> = JobRecord {
    id: 3,
    name: None,
    argv: StrList::new(b"sleep\x009\0"),
    uid: 0,
    gid: 0,
    pid: 9,
    state: JobState::Running,
    started: Timestamp { secs: 1, nanos: 0 },
    duration_us: 0,
    stdout_bytes: 0,
    stderr_bytes: 0,
    termination: None,
};

fn job_ref(job: &[u8]) -> JobRequest<'_> {
    JobRequest {
        job: Bytes(job),
        user: None,
    }
}

fn attach_request(job: &[u8], stdin: bool) -> AttachRequest<'_> {
    AttachRequest {
        job: Bytes(job),
        user: None,
        since_stdout: 0,
        since_stderr: 7,
        follow: true,
        stdin,
    }
}

#[test]
fn a_job_starts_detached_and_its_starter_sends_no_stdin() {
    let mut pair = Pair::new();
    pair.start(|client, out| client.start_job(Some(b"web"), &EXEC, out))
        .unwrap();
    assert_eq!(pair.got, ["start Some([119, 101, 98])", "exec job=1"]);
    assert!(pair.agent.is_job());
    assert!(!pair.agent.stdin_open(), "the job's stdin is an attacher's");
    assert!(!pair.client.stdin_open());
    pair.agent
        .detached(JobStarted { id: 3, pid: 40 }, 0)
        .unwrap();
    pair.deliver_to_client().unwrap();
    assert_eq!(pair.heard, ["detached 3 40"]);
    assert!(pair.client.is_finished());
    // A started-record is for an attached exec only.
    assert_eq!(pair.agent.started(1, 0), Err(SessionError::InvalidState));
}

#[test]
fn a_job_needs_a_valid_name_and_a_request_in_one_frame() {
    let mut client = Pair::new().client;
    let mut out = vec![0u8; MAX_FRAME * 4];
    let request = EXEC;
    for bad in [&b"123"[..], b"-x", b"", b"a b", &[b'a'; MAX_JOB_NAME + 1]] {
        assert!(
            matches!(
                client.start_job(Some(bad), &request, &mut out),
                Err(SessionError::InvalidRequest { .. })
            ),
            "{bad:?}"
        );
    }
    let big = vec![b'a'; MAX_INLINE_LIST + 1];
    let mut argv = big.clone();
    argv.push(0);
    let request = ExecRequest {
        argv: StrList::new(&argv),
        ..EXEC
    };
    assert_eq!(
        client.start_job(None, &request, &mut out),
        Err(SessionError::InvalidRequest {
            message: "a job's request must fit in one exec frame"
        })
    );
    // The agent holds the same rule against a client that sends pieces anyway.
    let mut agent = agent();
    let piece = ClientFrame::ExecPart(ExecPart {
        list: ListKind::Argv,
        data: Bytes(b"a"),
    });
    let bytes = [
        opening().client,
        client_frame(ClientFrame::StartJob(JobStart { name: None })),
        client_frame(piece),
    ]
    .concat();
    assert_eq!(
        feed_agent(&mut agent, &bytes),
        Err(SessionError::InvalidRequest {
            message: "a job's request must fit in one exec frame"
        })
    );
}

#[test]
fn a_listing_counts_its_records() {
    let mut pair = Pair::new();
    pair.start(|client, out| client.start_jobs(&JobQuery { user: None }, out))
        .unwrap();
    assert_eq!(pair.got, ["jobs None"]);
    let mut out = vec![0u8; MAX_FRAME];
    for _ in 0..2 {
        let n = pair.agent.encode_job(&RECORD, &mut out).unwrap();
        pair.bytes_to_client(&out[..n]).unwrap();
    }
    // Whatever the driver says, the count is the records encoded.
    pair.agent.done(99, 0).unwrap();
    pair.deliver_to_client().unwrap();
    assert_eq!(pair.heard, ["job 3 Running", "job 3 Running", "done 2"]);
    assert!(pair.client.is_finished());
}

#[test]
fn a_client_refuses_a_listing_whose_count_is_wrong() {
    let mut pair = Pair::new();
    pair.start(|client, out| client.start_jobs(&JobQuery { user: None }, out))
        .unwrap();
    let mut out = vec![0u8; MAX_FRAME];
    let n =
        crate::encode_agent_frame(&AgentFrame::Done(DoneReport { count: 1 }), &mut out).unwrap();
    assert!(matches!(
        pair.bytes_to_client(&out[..n]),
        Err(SessionError::InvalidRequest { .. })
    ));
}

#[test]
fn at_most_max_jobs_records() {
    let mut pair = Pair::new();
    pair.start(|client, out| client.start_jobs(&JobQuery { user: None }, out))
        .unwrap();
    let mut out = vec![0u8; MAX_FRAME];
    for _ in 0..MAX_JOBS {
        let n = pair.agent.encode_job(&RECORD, &mut out).unwrap();
        pair.bytes_to_client(&out[..n]).unwrap();
    }
    assert_eq!(
        pair.agent.encode_job(&RECORD, &mut out),
        Err(SessionError::InvalidState)
    );
    let n = crate::encode_agent_frame(&AgentFrame::Job(RECORD), &mut out).unwrap();
    assert!(pair.bytes_to_client(&out[..n]).is_err(), "one too many");
}

#[test]
fn an_attachment_streams_relays_stdin_and_ends_with_the_record() {
    let mut pair = Pair::new();
    pair.start(|client, out| client.start_attach(&attach_request(b"web", true), out))
        .unwrap();
    assert_eq!(pair.got, ["attach web 0 7 follow=true stdin=true"]);
    let header = AttachHeader {
        id: 3,
        stdout: Resume::default(),
        stderr: Resume { from: 9, lost: 2 },
        stdin: true,
        running: true,
    };
    pair.agent.attached(header, 0, 1_000).unwrap();
    pair.deliver_to_client().unwrap();
    pair.output(b"hi").unwrap();
    let mut out = vec![0u8; MAX_FRAME];
    let n = pair
        .agent
        .encode_output_dropped(Stream::Stdout, 10, &mut out)
        .unwrap();
    pair.bytes_to_client(&out[..n]).unwrap();
    // Stdin within credit, and a signal, go to the job.
    let sent = pair.client.send_stdin(b"in", &mut out).unwrap();
    pair.deliver_to_agent(&out[..sent.written]).unwrap();
    let n = pair.client.send_signal(15, &mut out).unwrap();
    pair.deliver_to_agent(&out[..n]).unwrap();
    pair.agent.stdin_consumed(2);
    pair.agent.job_ended(end(3), 3_000).unwrap();
    pair.deliver_to_client().unwrap();
    assert_eq!(
        pair.got[1..],
        ["stdin in".to_string(), "signal 15".to_string()]
    );
    assert_eq!(
        pair.heard,
        [
            "attached 3 from 9 lost 2 stdin=true",
            "stdout hi",
            "gap 10",
            // The two bytes the job took, owed back.
            "credit 131072",
            "exited Code(3)"
        ]
    );
    assert_eq!(
        pair.client.last_output_at(),
        2_000,
        "time since the job started"
    );
    assert!(pair.client.is_finished() && pair.agent.is_closed());
}

#[test]
fn stdin_not_granted_is_refused_and_no_follow_ends_with_done() {
    let mut pair = Pair::new();
    pair.start(|client, out| client.start_attach(&attach_request(b"7", true), out))
        .unwrap();
    let header = AttachHeader {
        id: 7,
        stdout: Resume::default(),
        stderr: Resume::default(),
        stdin: false,
        running: true,
    };
    pair.agent.attached(header, 0, 0).unwrap();
    pair.deliver_to_client().unwrap();
    assert!(!pair.client.stdin_open(), "another attachment holds it");
    let mut out = vec![0u8; MAX_FRAME];
    assert!(pair.client.send_stdin(b"x", &mut out).is_err());
    // A raw stdin frame anyway: a breach.
    let n = crate::encode_client_frame(&ClientFrame::Stdin(Bytes(b"x")), &mut out).unwrap();
    assert!(pair.deliver_to_agent(&out[..n]).is_err());

    let mut pair = Pair::new();
    let request = AttachRequest {
        follow: false,
        ..attach_request(b"7", false)
    };
    pair.start(|client, out| client.start_attach(&request, out))
        .unwrap();
    pair.agent.attached(header, 0, 0).unwrap();
    pair.deliver_to_client().unwrap();
    pair.output(b"old").unwrap();
    pair.agent.done(5, 0).unwrap();
    pair.deliver_to_client().unwrap();
    assert_eq!(
        pair.heard,
        [
            "attached 7 from 0 lost 0 stdin=false",
            "stdout old",
            "done 0"
        ]
    );
    assert!(pair.client.is_finished());
}

#[test]
fn a_wait_keeps_alive_then_ends_with_the_record() {
    let mut pair = Pair::new();
    pair.start(|client, out| client.start_wait(&job_ref(b"12"), out))
        .unwrap();
    assert_eq!(pair.got, ["wait 12"]);
    pair.agent.waiting(0).unwrap();
    let due = pair.agent.poll_timeout().expect("a keepalive is due");
    pair.agent.handle_timeout(due).unwrap();
    pair.deliver_to_client().unwrap();
    assert_eq!(pair.client.phase(), Phase::Starting);
    pair.agent.job_ended(end(0), due).unwrap();
    pair.deliver_to_client().unwrap();
    assert_eq!(pair.heard, ["exited Code(0)"]);
    assert!(pair.client.is_finished());
    // Nothing but the record: output during a wait is refused by both.
    let mut pair = Pair::new();
    pair.start(|client, out| client.start_wait(&job_ref(b"12"), out))
        .unwrap();
    pair.agent.waiting(0).unwrap();
    let mut buf = vec![0u8; DATA_HEADROOM + 1];
    assert_eq!(
        pair.agent.frame_output(&mut buf, DataKind::Stdout, 1, 0),
        Err(SessionError::InvalidState)
    );
}

#[test]
fn kill_and_remove_are_acknowledged_or_refused() {
    for (name, frame) in [("kill", 0), ("remove", 1)] {
        let mut pair = Pair::new();
        let kill = KillJob {
            job: Bytes(b"web"),
            user: Some(Bytes(b"root")),
            signal: 9,
            grace_ms: None,
        };
        if frame == 0 {
            pair.start(|client, out| client.start_kill(&kill, out))
                .unwrap();
        } else {
            pair.start(|client, out| client.start_remove(&job_ref(b"web"), out))
                .unwrap();
        }
        let refusal = agent::Refusal::new(ErrorCode::NoSuchJob, "no such job");
        pair.agent.refuse(refusal, 0).unwrap();
        pair.deliver_to_client().unwrap();
        assert_eq!(pair.heard, ["refused NoSuchJob"], "{name}");
    }
    let mut pair = Pair::new();
    let kill = KillJob {
        job: Bytes(b"3"),
        user: None,
        signal: 0,
        grace_ms: Some(100),
    };
    pair.start(|client, out| client.start_kill(&kill, out))
        .unwrap();
    pair.agent.done(0, 0).unwrap();
    pair.deliver_to_client().unwrap();
    assert_eq!(pair.got, ["kill 3 0 Some(100)"]);
    assert_eq!(pair.heard, ["done 0"]);
}

#[test]
fn job_requests_are_checked_on_both_ends() {
    let mut client = Pair::new().client;
    let mut out = vec![0u8; MAX_FRAME];
    let bad_kill = KillJob {
        job: Bytes(b"3"),
        user: None,
        signal: 65,
        grace_ms: None,
    };
    assert!(client.start_kill(&bad_kill, &mut out).is_err());
    assert!(client.start_wait(&job_ref(b"0"), &mut out).is_err());
    assert!(client.start_remove(&job_ref(b"a/b"), &mut out).is_err());
    assert!(client
        .start_attach(&attach_request(b"", false), &mut out)
        .is_err());
    // The agent refuses them too, from a client that does not check.
    for frame in [
        ClientFrame::Kill(bad_kill),
        ClientFrame::Wait(job_ref(b"99999999999")),
        ClientFrame::StartJob(JobStart {
            name: Some(Bytes(b"12")),
        }),
        ClientFrame::Attach(attach_request(b"-x", false)),
    ] {
        let mut agent = agent();
        let bytes = [opening().client, client_frame(frame)].concat();
        let err = feed_agent(&mut agent, &bytes).unwrap_err();
        assert!(
            matches!(err, SessionError::InvalidRequest { .. }),
            "{frame:?}: {err:?}"
        );
    }
}

#[test]
fn driver_calls_out_of_place_are_refused() {
    let mut pair = Pair::new();
    pair.start(|client, out| client.start_jobs(&JobQuery { user: None }, out))
        .unwrap();
    let header = AttachHeader {
        id: 1,
        stdout: Resume::default(),
        stderr: Resume::default(),
        stdin: false,
        running: true,
    };
    assert_eq!(
        pair.agent.attached(header, 0, 0),
        Err(SessionError::InvalidState)
    );
    assert_eq!(
        pair.agent.detached(JobStarted { id: 1, pid: 1 }, 0),
        Err(SessionError::InvalidState)
    );
    assert_eq!(
        pair.agent.job_ended(end(0), 0),
        Err(SessionError::InvalidState)
    );
    assert_eq!(pair.agent.waiting(0), Err(SessionError::InvalidState));
    // A frame of another operation is refused by the client.
    let mut out = vec![0u8; MAX_FRAME];
    let n = crate::encode_agent_frame(&AgentFrame::Attached(header), &mut out).unwrap();
    assert!(pair.bytes_to_client(&out[..n]).is_err());
}

/// A wait lasts as long as its job, with keepalives: an agent silent for three of their
/// intervals is gone, as during an exec (found while writing the protocol-5 fuzz model: the
/// client kept no liveness deadline for a wait or an attachment, so a vanished agent held it
/// forever).
#[test]
fn a_silent_agent_ends_a_wait_and_an_attachment() {
    let interval = u64::from(Limits::CURRENT.keepalive_ms) * 1000;
    for attach in [false, true] {
        let mut pair = Pair::new();
        if attach {
            pair.start(|client, out| client.start_attach(&attach_request(b"web", false), out))
                .unwrap();
        } else {
            pair.start(|client, out| client.start_wait(&job_ref(b"web"), out))
                .unwrap();
        }
        assert_eq!(pair.client.poll_timeout(), Some(3 * interval), "{attach}");
        assert_eq!(pair.client.handle_timeout(3 * interval - 1), Ok(()));
        assert_eq!(
            pair.client.handle_timeout(3 * interval),
            Err(SessionError::AgentSilent)
        );
        assert!(pair.client.is_finished());
    }
}

/// A wait refused after `waiting` (the supervisor went away) keeps the connection on both
/// ends: the client's wait never left its starting phase, and it sent nothing after it.
#[test]
fn a_refused_wait_keeps_the_connection_on_both_ends() {
    let config = AgentConfig {
        limits: Limits {
            idle_ms: 1_000,
            ..AgentConfig::DEFAULT.limits
        },
        ..AgentConfig::DEFAULT
    };
    let mut pair = Pair {
        client: client_with(Some(secret())),
        agent: super::tests::edges::agent_with(config, Some(secret())),
        got: Vec::new(),
        heard: Vec::new(),
    };
    pair.deliver_to_client().unwrap();
    pair.start(|client, out| client.start_wait(&job_ref(b"12"), out))
        .unwrap();
    pair.agent.waiting(0).unwrap();
    let refusal = agent::Refusal::new(ErrorCode::NoSuchJob, "no such job");
    pair.agent.refuse(refusal, 0).unwrap();
    pair.deliver_to_client().unwrap();
    assert_eq!(pair.heard, ["refused NoSuchJob"]);
    assert!(pair.agent.can_continue(), "the agent keeps it");
    assert!(pair.client.is_reusable(), "and so does the client");
}
