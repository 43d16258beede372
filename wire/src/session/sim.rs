//! A simulated pair (quinn-proto's `Pair`): a client session and an agent session joined by two
//! in-memory byte pipes, driven by a seeded random scheduler that chunks the byte streams at
//! random, interleaves the two directions at random, stalls either side at random, and bounds
//! each pipe like a socket buffer. The agent side runs a model command instead of a process.
//!
//! Every conversation must end — no deadlock, no livelock — with exactly the outcome the model
//! predicts, whatever the schedule. This is where the protocol's edge cases are tested without
//! processes. Each conversation runs against a secure agent (both ends share a secret, fresh
//! nonces per run) or an insecure one (neither has a secret).

use std::collections::VecDeque;
use std::vec::Vec;

use super::*;
use crate::limits::{MAX_DATA, MAX_FRAME, NONCE_LEN};
use crate::msg::{ErrorCode, ExecRequest, ExitStatus, Security, StdinMode, StrList};
use crate::recv::RecvBuf;
use crate::{DataKind, DATA_HEADROOM};

/// A small, fast, seedable PRNG (xorshift64*): the schedule of a failing run is replayed from
/// its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    /// A size with a heavy tail: mostly small, sometimes up to `max`.
    pub fn size(&mut self, max: usize) -> usize {
        match self.below(4) {
            0 => 1 + self.below(4.min(max)),
            1 => 1 + self.below(64.min(max)),
            2 => 1 + self.below(4096.min(max)),
            _ => 1 + self.below(max),
        }
    }
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// What the model command does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Program {
    /// Writes `stdout` and `stderr` (interleaved at random), then exits with `code`.
    Print {
        stdout: Vec<u8>,
        stderr: Vec<u8>,
        code: u8,
    },
    /// Copies stdin to stdout until EOF, then exits 0.
    Cat,
    /// Reads `take` bytes of stdin, then exits with 3 (the rest of stdin is discarded).
    Head { take: usize },
    /// Dies of `signal` at once.
    Killed { signal: u8 },
    /// Does not exist: the agent refuses with `NotFound`.
    Missing,
    /// Exits 0 at once, but something it left behind keeps writing `flood` bytes to stdout
    /// afterwards: the drain limit cuts it.
    Flood { flood: usize },
    /// Not a program: the client asks for a kill-all, the agent reports `count` processes.
    KillAll { count: u32 },
}

/// Whether the agent checks who connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Both ends know the same secret: the client proves it, then the agent does.
    Secure,
    /// Neither has a secret; the agent announces it runs insecure.
    Insecure,
}

/// One conversation: the program and, for stdin-reading ones, what the client sends.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub program: Program,
    pub stdin: Option<Vec<u8>>,
    pub mode: Mode,
}

/// How a conversation ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub started: bool,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub end: End,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The termination record (duration left out: it depends on the schedule).
    Exited {
        status: ExitStatus,
        output_dropped: bool,
    },
    /// The agent's error frame.
    Refused(ErrorCode),
    /// The kill-all's report.
    Done(u32),
}

/// The agent's policy in the simulation: a small drain limit so floods are cheap.
pub const SIM_DRAIN_LIMIT: usize = 100_000;

impl Scenario {
    pub fn random(rng: &mut Rng, mode: Mode) -> Scenario {
        let program = match rng.below(8) {
            0 | 1 => {
                let out = rng.size(100_000);
                let err = if rng.chance(50) { rng.size(20_000) } else { 0 };
                Program::Print {
                    stdout: rng.bytes(out),
                    stderr: rng.bytes(err),
                    code: rng.below(256) as u8,
                }
            }
            2 | 3 => Program::Cat,
            4 => Program::Head {
                take: rng.below(100_000),
            },
            5 => {
                if rng.chance(50) {
                    Program::Killed {
                        signal: 1 + rng.below(31) as u8,
                    }
                } else {
                    Program::Missing
                }
            }
            6 => Program::Flood {
                flood: SIM_DRAIN_LIMIT + rng.size(100_000),
            },
            _ => Program::KillAll {
                count: rng.below(10) as u32,
            },
        };
        let stdin = match program {
            Program::Cat | Program::Head { .. } => {
                let len = if rng.chance(10) { 0 } else { rng.size(200_000) };
                Some(rng.bytes(len))
            }
            _ => None,
        };
        Scenario {
            program,
            stdin,
            mode,
        }
    }

    /// What the client must see, whatever the schedule. For a flood, the output is checked
    /// as a prefix separately (where the cut falls depends on the schedule).
    pub fn expected(&self) -> Outcome {
        let exited = |code| End::Exited {
            status: ExitStatus::Code(code),
            output_dropped: false,
        };
        let stdin = self.stdin.clone().unwrap_or_default();
        let (stdout, stderr, end, started) = match &self.program {
            Program::Print {
                stdout,
                stderr,
                code,
            } => (stdout.clone(), stderr.clone(), exited(*code), true),
            Program::Cat => (stdin, Vec::new(), exited(0), true),
            Program::Head { .. } => (Vec::new(), Vec::new(), exited(3), true),
            Program::Killed { signal } => (
                Vec::new(),
                Vec::new(),
                End::Exited {
                    status: ExitStatus::Signal {
                        number: *signal,
                        core_dumped: false,
                    },
                    output_dropped: false,
                },
                true,
            ),
            Program::Missing => (
                Vec::new(),
                Vec::new(),
                End::Refused(ErrorCode::NotFound),
                false,
            ),
            Program::Flood { .. } => (
                Vec::new(),
                Vec::new(),
                End::Exited {
                    status: ExitStatus::Code(0),
                    output_dropped: true,
                },
                true,
            ),
            Program::KillAll { count } => (Vec::new(), Vec::new(), End::Done(*count), false),
        };
        Outcome {
            started,
            stdout,
            stderr,
            end,
        }
    }
}

fn scenario_argv(program: &Program) -> &'static [u8] {
    match program {
        Program::Print { .. } => b"print\0",
        Program::Cat => b"cat\0",
        Program::Head { .. } => b"head\0",
        Program::Killed { .. } => b"killed\0",
        Program::Missing => b"missing\0",
        Program::Flood { .. } => b"flood\0",
        Program::KillAll { .. } => b"",
    }
}

/// A byte pipe with a capacity, like one direction of a socket.
#[derive(Debug, Default)]
struct Wire {
    bytes: VecDeque<u8>,
    capacity: usize,
    closed: bool,
}

impl Wire {
    fn room(&self) -> usize {
        self.capacity.saturating_sub(self.bytes.len())
    }
    /// Writes up to `max` of `data`; returns how many were taken.
    fn write(&mut self, data: &[u8], max: usize) -> usize {
        let n = data.len().min(self.room()).min(max);
        self.bytes.extend(&data[..n]);
        n
    }
    fn read(&mut self, into: &mut [u8], max: usize) -> usize {
        let n = into.len().min(self.bytes.len()).min(max);
        for (slot, byte) in into.iter_mut().zip(self.bytes.drain(..n)) {
            *slot = byte;
        }
        n
    }
}

/// Bytes a side has encoded and not yet pushed into its wire.
#[derive(Debug, Default)]
struct Outbox {
    buf: Vec<u8>,
    sent: usize,
}

impl Outbox {
    fn is_empty(&self) -> bool {
        self.sent == self.buf.len()
    }
    fn push(&mut self, wire: &mut Wire, rng: &mut Rng) -> bool {
        let n = wire.write(&self.buf[self.sent..], rng.size(MAX_FRAME));
        self.sent += n;
        if self.is_empty() {
            self.buf.clear();
            self.sent = 0;
        }
        n > 0
    }
}

/// The client side: a ClientSession driven the way the host library drives it.
struct Client {
    session: ClientSession,
    recv: RecvBuf<Vec<u8>>,
    out: Outbox,
    frame: Vec<u8>,
    /// The operation, started once the agent's hello is in.
    program: Program,
    stdin_mode: StdinMode,
    stdin: Option<(Vec<u8>, usize)>,
    outcome: Outcome,
    /// The agent proved the secret (secure), or announced it has none (insecure).
    authenticated: bool,
    ended: Option<Result<(), SessionError>>,
}

/// The agent side: an AgentSession driven the way the agent's pump drives it, with a model
/// command in place of a process.
struct Agent {
    session: AgentSession,
    recv: RecvBuf<Vec<u8>>,
    out: Outbox,
    frame: Vec<u8>,
    /// What an exec runs (the model agent has no PATH).
    program: Program,
    command: Option<Command>,
    closed: bool,
}

/// The model command: its pipes are queues.
struct Command {
    program: Program,
    /// Stdin received and not yet "written to the pipe".
    stdin_buffered: VecDeque<u8>,
    stdin_eof: bool,
    /// Bytes the command has read from stdin.
    stdin_read: usize,
    stdout_pipe: VecDeque<u8>,
    stderr_pipe: VecDeque<u8>,
    /// Output the command has yet to write.
    to_write: (Vec<u8>, usize, Vec<u8>, usize),
    exited: bool,
    /// Output written after the exit by what it left behind.
    flood_left: usize,
    pipes_closed: bool,
}

const PIPE_CAPACITY: usize = 64 * 1024;

impl Command {
    fn new(program: Program) -> Command {
        let (out, err) = match &program {
            Program::Print { stdout, stderr, .. } => (stdout.clone(), stderr.clone()),
            _ => (Vec::new(), Vec::new()),
        };
        let flood_left = match program {
            Program::Flood { flood } => flood,
            _ => 0,
        };
        Command {
            program,
            stdin_buffered: VecDeque::new(),
            stdin_eof: false,
            stdin_read: 0,
            stdout_pipe: VecDeque::new(),
            stderr_pipe: VecDeque::new(),
            to_write: (out, 0, err, 0),
            exited: false,
            flood_left,
            pipes_closed: false,
        }
    }

    /// Runs the command a little; returns its exit status when it exits now.
    fn step(&mut self, rng: &mut Rng, session: &mut AgentSession) -> Option<ExitStatus> {
        if self.exited {
            if self.flood_left > 0 && !self.pipes_closed {
                // It writes as fast as the pipe takes it: never seen idle.
                let n = self.flood_left.min(PIPE_CAPACITY - self.stdout_pipe.len());
                self.stdout_pipe.extend(core::iter::repeat_n(b'f', n));
                self.flood_left -= n;
            }
            return None;
        }
        match self.program.clone() {
            Program::Print { code, .. } => {
                let (out, out_at, err, err_at) = &mut self.to_write;
                let to_stdout = rng.chance(50);
                let (src, at, pipe) = if to_stdout {
                    (&*out, &mut *out_at, &mut self.stdout_pipe)
                } else {
                    (&*err, &mut *err_at, &mut self.stderr_pipe)
                };
                let n = rng
                    .size(PIPE_CAPACITY)
                    .min(src.len() - *at)
                    .min(PIPE_CAPACITY - pipe.len());
                pipe.extend(&src[*at..*at + n]);
                *at += n;
                (*out_at == out.len() && *err_at == err.len()).then_some(ExitStatus::Code(code))
            }
            Program::Cat => {
                let n = rng
                    .size(PIPE_CAPACITY)
                    .min(self.stdin_buffered.len())
                    .min(PIPE_CAPACITY - self.stdout_pipe.len());
                self.stdout_pipe.extend(self.stdin_buffered.drain(..n));
                self.stdin_read += n;
                session.stdin_consumed(n);
                (self.stdin_eof && self.stdin_buffered.is_empty()).then_some(ExitStatus::Code(0))
            }
            Program::Head { take } => {
                let n = rng
                    .size(PIPE_CAPACITY)
                    .min(self.stdin_buffered.len())
                    .min(take - self.stdin_read);
                self.stdin_buffered.drain(..n);
                self.stdin_read += n;
                session.stdin_consumed(n);
                (self.stdin_read == take || (self.stdin_eof && self.stdin_buffered.is_empty()))
                    .then_some(ExitStatus::Code(3))
            }
            Program::Killed { signal } => Some(ExitStatus::Signal {
                number: signal,
                core_dumped: false,
            }),
            Program::Flood { .. } => Some(ExitStatus::Code(0)),
            Program::Missing | Program::KillAll { .. } => None,
        }
    }

    /// Stdin nobody will read any more: discarded, credited back.
    fn discard_stdin(&mut self, session: &mut AgentSession) {
        session.stdin_consumed(self.stdin_buffered.len());
        self.stdin_buffered.clear();
    }
}

/// The simulation's result: the client's outcome and how the client session ended.
pub struct Run {
    pub outcome: Outcome,
    pub client_end: Result<(), SessionError>,
    /// Whether the client session reported the agent authenticated by the end.
    pub authenticated: bool,
    pub steps: usize,
}

/// The secret both ends of a secure simulated pair share.
const SIM_SECRET: &[u8] = b"the simulated VM's secret";

/// Runs one conversation under the schedule drawn from `seed`.
pub fn run(scenario: &Scenario, seed: u64, max_steps: usize) -> Result<Run, String> {
    let mut rng = Rng::new(seed);
    let mut now: Micros = 1_000;
    let config = AgentConfig {
        agent_version: "sim",
        drain_limit: SIM_DRAIN_LIMIT,
        ..AgentConfig::DEFAULT
    };
    let mut c2a = Wire {
        capacity: 16 + rng.size(256 * 1024),
        ..Wire::default()
    };
    let mut a2c = Wire {
        capacity: 16 + rng.size(256 * 1024),
        ..Wire::default()
    };
    // Fresh nonces for every run, as from the OS's random source.
    let mut nonce = || -> [u8; NONCE_LEN] {
        let mut nonce = [0u8; NONCE_LEN];
        for chunk in nonce.chunks_mut(8) {
            chunk.copy_from_slice(&rng.next().to_le_bytes());
        }
        nonce
    };
    let secret = match scenario.mode {
        Mode::Secure => Some(Secret::new(SIM_SECRET).map_err(|e| format!("secret: {e}"))?),
        Mode::Insecure => None,
    };
    let client_auth = ClientAuth {
        nonce: nonce(),
        secret: secret.clone(),
    };
    let agent_auth = AgentAuth {
        nonce: nonce(),
        secret,
    };
    let stdin_mode = if scenario.stdin.is_some() {
        StdinMode::Pipe
    } else {
        StdinMode::Null
    };
    let mut client = Client {
        session: ClientSession::new(now, Some(60_000_000), client_auth),
        recv: RecvBuf::new(vec![0u8; 2 * MAX_FRAME]),
        out: Outbox::default(),
        frame: vec![0u8; MAX_FRAME],
        program: scenario.program.clone(),
        stdin_mode,
        stdin: scenario.stdin.clone().map(|bytes| (bytes, 0)),
        outcome: Outcome {
            started: false,
            stdout: Vec::new(),
            stderr: Vec::new(),
            end: End::Refused(ErrorCode::Internal),
        },
        authenticated: false,
        ended: None,
    };
    let mut agent = Agent {
        session: AgentSession::new(config, now, agent_auth),
        recv: RecvBuf::new(vec![0u8; MAX_FRAME]),
        out: Outbox::default(),
        frame: vec![0u8; MAX_FRAME],
        program: scenario.program.clone(),
        command: None,
        closed: false,
    };

    // The agent speaks first; the client starts its operation once the agent's hello is in
    // (see `client_step`).
    // Stalls: a side skips its turns for a while.
    let mut client_stall = 0usize;
    let mut agent_stall = 0usize;
    for step in 0..max_steps {
        now += rng.below(50) as u64;
        if client.ended.is_some() && agent.closed {
            return Ok(Run {
                outcome: client.outcome,
                client_end: client.ended.unwrap_or(Ok(())),
                authenticated: client.authenticated,
                steps: step,
            });
        }
        if rng.chance(2) {
            client_stall = rng.size(200);
        }
        if rng.chance(2) {
            agent_stall = rng.size(200);
        }
        // Random delivery order: either side may go first this round.
        let client_first = rng.chance(50);
        for turn in 0..2 {
            if (turn == 0) == client_first {
                if client_stall > 0 {
                    client_stall -= 1;
                } else {
                    client_step(&mut client, &mut c2a, &mut a2c, &mut rng, now)?;
                }
            } else if agent_stall > 0 {
                agent_stall -= 1;
            } else {
                agent_step(&mut agent, &mut c2a, &mut a2c, &mut rng, now)?;
            }
        }
    }
    Err(format!(
        "no end after {max_steps} steps: client {:?} (credit {}), agent {:?}, wires c2a {} a2c {}",
        client.session.phase(),
        client.session.stdin_credit(),
        agent.session.phase(),
        c2a.bytes.len(),
        a2c.bytes.len()
    ))
}

fn client_step(
    client: &mut Client,
    c2a: &mut Wire,
    a2c: &mut Wire,
    rng: &mut Rng,
    now: Micros,
) -> Result<(), String> {
    if client.ended.is_some() {
        // The host library closes its socket once the operation is over.
        c2a.closed = true;
        a2c.bytes.clear();
        return Ok(());
    }
    client
        .session
        .handle_timeout(now)
        .map_err(|e| format!("client timeout: {e}"))?;
    // Stdin within credit, in random pieces.
    if client.out.is_empty() {
        if let Some((bytes, sent)) = client.stdin.as_mut() {
            if *sent < bytes.len() && client.session.stdin_open() {
                let piece = rng.size(bytes.len() - *sent);
                let written = client
                    .session
                    .send_stdin(&bytes[*sent..*sent + piece], &mut client.frame)
                    .map_err(|e| format!("send_stdin: {e}"))?;
                *sent += written.taken;
                client
                    .out
                    .buf
                    .extend_from_slice(&client.frame[..written.written]);
            }
            if *sent == bytes.len() && client.session.stdin_open() {
                let _ = client.session.close_stdin();
            }
        }
        let n = client
            .session
            .poll_transmit(&mut client.frame)
            .map_err(|e| format!("client poll_transmit: {e}"))?;
        client.out.buf.extend_from_slice(&client.frame[..n]);
    }
    if !c2a.closed {
        client.out.push(c2a, rng);
    }
    // Read a random amount, then handle every whole frame.
    let spare = client
        .recv
        .spare()
        .map_err(|e| format!("client recv: {e}"))?;
    let n = a2c.read(spare, rng.size(MAX_FRAME));
    client.recv.commit(n);
    loop {
        let input = match client.session.handle_input(client.recv.data()) {
            Ok(input) => input,
            Err(err) => {
                client.ended = Some(Err(err));
                return Ok(());
            }
        };
        let consumed = input.consumed;
        match input.event {
            None if consumed == 0 => break,
            None => {}
            Some(ClientEvent::HelloAccepted(info)) => {
                let security = announced_security(&client.session, &info)?;
                client.authenticated = security == Security::Insecure;
                start_operation(client, rng)?;
            }
            Some(ClientEvent::Authenticated) => {
                if client.authenticated {
                    return Err("the agent proved itself twice".into());
                }
                client.authenticated = true;
            }
            Some(ClientEvent::StdinCredit { .. }) => {}
            Some(ClientEvent::OutputDropped(_)) => {
                return Err("output dropped without an output cap".into())
            }
            Some(ClientEvent::Started { .. }) => {
                if !client.authenticated {
                    return Err("started before the agent proved itself".into());
                }
                client.outcome.started = true
            }
            Some(ClientEvent::Done(report)) => {
                if !client.authenticated {
                    return Err("done before the agent proved itself".into());
                }
                client.outcome.end = End::Done(report.count);
                client.ended = Some(Ok(()));
            }
            Some(ClientEvent::Stdout(data)) => client.outcome.stdout.extend_from_slice(data),
            Some(ClientEvent::Stderr(data)) => client.outcome.stderr.extend_from_slice(data),
            Some(ClientEvent::Exited(end)) => {
                client.outcome.end = End::Exited {
                    status: end.status,
                    output_dropped: end.output_dropped,
                };
                client.ended = Some(Ok(()));
            }
            Some(ClientEvent::Refused(err)) => {
                client.outcome.end = End::Refused(err.code);
                client.ended = Some(Ok(()));
            }
        }
        client.recv.consume(consumed);
        if client.ended.is_some() {
            return Ok(());
        }
    }
    if a2c.closed && a2c.bytes.is_empty() {
        let left = client.recv.data().len();
        client.ended = Some(client.session.handle_eof(left));
    }
    Ok(())
}

/// The security the agent announced, checked against what the session reports.
fn announced_security(session: &ClientSession, info: &AgentInfo<'_>) -> Result<Security, String> {
    if info.protocol_version != crate::PROTOCOL_VERSION {
        return Err(format!("negotiated v{}", info.protocol_version));
    }
    if session.is_authenticated() != (info.security == Security::Insecure) {
        return Err("authenticated before the agent's proof".into());
    }
    Ok(info.security)
}

/// Starts the scenario's operation behind our hello (and proof), as the host library does: in
/// one write, or (at random) after our hello went out on its own.
fn start_operation(client: &mut Client, rng: &mut Rng) -> Result<(), String> {
    if rng.chance(30) {
        let n = client
            .session
            .poll_transmit(&mut client.frame)
            .map_err(|e| format!("client poll_transmit: {e}"))?;
        client.out.buf.extend_from_slice(&client.frame[..n]);
    }
    let n = match client.program {
        Program::KillAll { .. } => client.session.start_kill_all(&mut client.frame),
        ref program => {
            let request = ExecRequest {
                argv: StrList::new(scenario_argv(program)),
                env: StrList::default(),
                clean_env: false,
                cwd: None,
                stdin: client.stdin_mode,
                user: None,
                pty: None,
                timeout_ms: 0,
                kill_grace_ms: None,
                kill_tree_on_exit: false,
                max_output: 0,
            };
            client.session.start_exec(&request, &mut client.frame)
        }
    }
    .map_err(|e| format!("starting the operation: {e}"))?;
    client.out.buf.extend_from_slice(&client.frame[..n]);
    Ok(())
}

fn agent_step(
    agent: &mut Agent,
    c2a: &mut Wire,
    a2c: &mut Wire,
    rng: &mut Rng,
    now: Micros,
) -> Result<(), String> {
    if agent.closed {
        return Ok(());
    }
    let _ = agent.session.handle_timeout(now);
    // Receive.
    if !agent.session.is_closing() {
        if c2a.closed && c2a.bytes.is_empty() {
            let result = agent.session.handle_eof();
            if result.is_err() {
                // A disconnect ends the command (the agent kills its process group).
                agent.command = None;
            }
            agent.closed = true;
            a2c.closed = true;
            return Ok(());
        }
        let spare = agent.recv.spare().map_err(|e| format!("agent recv: {e}"))?;
        let n = c2a.read(spare, rng.size(MAX_FRAME));
        agent.recv.commit(n);
        loop {
            let input = match agent.session.handle_input(agent.recv.data(), now) {
                Ok(input) => input,
                Err(err) => return Err(format!("the agent refused the client: {err}")),
            };
            let consumed = input.consumed;
            match input.event {
                None if consumed == 0 => break,
                None | Some(AgentEvent::Hello) | Some(AgentEvent::Authenticated) => {}
                Some(
                    AgentEvent::ExecPart { .. }
                    | AgentEvent::Signal(_)
                    | AgentEvent::Resize(_)
                    | AgentEvent::Cancel { .. },
                ) => return Err("the client sent a frame it never sends here".into()),
                Some(AgentEvent::KillAll) => match agent.program {
                    Program::KillAll { count } => agent
                        .session
                        .done(count, now)
                        .map_err(|e| format!("done: {e}"))?,
                    _ => return Err("the agent received a kill-all".into()),
                },
                Some(AgentEvent::Exec(valid)) => {
                    let program = agent.program.clone();
                    if valid.request().argv.as_bytes() != scenario_argv(&program) {
                        return Err("the agent received another argv".into());
                    }
                    if program == Program::Missing {
                        let refusal = Refusal::os(ErrorCode::NotFound, 2, "no such program");
                        agent
                            .session
                            .refuse(refusal, now)
                            .map_err(|e| format!("refuse: {e}"))?;
                    } else {
                        agent
                            .session
                            .started(4242, now)
                            .map_err(|e| format!("started: {e}"))?;
                        agent.command = Some(Command::new(program));
                    }
                }
                Some(AgentEvent::Stdin(data)) => match agent.command.as_mut() {
                    Some(command) if !command.exited => command.stdin_buffered.extend(data),
                    // Nobody reads it: credited back at once.
                    _ => agent.session.stdin_consumed(data.len()),
                },
                Some(AgentEvent::StdinEof) => {
                    if let Some(command) = agent.command.as_mut() {
                        command.stdin_eof = true;
                    }
                }
            }
            agent.recv.consume(consumed);
        }
    }
    // Run the command and move its output.
    if let Some(command) = agent.command.as_mut() {
        if let Some(status) = command.step(rng, &mut agent.session) {
            command.exited = true;
            command.discard_stdin(&mut agent.session);
            agent
                .session
                .child_exited(status, now)
                .map_err(|e| format!("child_exited: {e}"))?;
        }
        if command.exited {
            command.discard_stdin(&mut agent.session);
        }
    }
    if agent.out.is_empty() {
        let n = agent
            .session
            .poll_transmit(&mut agent.frame)
            .map_err(|e| format!("agent poll_transmit: {e}"))?;
        if n > 0 {
            agent.out.buf.extend_from_slice(&agent.frame[..n]);
        } else if let Some(command) = agent.command.as_mut() {
            let finished = move_output(
                command,
                &mut agent.session,
                &mut agent.out,
                &mut agent.frame,
                rng,
                now,
            )?;
            if finished {
                agent.command = None;
            }
        }
    }
    agent.out.push(a2c, rng);
    if agent.session.is_closed() && agent.out.is_empty() {
        agent.closed = true;
        a2c.closed = true;
    }
    Ok(())
}

/// One output frame from a pipe, as the pump does it; finishes the operation once the command
/// exited and its pipes are done.
fn move_output(
    command: &mut Command,
    session: &mut AgentSession,
    out: &mut Outbox,
    frame: &mut [u8],
    rng: &mut Rng,
    now: Micros,
) -> Result<bool, String> {
    let phase = session.output_phase(now);
    if phase == OutputPhase::Closed {
        command.pipes_closed = true;
        command.stdout_pipe.clear();
    }
    let order = if rng.chance(50) {
        [DataKind::Stdout, DataKind::Stderr]
    } else {
        [DataKind::Stderr, DataKind::Stdout]
    };
    if !command.pipes_closed {
        for kind in order {
            let pipe = match kind {
                DataKind::Stderr => &mut command.stderr_pipe,
                _ => &mut command.stdout_pipe,
            };
            let n = rng.size(MAX_DATA).min(pipe.len());
            if n == 0 {
                continue;
            }
            for (slot, byte) in frame[DATA_HEADROOM..].iter_mut().zip(pipe.drain(..n)) {
                *slot = byte;
            }
            let start = session
                .frame_output(frame, kind, n, 0)
                .map_err(|e| format!("frame_output: {e}"))?;
            out.buf.extend_from_slice(&frame[start..DATA_HEADROOM + n]);
            return Ok(false);
        }
    }
    // Pipes empty: once the command exited (and whatever it left behind is done or cut), the
    // operation is over.
    // Past the grace period an idle pipe is closed, whatever might still write to it.
    let leftovers_done =
        command.flood_left == 0 || command.pipes_closed || phase == OutputPhase::Drain;
    if command.exited && leftovers_done {
        session.finish(now).map_err(|e| format!("finish: {e}"))?;
        let n = session
            .poll_transmit(frame)
            .map_err(|e| format!("agent poll_transmit: {e}"))?;
        out.buf.extend_from_slice(&frame[..n]);
        return Ok(true);
    }
    Ok(false)
}
