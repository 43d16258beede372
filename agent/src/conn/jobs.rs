//! A connection's job requests (protocol 5): the connection process relays them to the jobs'
//! supervisor (`crate::jobs`) over a private line, and relays its answers back through the
//! session: a start's id, a listing, an attachment's output and end, a wait, a kill, a removal.

use ferry_wire::session::{AgentEvent, AgentSession, Refusal};
use ferry_wire::{
    AttachHeader, Bytes, DataKind, ErrorCode, JobRecord, JobStarted, JobState, Resume, StrList,
    Stream, Timestamp,
};
use rustix::event::{poll, PollFd, PollFlags};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};

use super::io::{Link, Output, Received as LinkReceived};
use super::End;
use crate::jobs::client::{self, Received};
use crate::jobs::record::{Answer, JobInfo, Request, ANY_VIEWER, MAX_OUTPUT};
use crate::sys::SetOnce;
use crate::{clock, policy, users};

/// How long the supervisor may take to answer a request that does not wait on a job.
const ANSWER_TIMEOUT_US: u64 = 10_000_000;

/// Room for one answer record.
const RECORD_BUF: usize = MAX_OUTPUT + 64;

/// The uid whose jobs a request for `user` may see ([`ANY_VIEWER`]: all), or its refusal.
fn viewer(user: Option<Bytes<'_>>) -> Result<u32, Refusal> {
    let policy = policy::current();
    let credentials = users::authorize(policy, user.map(|u| u.0), super::start::is_root())?;
    Ok(match credentials.uid == 0 || policy.jobs_any_user {
        true => ANY_VIEWER,
        false => credentials.uid,
    })
}

/// A private line to the supervisor.
fn open() -> Result<OwnedFd, Refusal> {
    let channel = crate::jobs::channel().ok_or(Refusal::new(
        ErrorCode::Unsupported,
        "no job supervisor runs",
    ))?;
    client::open(channel).map_err(|errno| {
        Refusal::os(
            ErrorCode::ResourceExhausted,
            errno.raw_os_error().unsigned_abs(),
            "the job supervisor is gone (a new one serves new connections)",
        )
    })
}

/// The supervisor's message for a refusal, kept for the rest of the process (the session
/// holds `&'static str`); the code's own text when it is not text or one was kept already.
fn message(code: ErrorCode, text: &[u8]) -> &'static str {
    static KEPT: SetOnce<heapless::Vec<u8, 200>> = SetOnce::new();
    let mut kept = heapless::Vec::new();
    let _ = kept.extend_from_slice(text.get(..text.len().min(200)).unwrap_or(&[]));
    let _ = KEPT.set(kept);
    KEPT.get()
        .and_then(|kept| core::str::from_utf8(kept).ok())
        .filter(|kept| kept.as_bytes() == text)
        .unwrap_or(code.as_str())
}

fn refused(code: ErrorCode, errno: u32, text: &[u8]) -> Refusal {
    Refusal::os(code, errno, message(code, text))
}

fn gone() -> Refusal {
    Refusal::new(ErrorCode::Internal, "the job supervisor did not answer")
}

/// A request could not be sent: the supervisor refused the line before reading it (`Busy`:
/// every line taken) and closed it, or it is gone.
fn unsent(sock: BorrowedFd<'_>) -> Refusal {
    let mut buf = [0u8; 512];
    match client::receive(sock, &mut buf) {
        Received::Answer(Answer::Refused {
            code,
            errno,
            message,
        }) => refused(code, errno, message),
        _ => gone(),
    }
}

/// Starts the detached job `frame` (the whole exec frame) asks for, named `name`: queues
/// `Detached` or the refusal.
pub fn start(session: &mut AgentSession, frame: &[u8], name: &[u8], user: Option<&[u8]>) {
    let now = clock::monotonic_us;
    let result = (|| {
        let credentials = users::authorize(policy::current(), user, super::start::is_root())?;
        let sock = open()?;
        let mut head = [0u8; 96];
        let request = Request::Start {
            uid: credentials.uid,
            gid: credentials.gid,
            name,
            exec: &[],
        };
        let n = request.encode(&mut head).ok_or(gone())?;
        client::send_parts(sock.as_fd(), head.get(..n).unwrap_or(&[]), frame)
            .map_err(|_| unsent(sock.as_fd()))?;
        let mut buf = [0u8; 512];
        // The runner's start is an exec's: bounded by the spawn, not by the command.
        match receive(sock.as_fd(), &mut buf, now() + ANSWER_TIMEOUT_US) {
            Some(Answer::Started { id, pid }) => Ok(JobStarted { id, pid }),
            Some(Answer::Refused {
                code,
                errno,
                message,
            }) => Err(refused(code, errno, message)),
            _ => Err(gone()),
        }
    })();
    let _ = match result {
        Ok(started) => session.detached(started, now()),
        Err(refusal) => session.refuse(refusal, now()),
    };
}

/// The next answer, waiting until `deadline`.
fn receive<'a>(sock: BorrowedFd<'_>, buf: &'a mut [u8], deadline: u64) -> Option<Answer<'a>> {
    while client::readable_by(sock, deadline) {
        match client::receive_raw(sock, buf) {
            Ok(None) => continue,
            Err(()) => return None,
            Ok(Some(n)) => return buf.get(..n).and_then(crate::jobs::record::answer),
        }
    }
    None
}

/// The audit line's name of a job request.
pub fn name(event: &AgentEvent<'_>) -> &'static [u8] {
    match event {
        AgentEvent::Jobs(_) => b"jobs",
        AgentEvent::Attach(_) => b"attach",
        AgentEvent::Wait(_) => b"wait",
        AgentEvent::Kill(_) => b"kill",
        _ => b"rm",
    }
}

/// What a request's answers are.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    List,
    Attach,
    Wait,
    /// One `Done` or a refusal.
    Simple,
    /// Not a job request.
    Other,
}

/// A job request copied out of the receive buffer, ready to send.
pub struct Asked {
    record: [u8; 320],
    prepared: Result<(usize, Kind), Refusal>,
}

/// Copies a job request other than a start into its record: `event`, as the session decoded
/// it from `frame` (the client's whole frame, which goes to the supervisor as it is).
pub fn ask(event: &AgentEvent<'_>, frame: &[u8]) -> Asked {
    let mut record = [0u8; 320];
    let (user, kind) = match *event {
        AgentEvent::Jobs(query) => (query.user, Kind::List),
        AgentEvent::Attach(attach) => (attach.user, Kind::Attach),
        AgentEvent::Wait(wait) => (wait.user, Kind::Wait),
        AgentEvent::Kill(kill) => (kill.user, Kind::Simple),
        AgentEvent::Remove(remove) => (remove.user, Kind::Simple),
        _ => (None, Kind::Other),
    };
    let prepared = viewer(user).and_then(|viewer| {
        let request = Request::Frame { viewer, frame };
        match (kind, request.encode(&mut record)) {
            (Kind::Other, _) => Err(Refusal::new(ErrorCode::Internal, "not a job request")),
            (_, Some(n)) => Ok((n, kind)),
            (_, None) => Err(Refusal::new(ErrorCode::Internal, "job request too long")),
        }
    });
    Asked { record, prepared }
}

/// Serves a job request other than a start; returns how the conversation goes on.
pub fn serve(asked: Asked, link: &mut Link<'_, '_>, session: &mut AgentSession) -> End {
    let now = clock::monotonic_us;
    let Asked { record, prepared } = asked;
    let result = prepared.and_then(|(len, kind)| {
        let sock = open()?;
        rustix::net::send(
            &sock,
            record.get(..len).unwrap_or(&[]),
            rustix::net::SendFlags::NOSIGNAL,
        )
        .map_err(|_| unsent(sock.as_fd()))?;
        Ok(match kind {
            Kind::List => list(link, session, sock.as_fd()),
            Kind::Attach => follow(link, session, sock.as_fd()),
            Kind::Wait => {
                let _ = session.waiting(now());
                follow(link, session, sock.as_fd())
            }
            Kind::Simple | Kind::Other => {
                let mut buf = [0u8; 512];
                match receive(sock.as_fd(), &mut buf, now() + ANSWER_TIMEOUT_US) {
                    Some(Answer::Done { .. }) => {
                        let _ = session.done(0, now());
                    }
                    Some(Answer::Refused {
                        code,
                        errno,
                        message,
                    }) => {
                        let _ = session.refuse(refused(code, errno, message), now());
                    }
                    _ => return Err(gone()),
                }
                End::Closing
            }
        })
    });
    match result {
        Ok(end) => end,
        Err(refusal) => {
            let _ = session.refuse(refusal, now());
            End::Closing
        }
    }
}

fn job_record<'a>(job: &JobInfo<'a>) -> JobRecord<'a> {
    let states = [
        JobState::Running,
        JobState::Exited,
        JobState::Killed,
        JobState::Lost,
    ];
    JobRecord {
        id: job.id,
        name: (!job.name.is_empty()).then_some(Bytes(job.name)),
        argv: StrList::new(job.argv),
        uid: job.uid,
        gid: job.gid,
        pid: job.pid,
        state: states
            .get(usize::from(job.state))
            .copied()
            .unwrap_or(JobState::Lost),
        started: Timestamp {
            secs: job.started_secs,
            nanos: job.started_nanos,
        },
        duration_us: job.duration_us,
        stdout_bytes: job.bytes[0],
        stderr_bytes: job.bytes[1],
        termination: job.termination,
    }
}

/// A listing: each job's record as the client takes it, then `Done`.
fn list(link: &mut Link<'_, '_>, session: &mut AgentSession, sock: BorrowedFd<'_>) -> End {
    let mut buf = [0u8; 2048];
    loop {
        let deadline = clock::monotonic_us() + ANSWER_TIMEOUT_US;
        match receive(sock, &mut buf, deadline) {
            Some(Answer::Job(job)) => {
                let record = job_record(&job);
                let stall = clock::monotonic_us() + 30_000_000;
                // NOTE: what the session queued goes first: the agent's proof before the first
                // record (a client believes nothing before it).
                link.outbox.refill(session);
                let put = link
                    .outbox
                    .put_when_sent(link.sock, stall, |out| session.encode_job(&record, out));
                if !put {
                    return End::ClientGone;
                }
            }
            Some(Answer::Done { count }) => {
                let _ = session.done(count, clock::monotonic_us());
                return End::Closing;
            }
            Some(Answer::Refused {
                code,
                errno,
                message,
            }) => {
                let _ = session.refuse(refused(code, errno, message), clock::monotonic_us());
                return End::Closing;
            }
            _ => {
                let _ = session.refuse(gone(), clock::monotonic_us());
                return End::Closing;
            }
        }
    }
}

/// An attachment or a wait: the supervisor's records become the session's frames, the client's
/// stdin and controls go to the job, keepalives flow; until the final frame is queued.
fn follow(link: &mut Link<'_, '_>, session: &mut AgentSession, sock: BorrowedFd<'_>) -> End {
    let mut buf = [0u8; RECORD_BUF];
    let mut begun = false;
    loop {
        // The final frame is out of the session (closing, or ended with the connection kept
        // for the next request): the caller sends it and goes on.
        if !link.outbox.refill(session) && (session.is_closing() || session.can_continue()) {
            return End::Closing;
        }
        if link.flush().is_err() {
            return End::ClientGone;
        }
        let outbox_empty = link.outbox.is_empty();
        let mut client_flags = PollFlags::IN;
        if !outbox_empty {
            client_flags |= PollFlags::OUT;
        }
        let mut fds = [
            PollFd::from_borrowed_fd(link.sock, client_flags),
            // A record is taken only when the outbox can take its frame: a slow client slows
            // its own attachment (the supervisor keeps its cursor), nobody else's.
            PollFd::from_borrowed_fd(
                sock,
                if outbox_empty {
                    PollFlags::IN
                } else {
                    PollFlags::empty()
                },
            ),
        ];
        let timeout = session.poll_timeout().map(clock::timeout_until);
        let _ = poll(&mut fds, timeout.as_ref());
        let (client_ready, sup_ready) = (fds[0].revents(), fds[1].revents());
        let now = clock::monotonic_us();
        if !client_ready.is_empty() {
            match link.receive() {
                LinkReceived::Closed => return End::ClientGone,
                LinkReceived::Data => {
                    if let Err(end) = client_frames(link, session, sock) {
                        return end;
                    }
                }
                LinkReceived::Nothing => {}
            }
        }
        if outbox_empty && !sup_ready.is_empty() {
            match client::receive(sock, &mut buf) {
                Received::Answer(answer) => {
                    if !relay(answer, link, session, &mut begun) {
                        return End::Closing;
                    }
                }
                Received::Nothing => {}
                Received::Gone => {
                    let _ = session.refuse(gone(), now);
                }
            }
        }
        if session.handle_timeout(clock::monotonic_us()).is_err() {
            return End::Closing;
        }
    }
}

/// One supervisor record into the session; `false` when the conversation must end now.
fn relay(
    answer: Answer<'_>,
    link: &mut Link<'_, '_>,
    session: &mut AgentSession,
    begun: &mut bool,
) -> bool {
    let now = clock::monotonic_us();
    match answer {
        Answer::Attached {
            id,
            from,
            lost,
            stdin,
            running,
            started_us,
        } if !*begun => {
            *begun = true;
            let header = AttachHeader {
                id,
                stdout: Resume {
                    from: from[0],
                    lost: lost[0],
                },
                stderr: Resume {
                    from: from[1],
                    lost: lost[1],
                },
                stdin,
                running,
            };
            let _ = session.attached(header, started_us, now);
        }
        Answer::Output { stream, data } => {
            let kind = if stream == 1 {
                DataKind::Stderr
            } else {
                DataKind::Stdout
            };
            let copied = link.outbox.copy_output(kind, session, |space| {
                let n = data.len().min(space.len());
                if let (Some(dest), Some(src)) = (space.get_mut(..n), data.get(..n)) {
                    dest.copy_from_slice(src);
                }
                n
            });
            if copied == Output::Failed {
                return false;
            }
        }
        Answer::Dropped { stream, bytes } => {
            let stream = if stream == 1 {
                Stream::Stderr
            } else {
                Stream::Stdout
            };
            link.outbox
                .put(|out| session.encode_output_dropped(stream, bytes, out));
        }
        Answer::Credit(n) => session.stdin_consumed(n as usize),
        Answer::Ended(t) => {
            if !*begun {
                // A wait: keepalives were not needed.
                *begun = true;
            }
            let _ = session.job_ended(t, now);
        }
        Answer::Done { .. } => {
            let _ = session.done(0, now);
        }
        Answer::Refused {
            code,
            errno,
            message,
        } => {
            let _ = session.refuse(refused(code, errno, message), now);
        }
        Answer::Started { .. } | Answer::Job(_) | Answer::Attached { .. } => {
            let _ = session.refuse(gone(), now);
        }
    }
    true
}

/// The client's frames while attached: stdin and controls to the job.
fn client_frames(
    link: &mut Link<'_, '_>,
    session: &mut AgentSession,
    sock: BorrowedFd<'_>,
) -> Result<(), End> {
    let now = clock::monotonic_us();
    loop {
        let Ok(input) = session.handle_input(link.inbox.data(), now) else {
            return Err(End::Closing);
        };
        let consumed = input.consumed;
        let relayed = match input.event {
            None if consumed == 0 => return Ok(()),
            Some(
                AgentEvent::Stdin(_)
                | AgentEvent::StdinEof
                | AgentEvent::Signal(_)
                | AgentEvent::Resize(_)
                | AgentEvent::Cancel { .. },
            ) => true,
            _ => false,
        };
        if relayed {
            // The client's own frame: the runner's session reads it as the attacher's did.
            let frame = link.inbox.data().get(..consumed).unwrap_or(&[]);
            let _ = client::send_parts(sock, &[crate::jobs::record::RELAY_TAG], frame);
        }
        link.inbox.consume(consumed);
    }
}
