//! The detached-jobs harness of `jobs_agent.rs` and `jobs_hostile.rs`: a raw `ClientSession`
//! conversation with the shipped agent, and what it said, owned.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::Agent;
use ferry_wire::session::{ClientAuth, ClientEvent, ClientSession};
use ferry_wire::{
    AttachHeader, AttachRequest, Bytes, ErrorCode, ExecRequest, JobRequest, JobState, KillJob,
    RecvBuf, StdinMode, StrList, Termination,
};

/// What one conversation said, owned.
#[derive(Debug, Clone, PartialEq)]
pub enum Said {
    Detached {
        id: u32,
        pid: u32,
    },
    Job {
        id: u32,
        name: Option<String>,
        argv: Vec<u8>,
        state: JobState,
        uid: u32,
        bytes: (u64, u64),
    },
    Done(u32),
    Attached(AttachHeader),
    Output(u8, Vec<u8>),
    Dropped(u8, u64),
    Credit,
    Exited(Termination),
    Refused(ErrorCode, String),
}

/// One connection: the handshake, `start` (the operation, given stdin to send after it), then
/// every event until the last; `feed` may write more once attached.
pub struct Conversation {
    pub sock: UnixStream,
    pub session: ClientSession,
    pub recv: RecvBuf<Vec<u8>>,
}

impl Conversation {
    pub fn open(agent: &Agent) -> Conversation {
        let sock = UnixStream::connect(&agent.socket).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let auth = ClientAuth {
            nonce: [7; ferry_wire::limits::NONCE_LEN],
            secret: None,
        };
        let mut conversation = Conversation {
            sock,
            session: ClientSession::new(0, None, auth),
            recv: RecvBuf::new(vec![0u8; ferry_wire::limits::MAX_FRAME * 2]),
        };
        // The agent speaks first.
        loop {
            conversation.fill();
            let input = conversation
                .session
                .handle_input(conversation.recv.data())
                .unwrap();
            let consumed = input.consumed;
            let hello = matches!(input.event, Some(ClientEvent::HelloAccepted(_)));
            conversation.recv.consume(consumed);
            if hello {
                return conversation;
            }
        }
    }

    pub fn fill(&mut self) -> bool {
        let spare = self.recv.spare().unwrap();
        let n = self.sock.read(spare).unwrap_or(0);
        self.recv.commit(n);
        n > 0
    }

    pub fn start(&mut self, op: impl FnOnce(&mut ClientSession, &mut [u8]) -> usize) {
        let mut out = vec![0u8; ferry_wire::limits::MAX_FRAME * 2];
        let n = op(&mut self.session, &mut out);
        self.sock.write_all(&out[..n]).unwrap();
    }

    /// The next event (`None` at the end of the conversation).
    pub fn next(&mut self) -> Option<Said> {
        loop {
            let input = match self.session.handle_input(self.recv.data()) {
                Ok(input) => input,
                Err(_) => return None,
            };
            let consumed = input.consumed;
            let said = match input.event {
                None if consumed == 0 => {
                    if !self.fill() {
                        return None;
                    }
                    continue;
                }
                None => None,
                Some(event) => said(event),
            };
            self.recv.consume(consumed);
            if let Some(said) = said {
                return Some(said);
            }
        }
    }

    pub fn all(&mut self) -> Vec<Said> {
        let mut all = Vec::new();
        while let Some(said) = self.next() {
            let last = matches!(
                said,
                Said::Exited(_) | Said::Refused(..) | Said::Done(_) | Said::Detached { .. }
            );
            all.push(said);
            if last {
                break;
            }
        }
        all
    }

    pub fn send_stdin(&mut self, data: &[u8]) {
        let mut out = vec![0u8; data.len() + 64];
        let sent = self.session.send_stdin(data, &mut out).unwrap();
        assert_eq!(sent.taken, data.len());
        self.sock.write_all(&out[..sent.written]).unwrap();
    }

    pub fn close_stdin(&mut self) {
        self.session.close_stdin().unwrap();
        let mut out = [0u8; 64];
        let n = self.session.poll_transmit(&mut out).unwrap();
        self.sock.write_all(&out[..n]).unwrap();
    }
}

pub fn said(event: ClientEvent<'_>) -> Option<Said> {
    Some(match event {
        ClientEvent::Detached(started) => Said::Detached {
            id: started.id,
            pid: started.pid,
        },
        ClientEvent::Job(job) => Said::Job {
            id: job.id,
            name: job.name.map(|n| String::from_utf8_lossy(n.0).into_owned()),
            argv: job.argv.as_bytes().to_vec(),
            state: job.state,
            uid: job.uid,
            bytes: (job.stdout_bytes, job.stderr_bytes),
        },
        ClientEvent::Done(done) => Said::Done(done.count),
        ClientEvent::Attached(header) => Said::Attached(header),
        ClientEvent::Stdout(data) => Said::Output(0, data.to_vec()),
        ClientEvent::Stderr(data) => Said::Output(1, data.to_vec()),
        ClientEvent::OutputDropped(dropped) => Said::Dropped(dropped.stream as u8, dropped.bytes),
        ClientEvent::StdinCredit { .. } => Said::Credit,
        ClientEvent::Exited(t) => Said::Exited(t),
        ClientEvent::Refused(error) => Said::Refused(error.code, error.message.to_owned()),
        _ => return None,
    })
}

pub fn exec(argv: &[u8]) -> ExecRequest<'_> {
    ExecRequest {
        argv: StrList::new(argv),
        env: StrList::default(),
        clean_env: false,
        cwd: None,
        stdin: StdinMode::Null,
        user: None,
        pty: None,
        timeout_ms: 0,
        kill_grace_ms: Some(200),
        kill_tree_on_exit: false,
        max_output: 0,
    }
}

pub fn insecure(extra: &[&str]) -> Agent {
    let mut args = vec!["--insecure"];
    args.extend_from_slice(extra);
    Agent::start_with(&args)
}

/// Starts a detached job: its id, or what refused it.
pub fn start_job(
    agent: &Agent,
    name: Option<&str>,
    request: &ExecRequest<'_>,
) -> Result<u32, (ErrorCode, String)> {
    let mut c = Conversation::open(agent);
    c.start(|s, out| s.start_job(name.map(str::as_bytes), request, out).unwrap());
    match c.all().as_slice() {
        [Said::Detached { id, .. }] => Ok(*id),
        [Said::Refused(code, message)] => Err((*code, message.clone())),
        other => panic!("start: {other:?}"),
    }
}

pub fn sh(script: &str) -> Vec<u8> {
    format!("/bin/sh\0-c\0{script}\0").into_bytes()
}

pub fn attach_with(
    agent: &Agent,
    job: &str,
    since: (u64, u64),
    follow: bool,
    stdin: bool,
) -> Conversation {
    let mut c = Conversation::open(agent);
    let request = AttachRequest {
        job: Bytes(job.as_bytes()),
        user: None,
        since_stdout: since.0,
        since_stderr: since.1,
        follow,
        stdin,
    };
    c.start(|s, out| s.start_attach(&request, out).unwrap());
    c
}

/// The output of one stream in a conversation, put together.
pub fn stream(said: &[Said], which: u8) -> Vec<u8> {
    said.iter()
        .filter_map(|s| match s {
            Said::Output(k, data) if *k == which => Some(data.as_slice()),
            _ => None,
        })
        .flatten()
        .copied()
        .collect()
}

/// One request on a connection of its own, and everything answered to it.
pub fn simple(agent: &Agent, op: impl FnOnce(&mut ClientSession, &mut [u8]) -> usize) -> Vec<Said> {
    let mut c = Conversation::open(agent);
    c.start(op);
    c.all()
}

pub fn wait(agent: &Agent, job: &str) -> Vec<Said> {
    let request = JobRequest {
        job: Bytes(job.as_bytes()),
        user: None,
    };
    simple(agent, |s, out| s.start_wait(&request, out).unwrap())
}

/// A tree kill (signal 0) with a 200 ms grace.
pub fn kill(agent: &Agent, job: &str) -> Vec<Said> {
    let request = KillJob {
        job: Bytes(job.as_bytes()),
        user: None,
        signal: 0,
        grace_ms: Some(200),
    };
    simple(agent, |s, out| s.start_kill(&request, out).unwrap())
}

/// The exit record a conversation ended with.
pub fn exited(said: &[Said]) -> Termination {
    match said.last() {
        Some(Said::Exited(t)) => *t,
        other => panic!("no record: {other:?} in {said:?}"),
    }
}

/// The agent's jobs' supervisor, once it is there (the listener forks it at start).
pub fn supervisor(agent: &Agent) -> u32 {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(pid) = super::jobs_supervisor(agent.pid()) {
            return pid;
        }
        assert!(std::time::Instant::now() < deadline, "no jobs' supervisor");
        std::thread::sleep(Duration::from_millis(10));
    }
}
