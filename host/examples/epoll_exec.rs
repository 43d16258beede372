//! Embedding ferry in a VMM: one exec driven from a single non-blocking epoll loop (through mio),
//! with nothing but `ferry_wire`'s [`ClientSession`], a [`RecvBuf`] and the socket. No threads,
//! no async runtime, no `ferry_host` beyond parsing the target and reading the secret file.
//!
//! ```text
//! cargo run -p ferry-host --example epoll_exec -- [-n] [-C DIR] TARGET -- PROG ARGS…
//! ```
//!
//! TARGET is `unix://PATH`, `vsock://CID:PORT` or `hvsock://PATH:PORT`. The command's stdout and
//! stderr are copied to ours; our stdin is forwarded to the command within the credit the agent
//! grants (`-n`: the command's stdin is /dev/null; `-C DIR`: it runs in DIR). Exit status as the `ferry` CLI's: the remote
//! code, 128+N for signal N, 127 not found, 126 cannot execute, 255 for our own errors. The
//! agent's secret is read from the file `FERRY_SECRET_FILE` names (unset: no secret, for an
//! agent started `--insecure`).
//!
//! The conversation (protocol 3): the agent speaks first, its hello carrying the challenge; once
//! the session accepts it, our hello, our proof and the exec request go out in one write; the
//! agent's proof comes back before `Started`, and the session checks it. Our stdin is forwarded
//! only once the agent has proven the secret.
//!
//! The loop owns everything; the session owns every protocol rule. Each turn: sleep until the
//! socket or our stdin is ready or the session's deadline (`poll_timeout`) passes; hand what
//! arrived to the session (`handle_input_at`, so it knows when the agent was last heard) and act
//! on its events; send what is queued. The deadline is the handshake's, then, while the command
//! runs, three of the agent's keepalive intervals: an agent that sends nothing, not even a
//! keepalive, is frozen (`agent stopped answering`), whereas a silent command is not. Our stdin is read only
//! while the session has credit and nothing waits to be sent, so the agent's bounded buffer is
//! the only buffer on the way in.
//!
//! mio's epoll is edge-triggered: the socket is read and written until it would block, and our
//! stdin (left blocking, as it may be the terminal our shell shares) is read once per
//! readiness and then re-armed.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ferry_host::Target;
use ferry_wire::limits::NONCE_LEN;
use ferry_wire::limits::{MAX_DATA, MAX_FRAME};
use ferry_wire::session::{ClientAuth, ClientEvent, ClientSession, Input, Micros, SessionError};
use ferry_wire::{Bytes, ErrorCode, ExecRequest, RecvBuf, StdinMode, StrList, DATA_HEADROOM};
use mio::net::UnixStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

/// Connect, hybrid-vsock handshake and the protocol's handshake (both hellos, both proofs) must
/// be done within this.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest reply line a hybrid-vsock socket may send (`OK 1073741824\n` is 14 bytes).
const MAX_HANDSHAKE_LINE: usize = 64;
/// A hybrid-vsock handshake that ends in EOF (nothing accepts on the port yet, or a VMM that
/// drops connections spuriously) is retried this many times, the pause doubling from the first.
const HANDSHAKE_RETRIES: u32 = 5;
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(20);

/// Poll tokens.
const SOCKET: Token = Token(0);
const STDIN: Token = Token(1);

/// Exit status for our own failures, as the CLI's.
const EXIT_FERRY: u8 = 255;
const EXIT_NOT_FOUND: u8 = 127;
const EXIT_CANNOT_EXECUTE: u8 = 126;
/// Our stdout was closed under us: the shell's status for death by SIGPIPE.
const EXIT_BROKEN_PIPE: u8 = 128 + 13;

fn main() -> ExitCode {
    match parse_args().and_then(|args| run(&args)) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("epoll_exec: {err}");
            ExitCode::from(EXIT_FERRY)
        }
    }
}

struct Args {
    target: Target,
    /// `argv` packed as `execve` wants it: NUL-terminated entries.
    argv: Vec<u8>,
    program: String,
    forward_stdin: bool,
    /// The command's working directory (the agent's when `None`).
    cwd: Option<Vec<u8>>,
}

fn parse_args() -> Result<Args, Failure> {
    use std::os::unix::ffi::OsStrExt;
    let usage = || Failure::from("usage: epoll_exec [-n] [-C DIR] TARGET -- PROG ARGS…");
    let mut args = std::env::args_os().skip(1).peekable();
    let mut forward_stdin = true;
    let mut cwd = None;
    loop {
        if args.next_if(|arg| arg == "-n").is_some() {
            forward_stdin = false;
        } else if args.next_if(|arg| arg == "-C").is_some() {
            cwd = Some(args.next().ok_or_else(usage)?.as_bytes().to_vec());
        } else {
            break;
        }
    }
    let target = args.next().ok_or_else(usage)?;
    let target: Target = target
        .to_str()
        .ok_or_else(usage)?
        .parse()
        .map_err(|err| Failure(format!("{err}")))?;
    if args.next().is_none_or(|sep| sep != "--") {
        return Err(usage());
    }
    let mut argv = Vec::new();
    let mut program = None;
    for arg in args {
        program.get_or_insert_with(|| arg.to_string_lossy().into_owned());
        argv.extend_from_slice(arg.as_bytes());
        argv.push(0);
    }
    Ok(Args {
        target,
        argv,
        program: program.ok_or_else(usage)?,
        forward_stdin,
        cwd,
    })
}

/// Where the connection stands. The session takes over once the transport is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// A non-blocking `connect` in progress: writable means done (or failed).
    Connecting,
    /// Hybrid vsock: `CONNECT <port>\n` queued or sent, waiting for `OK <n>\n`.
    Handshake,
    /// The byte stream to the agent.
    Open,
}

/// Our stdin, as the loop sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LocalStdin {
    /// Not forwarded (or forwarded to its end).
    Closed,
    /// A pipe, tty or socket: epoll says when a read will not block. `armed`: registered and
    /// its readiness not yet taken.
    Pollable { armed: bool },
    /// A regular file or /dev/null (epoll refuses those): reads never block.
    AlwaysReady,
}

struct Exec<'a> {
    poll: Poll,
    socket: UnixStream,
    transport: Transport,
    target: Target,
    hvsock_port: Option<u32>,
    /// Hybrid vsock: handshakes that ended in EOF so far, and when to try again.
    handshake_retries: u32,
    retry_at: Option<Instant>,
    /// The protocol: hellos and proofs, the exec, credit, the end. Its clock is µs since
    /// `epoch`.
    session: ClientSession,
    epoch: Instant,
    /// The request, sent behind our hello and proof once the agent's hello is accepted.
    request: ExecRequest<'a>,
    /// Bytes to send; `out[sent..]` is still queued.
    out: Vec<u8>,
    sent: usize,
    recv: RecvBuf<Vec<u8>>,
    /// The handshake's reply line so far.
    reply: Vec<u8>,
    /// Our fds 0, 1 and 2, duplicated: unbuffered, and 0 stays blocking.
    stdin_file: File,
    stdout: File,
    stderr: File,
    stdin: LocalStdin,
    /// Stdin chunks are read straight into this at `DATA_HEADROOM` and framed in place.
    stdin_frame: Vec<u8>,
    program: String,
}

fn run(args: &Args) -> Result<u8, Failure> {
    let secret = ferry_host::secret_from_env().map_err(|err| Failure(err.to_string()))?;
    // Fresh for every connection: the agent's proof covers it.
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|err| Failure(format!("no random nonce: {err}")))?;
    let epoch = Instant::now();
    let session = ClientSession::new(0, Some(micros(HELLO_TIMEOUT)), ClientAuth { nonce, secret });
    let request = ExecRequest {
        argv: StrList::new(&args.argv),
        env: StrList::new(&[]),
        clean_env: false,
        cwd: args.cwd.as_deref().map(Bytes),
        stdin: if args.forward_stdin {
            StdinMode::Pipe
        } else {
            StdinMode::Null
        },
        user: None,
        pty: None,
        timeout_ms: 0,
        kill_grace_ms: None,
        kill_tree_on_exit: false,
        max_output: 0,
    };
    // A request the protocol refuses fails here, before any connection. (The session checks
    // it again against the agent's limits once its hello is in.)
    request
        .validate()
        .map_err(|err| Failure(format!("invalid request: {}", err.message)))?;

    let poll = Poll::new()?;
    let mut socket = connect(&args.target)?;
    // Edge-triggered: the first writable edge says the connect finished.
    poll.registry()
        .register(&mut socket, SOCKET, Interest::READABLE | Interest::WRITABLE)?;
    let dup = |fd: std::os::fd::BorrowedFd<'_>| -> Result<File, Failure> {
        Ok(File::from(fd.try_clone_to_owned()?))
    };
    let stdin_file = dup(io::stdin().as_fd())?;
    let stdin = if args.forward_stdin {
        let fd = stdin_file.as_raw_fd();
        match poll
            .registry()
            .register(&mut SourceFd(&fd), STDIN, Interest::READABLE)
        {
            Ok(()) => LocalStdin::Pollable { armed: true },
            Err(err) if err.raw_os_error() == Some(libc::EPERM) => LocalStdin::AlwaysReady,
            Err(err) => return Err(err.into()),
        }
    } else {
        LocalStdin::Closed
    };
    let mut exec = Exec {
        poll,
        socket,
        transport: Transport::Connecting,
        target: args.target.clone(),
        handshake_retries: 0,
        retry_at: None,
        hvsock_port: match &args.target {
            Target::Hvsock { port, .. } => Some(*port),
            _ => None,
        },
        session,
        epoch,
        request,
        out: Vec::new(),
        sent: 0,
        recv: RecvBuf::new(vec![0u8; 4 * MAX_FRAME]),
        reply: Vec::new(),
        stdin_file,
        stdout: dup(io::stdout().as_fd())?,
        stderr: dup(io::stderr().as_fd())?,
        stdin,
        stdin_frame: vec![0u8; DATA_HEADROOM + MAX_DATA],
        program: args.program.clone(),
    };
    exec.run()
}

impl Exec<'_> {
    /// The loop: returns the exit status once the session reports the command's end.
    fn run(&mut self) -> Result<u8, Failure> {
        let mut events = Events::with_capacity(8);
        loop {
            self.arm_stdin()?;
            let stdin_ready_now = self.stdin == LocalStdin::AlwaysReady && self.wants_stdin();
            // Sleep until something is ready, or until the session's deadline.
            let timeout = if stdin_ready_now {
                Some(Duration::ZERO)
            } else {
                let session = self
                    .session
                    .poll_timeout()
                    .map(|deadline| Duration::from_micros(deadline.saturating_sub(self.now())));
                let retry = self
                    .retry_at
                    .map(|at| at.saturating_duration_since(Instant::now()));
                match (session, retry) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            };
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err.into()),
            }
            if self.retry_at.is_some_and(|at| Instant::now() >= at) {
                self.retry_at = None;
                self.reconnect()?;
                continue;
            }
            for event in events.iter() {
                match event.token() {
                    SOCKET => {
                        if event.is_writable() {
                            self.on_writable()?;
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            if let Some(code) = self.on_readable()? {
                                return Ok(code);
                            }
                        }
                    }
                    STDIN => {
                        // The edge is taken; it is re-armed when stdin is wanted again.
                        self.stdin = LocalStdin::Pollable { armed: false };
                        self.on_stdin()?;
                    }
                    _ => {}
                }
            }
            // The session decides whether its deadline has passed (the handshake's covers
            // connect, the hybrid-vsock handshake and retries alike; then the agent's liveness).
            // After the events: what the agent sent meanwhile was read first, and is not silence.
            self.session
                .handle_timeout(self.now())
                .map_err(session_failure)?;
            if stdin_ready_now {
                self.on_stdin()?;
            }
        }
    }

    fn now(&self) -> Micros {
        micros(self.epoch.elapsed())
    }

    /// Stdin is read only while credit is available and nothing waits to be sent: the agent's
    /// bounded buffer is the only buffer, and a slow command slows our reads. Nothing of it goes
    /// to an agent that has not proven the secret.
    fn wants_stdin(&self) -> bool {
        self.stdin != LocalStdin::Closed
            && self.transport == Transport::Open
            && self.session.is_authenticated()
            && self.sent == self.out.len()
            && self.session.stdin_credit() > 0
    }

    /// Re-arms our stdin's readiness when it is wanted again (`EPOLL_CTL_MOD` reports it at
    /// once if input is waiting).
    fn arm_stdin(&mut self) -> Result<(), Failure> {
        if self.stdin == (LocalStdin::Pollable { armed: false }) && self.wants_stdin() {
            let fd = self.stdin_file.as_raw_fd();
            self.poll
                .registry()
                .reregister(&mut SourceFd(&fd), STDIN, Interest::READABLE)?;
            self.stdin = LocalStdin::Pollable { armed: true };
        }
        Ok(())
    }

    fn on_writable(&mut self) -> Result<(), Failure> {
        if self.transport == Transport::Connecting {
            // Done connecting, one way or the other.
            if let Some(err) = self.socket.take_error()? {
                return Err(Failure(format!("cannot connect: {err}")));
            }
            match self.hvsock_port {
                Some(port) => {
                    self.transport = Transport::Handshake;
                    self.out
                        .extend_from_slice(format!("CONNECT {port}\n").as_bytes());
                }
                None => self.open(),
            }
        }
        self.flush()
    }

    /// A fresh connection for another handshake attempt.
    fn reconnect(&mut self) -> Result<(), Failure> {
        self.socket = connect(&self.target)?;
        self.poll.registry().register(
            &mut self.socket,
            SOCKET,
            Interest::READABLE | Interest::WRITABLE,
        )?;
        self.transport = Transport::Connecting;
        self.reply.clear();
        self.out.clear();
        self.sent = 0;
        Ok(())
    }

    /// The byte stream is up: the agent speaks first, so nothing is sent until its hello.
    fn open(&mut self) {
        self.transport = Transport::Open;
    }

    /// The agent's hello is accepted: our hello and proof, and the request behind them, in one
    /// write (the exec costs one round trip).
    fn start_exec(&mut self) -> Result<(), Failure> {
        let start = self.out.len();
        // Room for a request larger than one frame too: its argv and environment go as pieces
        // before the exec frame.
        self.out
            .resize(start + ClientSession::exec_buffer_len(&self.request), 0);
        let len = self
            .session
            .start_exec(&self.request, &mut self.out[start..])
            .map_err(session_failure);
        self.out.truncate(start + *len.as_ref().unwrap_or(&0));
        len?;
        self.flush()
    }

    /// Sends what is queued until the socket would block (its next writable edge resumes).
    fn flush(&mut self) -> Result<(), Failure> {
        while self.sent < self.out.len() {
            // NOTE: the Rust runtime ignores SIGPIPE, so an agent that hung up is an EPIPE
            // here; an embedder that does not ignore it sends with MSG_NOSIGNAL.
            match (&self.socket).write(&self.out[self.sent..]) {
                Ok(n) => self.sent += n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(err) => return Err(Failure(format!("sending to the agent: {err}"))),
            }
        }
        self.out.clear();
        self.sent = 0;
        Ok(())
    }

    /// Reads until the socket would block, handing what arrived to the session frame by frame.
    fn on_readable(&mut self) -> Result<Option<u8>, Failure> {
        loop {
            if self.transport == Transport::Handshake {
                if !self.receive_handshake()? {
                    return Ok(None);
                }
                // The agent's hello may have come with the handshake's reply.
                if let Some(code) = self.handle_input()? {
                    return Ok(Some(code));
                }
                continue;
            }
            // Room for the largest frame behind what is buffered: no read cut short.
            let spare = self
                .recv
                .spare_at_least(MAX_FRAME)
                .map_err(|err| Failure(format!("receive buffer: {err}")))?;
            match (&self.socket).read(spare) {
                Ok(0) => {
                    // The session says whether an end of stream here is an error.
                    let left = self.recv.data().len();
                    self.session.handle_eof(left).map_err(session_failure)?;
                    return Err(Failure::from("the agent closed the connection"));
                }
                Ok(n) => self.recv.commit(n),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(err) => return Err(Failure(format!("receiving from the agent: {err}"))),
            }
            if let Some(code) = self.handle_input()? {
                return Ok(Some(code));
            }
        }
    }

    /// Hands every whole frame in the receive buffer to the session.
    fn handle_input(&mut self) -> Result<Option<u8>, Failure> {
        loop {
            // `_at`: hearing the agent moves its liveness deadline (three keepalive intervals).
            let now = self.now();
            let Input { consumed, event } = self
                .session
                .handle_input_at(self.recv.data(), now)
                .map_err(session_failure)?;
            let mut accepted = false;
            let exit = match event {
                None if consumed == 0 => return Ok(None),
                // The output borrows the receive buffer: written out before it is consumed.
                Some(ClientEvent::Stdout(data)) => write_out(&mut self.stdout, data)?,
                Some(ClientEvent::Stderr(data)) => write_out(&mut self.stderr, data)?,
                Some(ClientEvent::Exited(end)) => Some(end.status.shell_code()),
                Some(ClientEvent::OutputDropped(dropped)) => {
                    eprintln!(
                        "epoll_exec: {:?}: {} bytes dropped (output cap)",
                        dropped.stream, dropped.bytes
                    );
                    None
                }
                Some(ClientEvent::Refused(err)) if err.code == ErrorCode::Unauthenticated => {
                    eprintln!(
                        "epoll_exec: the agent refused our proof ({}): set {} to its secret file",
                        err.message,
                        ferry_host::SECRET_FILE_ENV
                    );
                    Some(EXIT_FERRY)
                }
                Some(ClientEvent::Refused(err)) => {
                    let code = match err.code {
                        ErrorCode::NotFound => EXIT_NOT_FOUND,
                        ErrorCode::PermissionDenied
                        | ErrorCode::ExecFormat
                        | ErrorCode::BadCwd
                        | ErrorCode::SpawnFailed
                        | ErrorCode::ArgumentsTooLong
                        | ErrorCode::ResourceExhausted => EXIT_CANNOT_EXECUTE,
                        _ => EXIT_FERRY,
                    };
                    eprintln!(
                        "epoll_exec: {}: {} (errno {})",
                        self.program, err.message, err.errno
                    );
                    Some(code)
                }
                Some(ClientEvent::HelloAccepted(_)) => {
                    accepted = true;
                    None
                }
                // The agent's proof, started, credit: the session has noted them (the proof
                // and credit make `wants_stdin` true). `Done` ends only a kill-all, which this
                // example never sends: the session refuses it, and the frames of transfers,
                // info and the clock alike.
                _ => None,
            };
            self.recv.consume(consumed);
            if exit.is_some() {
                return Ok(exit);
            }
            if accepted {
                self.start_exec()?;
            }
        }
    }

    /// Hybrid vsock: reads the reply line; bytes after it already belong to the agent. `false`
    /// when the socket would block.
    fn receive_handshake(&mut self) -> Result<bool, Failure> {
        let mut buf = [0u8; MAX_HANDSHAKE_LINE];
        let n = match (&self.socket).read(&mut buf) {
            // A VMM closes the connection when nothing listens on the port (yet), and some drop
            // one spuriously: try again a few times, the pause growing, as ferry_host does.
            Ok(0) if self.handshake_retries < HANDSHAKE_RETRIES => {
                let pause = FIRST_RETRY_PAUSE * 2u32.pow(self.handshake_retries);
                self.handshake_retries += 1;
                self.retry_at = Some(Instant::now() + pause);
                self.poll.registry().deregister(&mut self.socket)?;
                return Ok(false);
            }
            Ok(0) => {
                return Err(Failure::from(
                    "the VMM closed the connection during the CONNECT handshake, every time",
                ))
            }
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => return Ok(true),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(err) => return Err(err.into()),
        };
        let got = &buf[..n];
        let Some(newline) = got.iter().position(|b| *b == b'\n') else {
            self.reply.extend_from_slice(got);
            if self.reply.len() > MAX_HANDSHAKE_LINE {
                return Err(Failure::from("the VMM sent an overlong handshake reply"));
            }
            return Ok(true);
        };
        self.reply.extend_from_slice(&got[..newline]);
        match self.reply.strip_prefix(b"OK ") {
            Some(n) if !n.is_empty() && n.iter().all(u8::is_ascii_digit) => {}
            _ => {
                return Err(Failure(format!(
                    "the VMM refused the vsock connection: {:?}",
                    String::from_utf8_lossy(&self.reply)
                )))
            }
        }
        let rest = &got[newline + 1..];
        if self.recv.feed(rest) != Ok(rest.len()) {
            return Err(Failure::from("receive buffer too small"));
        }
        self.open();
        self.flush()?;
        Ok(true)
    }

    /// Forwards one read of our stdin as one stdin frame, within credit; EOF closes the
    /// command's stdin.
    fn on_stdin(&mut self) -> Result<(), Failure> {
        if !self.wants_stdin() {
            return Ok(());
        }
        let take = self.session.stdin_credit().min(MAX_DATA);
        let buf = &mut self.stdin_frame[DATA_HEADROOM..DATA_HEADROOM + take];
        // Our stdin stays blocking; readiness (or a regular file) says one read will not block.
        match self.stdin_file.read(buf) {
            Ok(0) => {
                self.stop_stdin()?;
                self.session.close_stdin().map_err(session_failure)?;
                let mut eof = [0u8; 16];
                let len = self
                    .session
                    .poll_transmit(&mut eof)
                    .map_err(session_failure)?;
                self.out.extend_from_slice(&eof[..len]);
            }
            Ok(n) => {
                // Framed where it was read: the header goes into the headroom before it.
                let start = self
                    .session
                    .frame_stdin_in_place(&mut self.stdin_frame, n)
                    .map_err(session_failure)?;
                self.out
                    .extend_from_slice(&self.stdin_frame[start..DATA_HEADROOM + n]);
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(err) => {
                eprintln!("epoll_exec: reading stdin: {err}");
                self.stop_stdin()?;
                let _ = self.session.close_stdin();
                return Ok(());
            }
        }
        self.flush()
    }

    fn stop_stdin(&mut self) -> Result<(), Failure> {
        if let LocalStdin::Pollable { .. } = self.stdin {
            let fd = self.stdin_file.as_raw_fd();
            self.poll.registry().deregister(&mut SourceFd(&fd))?;
        }
        self.stdin = LocalStdin::Closed;
        Ok(())
    }
}

/// Starts a non-blocking connect to the target; the socket's first writable edge ends it.
fn connect(target: &Target) -> Result<UnixStream, Failure> {
    let connect_error = |err: io::Error| Failure(format!("cannot connect to {target}: {err}"));
    match target {
        Target::Unix(path) | Target::Hvsock { path, .. } => {
            UnixStream::connect(path).map_err(connect_error)
        }
        Target::Vsock { cid, port } => {
            // std and mio have no AF_VSOCK; socket2 does. The socket travels as a
            // `UnixStream`: read, write, readiness and SO_ERROR do not care about the family.
            use socket2::{Domain, SockAddr, Socket, Type};
            let socket = Socket::new(Domain::VSOCK, Type::STREAM.nonblocking(), None)
                .map_err(connect_error)?;
            match socket.connect(&SockAddr::vsock(*cid, *port)) {
                Ok(()) => {}
                Err(err) if err.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(err) => return Err(connect_error(err)),
            }
            let stream = std::os::unix::net::UnixStream::from(std::os::fd::OwnedFd::from(socket));
            Ok(UnixStream::from_std(stream))
        }
    }
}

/// Copies a chunk of output to our stdout or stderr; `Some(141)` when it was closed. Our own
/// fds stay blocking: a VMM would queue the bytes instead and stop reading the socket while
/// its queue is full.
fn write_out(to: &mut File, data: &[u8]) -> Result<Option<u8>, Failure> {
    match to.write_all(data) {
        Ok(()) => Ok(None),
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => Ok(Some(EXIT_BROKEN_PIPE)),
        Err(err) => Err(Failure(format!("writing output: {err}"))),
    }
}

/// What the session refused, with a hint where the fix is ours (the secret).
fn session_failure(err: SessionError) -> Failure {
    let env = ferry_host::SECRET_FILE_ENV;
    Failure(match err {
        SessionError::SecretRequired => {
            format!("{err}: set {env} to the agent's secret file")
        }
        SessionError::AgentInsecure => format!("{err} (unset {env} to talk to it anyway)"),
        SessionError::Unauthenticated => format!(
            "{err}: the agent could not prove that it holds the secret in {env} (not the \
             agent it claims to be, or the secrets differ)"
        ),
        err => err.to_string(),
    })
}

fn micros(duration: Duration) -> Micros {
    duration.as_micros().try_into().unwrap_or(Micros::MAX)
}

/// Why the example gives up (exit status 255).
#[derive(Debug)]
struct Failure(String);

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Failure {
    fn from(text: &str) -> Self {
        Failure(text.to_owned())
    }
}

impl From<io::Error> for Failure {
    fn from(err: io::Error) -> Self {
        Failure(err.to_string())
    }
}
