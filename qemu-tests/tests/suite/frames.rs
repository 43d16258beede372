//! The protocol by hand: a client's frames as bytes, and a connection that cuts what the agent
//! sends into whole frames through [`RecvBuf`]. For the suite's raw scenarios (`raw.rs`) and for
//! `host/tests/hostile.rs`, which includes this file on its own with `#[path]`: it must use
//! nothing but std and `ferry_wire`, and nothing else of the suite.
#![allow(clippy::unwrap_used)] // a test reports failure by panicking

use std::io::{ErrorKind, Read, Write};
use std::marker::PhantomData;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use ferry_wire::limits::MAX_FRAME;
use ferry_wire::{
    decode_agent_frame, encode_client_frame, AgentFrame, ClientFrame, ClientHello, ExecRequest,
    RecvBuf, StdinMode, StrList,
};

/// `frame` as it goes on the wire, length prefix included.
pub fn encode(frame: &ClientFrame<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_FRAME];
    let n = encode_client_frame(frame, &mut buf).unwrap();
    buf.truncate(n);
    buf
}

/// The current client hello, encoded.
pub fn hello() -> Vec<u8> {
    encode(&ClientFrame::Hello(ClientHello::CURRENT))
}

/// An exec of `argv` (NUL-terminated entries).
pub fn exec(argv: &[u8], stdin: StdinMode) -> ExecRequest<'_> {
    ExecRequest {
        argv: StrList::new(argv),
        env: StrList::default(),
        clean_env: false,
        cwd: None,
        stdin,
        user: None,
        pty: None,
        timeout_ms: 0,
        kill_grace_ms: None,
        kill_tree_on_exit: false,
        max_output: 0,
    }
}

/// A fresh nonce for a client session, from std alone (`RandomState` is seeded from the OS's
/// random source) and a counter: fresh enough for a test's connection.
pub fn nonce() -> [u8; ferry_wire::limits::NONCE_LEN] {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut nonce = [0u8; ferry_wire::limits::NONCE_LEN];
    let state = std::collections::hash_map::RandomState::new();
    for (i, chunk) in nonce.chunks_mut(8).enumerate() {
        let mut hasher = state.build_hasher();
        hasher.write_u64(NEXT.fetch_add(1, Ordering::Relaxed));
        hasher.write_usize(i);
        chunk.copy_from_slice(&hasher.finish().to_le_bytes()[..chunk.len()]);
    }
    nonce
}

/// One connection to the agent, driven by hand: raw bytes out, whole frames in, each turned into
/// `S`, the includer's own record of what the agent sent.
pub struct Raw<S> {
    pub stream: UnixStream,
    pub recv: RecvBuf<Vec<u8>>,
    /// How long any read waits unless told otherwise: a test that waits this long has failed.
    patience: Duration,
    /// The last frame ended its operation (protocol 5: the agent then keeps the connection
    /// for the next one instead of closing it).
    pub ended: bool,
    seen: PhantomData<fn() -> S>,
}

impl<S> Raw<S> {
    /// Wraps a connected `stream`; reads and writes wait at most `patience`.
    pub fn new(stream: UnixStream, patience: Duration) -> Raw<S> {
        stream.set_read_timeout(Some(patience)).unwrap();
        stream.set_write_timeout(Some(patience)).unwrap();
        Raw {
            ended: false,
            stream,
            recv: RecvBuf::new(vec![0; MAX_FRAME]),
            patience,
            seen: PhantomData,
        }
    }

    /// Sends `bytes`. The agent may close before reading everything: a failed write is an
    /// answer too, so it is not an error here.
    pub fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    pub fn send_frame(&mut self, frame: &ClientFrame<'_>) {
        self.send(&encode(frame));
    }

    /// Reads once into the receive buffer; 0 at the end of the stream. A reset counts as the
    /// end: the agent hung up with our unread bytes in its buffer, and what it sent before that
    /// is still delivered first. `None` when nothing came within `wait`.
    pub fn fill(&mut self, wait: Duration) -> Option<usize> {
        self.stream.set_read_timeout(Some(wait)).unwrap();
        let spare = self
            .recv
            .spare()
            .expect("the agent sent a frame larger than the protocol's");
        let read = self.stream.read(spare);
        self.stream.set_read_timeout(Some(self.patience)).unwrap();
        match read {
            Ok(n) => {
                self.recv.commit(n);
                Some(n)
            }
            Err(err) if err.kind() == ErrorKind::ConnectionReset => Some(0),
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
            Err(err) => panic!("reading from the agent: {err}"),
        }
    }
}

impl<S: for<'a> From<AgentFrame<'a>>> Raw<S> {
    /// The next whole frame within `wait`: `Ok(Some)`, `Ok(None)` when the agent closed between
    /// frames (a partial frame at the end fails the test), `Err(())` when nothing (more) came in
    /// time.
    pub fn next_frame_within(&mut self, wait: Duration) -> Result<Option<S>, ()> {
        let deadline = Instant::now() + wait;
        loop {
            let next = self.recv.next_frame();
            let next = next.expect("the agent sent a frame larger than the protocol's");
            if let Some(body) = next {
                let frame = decode_agent_frame(body).expect("the agent sent an undecodable frame");
                self.ended = matches!(
                    frame,
                    AgentFrame::Exited(_)
                        | AgentFrame::Done(_)
                        | AgentFrame::FileDone(_)
                        | AgentFrame::ClockSet(_)
                        | AgentFrame::Error(_)
                );
                return Ok(Some(frame.into()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.fill(left.max(Duration::from_millis(1))) {
                Some(0) => {
                    assert!(self.recv.data().is_empty(), "the agent closed mid-frame");
                    return Ok(None);
                }
                Some(_) => {}
                None => return Err(()),
            }
        }
    }

    /// The next whole frame, or `None` once the agent has closed.
    pub fn next_frame(&mut self) -> Option<S> {
        self.next_frame_within(self.patience)
            .expect("the agent neither answered nor closed")
    }

    /// Everything the agent sends until it closes the connection, or until the operation's
    /// last frame (protocol 5: the agent keeps the connection for the next operation).
    pub fn frames_until_closed(&mut self) -> Vec<S> {
        self.ended = false;
        std::iter::from_fn(|| (!self.ended).then(|| self.next_frame()).flatten()).collect()
    }
}

/// A put or a get driven through [`ClientSession`] (which checks every frame the agent sends),
/// blocking, on one connection: for the transfer scenarios and `host/tests/files_agent.rs`,
/// before (and below) the host library's own API.
#[allow(dead_code)] // an includer may not transfer
pub struct Transfer {
    pub stream: UnixStream,
    pub session: ferry_wire::session::ClientSession,
    pub recv: RecvBuf<Vec<u8>>,
    out: Vec<u8>,
    /// The agent's `FileReady`, once it came.
    pub header: Option<ferry_wire::FileHeader>,
}

/// How a transfer ended.
#[allow(dead_code)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done(ferry_wire::FileSummary),
    Refused(ferry_wire::ErrorCode, String),
    /// The agent closed without a last frame.
    Closed,
}

#[allow(dead_code)]
impl Outcome {
    /// The refusal's code (the test fails on anything else).
    pub fn code(&self) -> ferry_wire::ErrorCode {
        match self {
            Outcome::Refused(code, _) => *code,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}

#[allow(dead_code)]
enum Step {
    Credit,
    End(Outcome),
}

#[allow(dead_code)]
impl Transfer {
    /// Takes the agent's hello from `stream` into a session that proves `secret`.
    pub fn open(stream: UnixStream, secret: Option<ferry_wire::session::Secret>) -> Transfer {
        use ferry_wire::session::{ClientAuth, ClientEvent, ClientSession};
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        stream
            .set_write_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let auth = ClientAuth {
            nonce: nonce(),
            secret,
        };
        let mut transfer = Transfer {
            stream,
            session: ClientSession::new(0, None, auth),
            recv: RecvBuf::new(vec![0; MAX_FRAME]),
            out: vec![0; MAX_FRAME],
            header: None,
        };
        loop {
            let input = transfer.session.handle_input(transfer.recv.data()).unwrap();
            if input.consumed > 0 {
                let hello = matches!(input.event, Some(ClientEvent::HelloAccepted(_)));
                assert!(hello, "the agent's first frame is not its hello");
                transfer.recv.consume(input.consumed);
                return transfer;
            }
            assert!(transfer.read() > 0, "the agent closed before its hello");
        }
    }

    /// Sends the hello, the proof and `request`.
    pub fn start_put(&mut self, request: &ferry_wire::PutRequest<'_>) {
        let n = self.session.start_put(request, &mut self.out).unwrap();
        let _ = self.stream.write_all(&self.out[..n]);
    }

    /// Sends the hello, the proof and `request`.
    pub fn start_get(&mut self, request: &ferry_wire::GetRequest<'_>) {
        let n = self.session.start_get(request, &mut self.out).unwrap();
        let _ = self.stream.write_all(&self.out[..n]);
    }

    /// Sends `data` as content within credit, reading the agent's frames when out of it.
    /// `Some` when the agent ended the transfer first (or a send failed: what it said).
    pub fn send_content(&mut self, mut data: &[u8]) -> Option<Outcome> {
        while !data.is_empty() {
            if self.session.stdin_credit() == 0 {
                match self.step(&mut |_| {}, true) {
                    Step::Credit => continue,
                    Step::End(outcome) => return Some(outcome),
                }
            }
            let sent = self.session.send_stdin(data, &mut self.out).unwrap();
            if self.stream.write_all(&self.out[..sent.written]).is_err() {
                return Some(self.finish(&mut |_| {}));
            }
            data = &data[sent.taken..];
        }
        None
    }

    /// Sends the end of a put's content with `sha256`.
    pub fn end_put(&mut self, sha256: &[u8; 32]) {
        let n = self.session.end_put(sha256, &mut self.out).unwrap();
        let _ = self.stream.write_all(&self.out[..n]);
    }

    /// Reads to the transfer's end; a get's content goes to `sink`.
    pub fn finish(&mut self, sink: &mut dyn FnMut(&[u8])) -> Outcome {
        match self.step(sink, false) {
            Step::End(outcome) => outcome,
            Step::Credit => unreachable!(),
        }
    }

    /// Reads once; 0 at the end of the stream (a reset included).
    fn read(&mut self) -> usize {
        let spare = self.recv.spare().unwrap();
        match self.stream.read(spare) {
            Ok(n) => {
                self.recv.commit(n);
                n
            }
            Err(err) if err.kind() == ErrorKind::ConnectionReset => 0,
            Err(err) => panic!("reading from the agent: {err}"),
        }
    }

    fn step(&mut self, sink: &mut dyn FnMut(&[u8]), stop_at_credit: bool) -> Step {
        use ferry_wire::session::ClientEvent;
        loop {
            let input = self.session.handle_input(self.recv.data());
            let input = input.unwrap_or_else(|err| panic!("the agent broke the protocol: {err}"));
            let consumed = input.consumed;
            let step = match input.event {
                None if consumed == 0 => {
                    if self.read() == 0 {
                        return Step::End(Outcome::Closed);
                    }
                    continue;
                }
                Some(ClientEvent::FileReady(header)) => {
                    self.header = Some(header);
                    None
                }
                Some(ClientEvent::FileData(data)) => {
                    sink(data);
                    None
                }
                Some(ClientEvent::FileDone(summary)) => Some(Step::End(Outcome::Done(summary))),
                Some(ClientEvent::Refused(error)) => Some(Step::End(Outcome::Refused(
                    error.code,
                    error.message.to_owned(),
                ))),
                Some(ClientEvent::StdinCredit { .. }) if stop_at_credit => Some(Step::Credit),
                _ => None,
            };
            self.recv.consume(consumed);
            if let Some(step) = step {
                return step;
            }
        }
    }
}
