//! One connection, in its own process: a thin driver over [`AgentSession`], which holds every
//! rule of the protocol (the hello and version, which frame when, the handshake and final-send
//! deadlines, stdin credit, the post-exit drain, the order of the final frames). This module
//! moves bytes between the socket, the command's pipes and the session, and starts the command.
//!
//! - `mod.rs` — the conversation: handshake, start, pump, final frames.
//! - `io.rs` — the socket with its receive buffer and its one-frame outbox.
//! - `start.rs` — what a spare prepares, the command's pipes, `clone` and `execve`, reaping.
//! - `pump.rs` — the running command's `poll` loop.
//! - `cap.rs` — a stream's output cap: the head passes live, a tail window is kept.
//! - `files.rs` — a put or a get of a file, as the request's user.

mod cap;
mod files;
mod io;
mod jobs;
mod pieces;
mod pump;
mod start;
mod system;

use ferry_wire::session::{AgentAuth, AgentEvent, AgentSession, Refusal, SessionError};
use ferry_wire::{Bytes, ErrorCode};
use rustix::event::PollFlags;
use rustix::fd::{AsFd, OwnedFd};

pub use self::cap::{Ring, MAX_TAIL};
use self::io::{Link, Received};
pub use self::start::{prepare, Prepared};
use self::start::{Child, Storage};
use crate::auth::{self, Serving};
use crate::successor::Successor;
use crate::sys::{self, ConnBuffers};
use crate::{clock, log};

/// Serves one accepted connection and ends the process.
// Kept out of line: its large stack frame must not be probed into the caller's.
#[inline(never)]
pub fn serve(sock: OwnedFd, prepared: Prepared, mut successor: Successor, serving: &Serving) -> ! {
    let Some(buffers) = sys::take_conn_buffers() else {
        successor.release();
        sys::exit(70)
    };
    let nonce = match auth::nonce() {
        Ok(nonce) => nonce,
        Err(errno) => {
            // Without a fresh nonce no proof could be trusted: nothing is served.
            successor.release();
            log::error(b"no random bytes for a nonce", errno);
            sys::exit(71)
        }
    };
    let auth = AgentAuth {
        nonce,
        secret: serving.secret.clone(),
    };
    converse(
        sock.as_fd(),
        buffers,
        prepared,
        &mut successor,
        serving,
        auth,
    );
    // An empty exec cgroup goes now; one that still holds processes (daemons left after a
    // normal end, or a killed tree still exiting) is the listener's to remove later.
    crate::cgroup::remove_own_exec();
    successor.end_cleanly();
    sys::exit(0)
}

/// How the handshake ended.
// A transfer's credentials are the large variant; the value lives once, on the stack.
#[allow(clippy::large_enum_variant)]
enum Handshake<'b> {
    /// The command runs; the session has its `Started` queued.
    Started(Child),
    /// A transfer was asked for and allowed; it has not touched a file yet.
    Transfer(files::Transfer<'b>),
    /// The session has an error frame queued (a breach, a refused request, a timeout).
    Refused,
    /// The client left before asking for anything (a hello alone is a health check), or the
    /// socket failed: nothing is owed.
    Gone,
}

/// How the conversation's active part ended: what is left before the connection closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The session has its last frame queued (the termination record, or an error): send it.
    Closing,
    /// The client is gone: nothing more can reach it.
    ClientGone,
}

fn converse(
    sock: rustix::fd::BorrowedFd<'_>,
    buffers: &'static mut ConnBuffers,
    mut prepared: Prepared,
    successor: &mut Successor,
    serving: &Serving,
    auth: AgentAuth,
) {
    let ConnBuffers {
        recv,
        out,
        stdin,
        stdout_tail,
        stderr_tail,
        argv,
        envp,
        cwd,
    } = buffers;
    let mut session = AgentSession::new(serving.config, clock::monotonic_us(), auth);
    let mut link = Link::new(sock, recv, out);
    // A request in pieces is put together here; its buffers go with the connection.
    let mut pieces = pieces::Pieces::new();
    // What the last operation left to close (pipes at EOF, the reaped pidfd): closed while the
    // next command starts up, or before this process waits for a request, whichever comes
    // first, so a client that sends request after request never waits for those `close`s.
    let mut leftovers = pump::Retired::new();
    // Protocol 5: one operation after another, each from a clean slate. NOTE: whatever an
    // operation holds (pipes, pidfd, the child's stack, a terminal, a transfer's files) is
    // released by the end of the next operation's start at the latest; an operation that
    // changed this process for good (a transfer dropped to its user and left the exec cgroup,
    // a shutdown) or left processes in the exec cgroup ends the connection instead.
    loop {
        let default_user = prepared.default_user();
        let storage = Storage {
            argv: &mut *argv,
            envp: &mut *envp,
            cwd: &mut *cwd,
        };
        pieces.clear();
        let mut audit = None;
        let mut last = false;
        let handshake = handshake(
            &mut link,
            &mut session,
            storage,
            prepared,
            successor,
            &mut audit,
            &mut pieces,
            &mut last,
            &mut leftovers,
        );
        successor.release();
        let mut next = None;
        let mut leader = None;
        let (end, retired) = match handshake {
            Handshake::Started(mut child) => {
                // While the command starts up (an `execve` and a dynamic loader take far
                // longer), `Started` goes out, and this process tidies up after the last
                // operation and makes the next one's pipes: off the client's path.
                link.outbox.refill(&mut session);
                let _ = link.flush();
                leftovers.clear();
                let stack = child.spent_stack.take();
                next = Some(start::prepare_next(stack, default_user.clone()));
                leader = Some(child.pid);
                let buffers = pump::Buffers {
                    stdin: &mut *stdin,
                    stdout_tail: &mut *stdout_tail,
                    stderr_tail: &mut *stderr_tail,
                };
                pump::run(&mut link, &mut session, child, buffers)
            }
            Handshake::Transfer(transfer) => {
                // It drops this process to the request's user and leaves the exec cgroup.
                last = true;
                let stall = serving.config.final_send_timeout;
                let (end, moved) = files::run(transfer, &mut link, &mut session, stall);
                if let Some(audit) = audit.as_mut() {
                    audit.bytes = Some(moved);
                }
                (end, pump::Retired::new())
            }
            Handshake::Refused => (End::Closing, pump::Retired::new()),
            Handshake::Gone => (End::ClientGone, pump::Retired::new()),
        };
        if end == End::Closing {
            send_final(&mut link, &mut session);
        }
        // Checked once the final frame is out: the next exec needs an empty exec cgroup with
        // no OOM kill in its past.
        if let Some(leader) = leader {
            last |= crate::cgroup::exec_cgroup_spent(leader);
        }
        if let Some(audit) = audit {
            audit.emit(&session, end, link.sock);
        }
        // Finished pipes and the reaped pidfd go only now, after the final frame, or later.
        leftovers = retired;
        let go_on = end == End::Closing && !last && session.can_continue() && link.flush().is_ok();
        if !go_on || !link.outbox.is_empty() {
            return;
        }
        prepared = match next {
            Some(prepared) => prepared,
            None => start::prepare_next(None, default_user),
        };
        if session.next_operation(clock::monotonic_us()).is_err() {
            return;
        }
    }
}

/// The record of one operation, for its audit line: who asked for what, as whom, how it ended.
struct Audit {
    operation: &'static [u8],
    /// `argv[0]` (or a transfer's path), cut.
    program: heapless::Vec<u8, 48>,
    /// The user asked for, or the default.
    user: heapless::Vec<u8, 32>,
    started_us: u64,
    /// A transfer's content bytes.
    bytes: Option<u64>,
}

impl Audit {
    fn new(operation: &'static [u8], program: &[u8], user: Option<&[u8]>, now: u64) -> Audit {
        Audit {
            operation,
            program: program.to_owned_in(),
            user: user.unwrap_or(b"(default)").to_owned_in(),
            started_us: now,
            bytes: None,
        }
    }

    /// A put's or a get's: `path=` instead of `program=`, and the bytes moved.
    fn transfer(operation: &'static [u8], path: &[u8], user: Option<Bytes<'_>>, now: u64) -> Audit {
        let mut audit = Audit::new(operation, path, user.map(|user| user.0), now);
        audit.bytes = Some(0);
        audit
    }

    /// One line, rate-limited: `audit: exec peer=vsock 2:1234 user=(default) program=uname
    /// result=exit 0 ms=7`.
    fn emit(&self, session: &AgentSession, end: End, sock: rustix::fd::BorrowedFd<'_>) {
        let mut line = log::Line::new();
        line.push(b"audit: ")
            .push(self.operation)
            .push(b" peer=")
            .push(&auth::peer_label(sock))
            .push(b" user=")
            .push(&self.user);
        if !self.program.is_empty() {
            let label: &[u8] = match self.bytes {
                Some(_) => b" path=",
                None => b" program=",
            };
            line.push(label).push(&self.program);
        }
        line.push(b" result=");
        match (session.exit_status(), session.refusal_code()) {
            (Some(ferry_wire::ExitStatus::Code(code)), _) => {
                line.push(b"exit ").num(u64::from(code));
            }
            (Some(ferry_wire::ExitStatus::Signal { number, .. }), _) => {
                line.push(b"signal ").num(u64::from(number));
            }
            (None, Some(code)) => {
                line.push(b"refused (")
                    .push(code.as_str().as_bytes())
                    .push(b")");
            }
            (None, None) if end == End::ClientGone => {
                line.push(b"client gone");
            }
            (None, None) => {
                line.push(b"done");
            }
        }
        if end == End::ClientGone && session.exit_status().is_some() {
            line.push(b", client gone");
        }
        if let Some(bytes) = self.bytes {
            line.push(b" bytes=").num(bytes);
        }
        let elapsed = clock::monotonic_us().saturating_sub(self.started_us);
        line.push(b" ms=").num(elapsed / 1000).emit_limited();
    }
}

/// A slice copied into a bounded vector, cut to fit.
trait ToOwnedIn {
    fn to_owned_in<const N: usize>(&self) -> heapless::Vec<u8, N>;
}

impl ToOwnedIn for [u8] {
    fn to_owned_in<const N: usize>(&self) -> heapless::Vec<u8, N> {
        let mut out = heapless::Vec::new();
        // NOTE: the client chose these bytes: a newline or an escape sequence must not forge a
        // log line or drive the console. Controls (and DEL) become `?`.
        for byte in self.iter().take(N) {
            let shown = if byte.is_ascii_control() { b'?' } else { *byte };
            let _ = out.push(shown);
        }
        out
    }
}

/// The hello exchange and the request, up to the command's start; `last` is set when the
/// operation ends the connection.
#[allow(clippy::too_many_arguments)]
fn handshake<'b>(
    link: &mut Link<'_, '_>,
    session: &mut AgentSession,
    storage: Storage<'b>,
    prepared: Prepared,
    successor: &mut Successor,
    audit: &mut Option<Audit>,
    pieces: &mut pieces::Pieces,
    last: &mut bool,
    leftovers: &mut pump::Retired,
) -> Handshake<'b> {
    // A detached job's name, from its `StartJob`, for the exec that follows.
    let mut job_name = heapless::Vec::<u8, { ferry_wire::limits::MAX_JOB_NAME }>::new();
    // Read again only after waiting: what arrives meanwhile is handled within microseconds.
    let mut now = clock::monotonic_us();
    loop {
        loop {
            let input = match session.handle_input(link.inbox.data(), now) {
                Ok(input) => input,
                Err(err) => {
                    if err == SessionError::Unauthenticated {
                        // One line, and nothing about which part of the proof was wrong.
                        log::Line::new()
                            .push(b"authentication failed: ")
                            .push(&auth::peer_label(link.sock))
                            .emit_limited();
                    }
                    return Handshake::Refused;
                }
            };
            let consumed = input.consumed;
            match input.event {
                None if consumed == 0 => break,
                Some(AgentEvent::ExecPart { list, data }) => {
                    if let Err(refusal) = pieces.append(list, data) {
                        link.inbox.consume(consumed);
                        let _ = session.refuse(refusal, clock::monotonic_us());
                        return Handshake::Refused;
                    }
                }
                Some(AgentEvent::Exec(valid)) if session.is_job() => {
                    let request = valid.request();
                    let program = request.argv.as_bytes().split(|b| *b == 0).next();
                    *audit = Some(Audit::new(
                        b"job",
                        program.unwrap_or(&[]),
                        request.user.map(|u| u.0),
                        now,
                    ));
                    // NOTE: before waiting on the supervisor (its runner's start): the next
                    // client must not wait on this one.
                    successor.release();
                    let frame = link.inbox.data().get(..consumed).unwrap_or(&[]);
                    jobs::start(session, frame, &job_name, request.user.map(|u| u.0));
                    link.inbox.consume(consumed);
                    return Handshake::Refused;
                }
                Some(AgentEvent::Exec(valid)) => {
                    let request = valid.request();
                    let mut small = [0u32; pieces::SMALL_INDEX];
                    let lists = pieces.lists(&valid, &mut small);
                    let program = match &lists {
                        Ok((lists, _)) => lists.argv.split(|b| *b == 0).next().unwrap_or(&[]),
                        Err(_) => &[],
                    };
                    *audit = Some(Audit::new(b"exec", program, request.user.map(|u| u.0), now));
                    // The next spare is forked while our child starts, off the path the client
                    // waits on.
                    let started = lists.and_then(|(lists, index)| {
                        let release = || successor.release();
                        start::start(
                            &valid,
                            lists,
                            index,
                            request.pty,
                            storage,
                            prepared,
                            release,
                        )
                    });
                    link.inbox.consume(consumed);
                    return match started {
                        Ok(child) => match session.started(child.wire_pid(), child.started_us) {
                            Ok(()) => Handshake::Started(child),
                            Err(_) => {
                                // NOTE: how the tree was killed is not reported: nothing
                                // reaches the client here.
                                let _ = start::kill(child.pid, false);
                                Handshake::Gone
                            }
                        },
                        Err(refusal) => {
                            let _ = session.refuse(refusal, clock::monotonic_us());
                            Handshake::Refused
                        }
                    };
                }
                Some(AgentEvent::KillAll) => {
                    *audit = Some(Audit::new(b"kill-all", b"", None, now));
                    link.inbox.consume(consumed);
                    let now = clock::monotonic_us();
                    let _ = match crate::cgroup::kill_all_commands() {
                        Ok(count) => session.done(count, now),
                        Err(errno) => session.refuse(
                            Refusal::os(
                                ErrorCode::Unsupported,
                                errno.raw_os_error().unsigned_abs(),
                                "no cgroup holds the commands: nothing to kill them by",
                            ),
                            now,
                        ),
                    };
                    return Handshake::Refused;
                }
                Some(AgentEvent::Put(put)) => {
                    *audit = Some(Audit::transfer(b"put", put.path.0, put.user, now));
                    let transfer = files::Transfer::put(&put, storage.cwd, prepared);
                    link.inbox.consume(consumed);
                    return transfer_or_refusal(session, transfer);
                }
                Some(AgentEvent::Get(get)) => {
                    *audit = Some(Audit::transfer(b"get", get.path.0, get.user, now));
                    let transfer = files::Transfer::get(&get, storage.cwd, prepared);
                    link.inbox.consume(consumed);
                    return transfer_or_refusal(session, transfer);
                }
                Some(
                    event @ (AgentEvent::Info
                    | AgentEvent::Shutdown(_)
                    | AgentEvent::TimeSync(_)
                    | AgentEvent::Reseed(_)),
                ) => {
                    *audit = Some(Audit::new(system::name(&event), b"", None, now));
                    let follow_up = system::answer(&event, session);
                    link.inbox.consume(consumed);
                    if let Some(follow_up) = follow_up {
                        *last = matches!(follow_up, system::FollowUp::Shutdown(_));
                        system::follow_up(follow_up, link, session, successor);
                    }
                    return Handshake::Refused;
                }
                Some(AgentEvent::StartJob(start)) => {
                    // Its exec follows (the session allows nothing else).
                    job_name.clear();
                    if let Some(name) = start.name {
                        let _ = job_name.extend_from_slice(name.0);
                    }
                }
                Some(
                    event @ (AgentEvent::Jobs(_)
                    | AgentEvent::Attach(_)
                    | AgentEvent::Wait(_)
                    | AgentEvent::Kill(_)
                    | AgentEvent::Remove(_)),
                ) => {
                    *audit = Some(Audit::new(jobs::name(&event), b"", None, now));
                    // The request is copied into its record before the inbox moves on.
                    let frame = link.inbox.data().get(..consumed).unwrap_or(&[]);
                    let asked = jobs::ask(&event, frame);
                    link.inbox.consume(consumed);
                    // NOTE: an attachment or a wait lasts as long as its job: the next client
                    // must not wait for a spare until then (a request that came with the hello
                    // reaches here before any wait released it).
                    successor.release();
                    let end = jobs::serve(asked, link, session);
                    return match end {
                        End::Closing => Handshake::Refused,
                        End::ClientGone => Handshake::Gone,
                    };
                }
                // The hello and the proof are handled by the session (our proof is queued);
                // they yield nothing else before a request.
                _ => {}
            }
            link.inbox.consume(consumed);
        }
        // No whole request is buffered, so the hello cannot travel with its answer: send it now.
        link.outbox.refill(session);
        if link.flush().is_err() {
            return Handshake::Gone;
        }
        // Read before polling: a pipelining client's request is usually there already.
        match link.receive() {
            Received::Data => continue,
            Received::Nothing => {}
            Received::Closed => {
                let _ = session.handle_eof();
                return Handshake::Gone;
            }
        }
        // Nothing to do but wait for the client: never keep the next one waiting on this one,
        // and tidy up first.
        successor.release();
        leftovers.clear();
        let flags = if link.outbox.is_empty() {
            PollFlags::IN
        } else {
            PollFlags::IN | PollFlags::OUT
        };
        if link.wait(flags, session.poll_timeout()).is_err() {
            return Handshake::Gone;
        }
        now = clock::monotonic_us();
        if session.handle_timeout(now).is_err() {
            return Handshake::Refused;
        }
    }
}

/// A transfer to run, or its refusal queued.
fn transfer_or_refusal<'b>(
    session: &mut AgentSession,
    transfer: Result<files::Transfer<'b>, Refusal>,
) -> Handshake<'b> {
    match transfer {
        Ok(transfer) => Handshake::Transfer(transfer),
        Err(refusal) => {
            let _ = session.refuse(refusal, clock::monotonic_us());
            Handshake::Refused
        }
    }
}

/// Sends what the session still has to say, behind whatever is unsent, for as long as it
/// allows; the connection closes after it.
fn send_final(link: &mut Link<'_, '_>, session: &mut AgentSession) {
    while link.outbox.refill(session) {
        if link.flush().is_err() {
            return;
        }
        if link.outbox.is_empty() {
            continue;
        }
        if link.wait(PollFlags::OUT, session.poll_timeout()).is_err() {
            return;
        }
        if session.handle_timeout(clock::monotonic_us()).is_err() {
            return;
        }
    }
}
