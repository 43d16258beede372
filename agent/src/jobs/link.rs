//! The supervisor's side of a runner's connection: the few frames of the wire protocol it
//! says and reads, by hand. A runner is an ordinary connection process (an insecure session
//! over a socketpair), so the supervisor is its client; but `ClientSession` and serde's codecs
//! for the client's frames and the agent's would add ~21 KB to the agent, and the supervisor
//! needs a dozen fields: the client's hello, stdin and the controls out; `Started`, output,
//! credit, the termination record and an error in.
//!
//! NOTE: these bytes must be postcard's, exactly as `ferry_wire` encodes them; the tests hold
//! each one to `ferry_wire`'s own codecs. The variant indices below are the wire format.

use ferry_wire::{
    Ending, ErrorCode, ExitStatus, StreamRecord, Termination, TreeKill, MAGIC,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

/// `AgentFrame` variant indices the supervisor reads.
mod agent_tag {
    pub const STARTED: u32 = 1;
    pub const STDOUT: u32 = 2;
    pub const STDERR: u32 = 3;
    pub const STDIN_CREDIT: u32 = 4;
    pub const EXITED: u32 = 5;
    pub const ERROR: u32 = 6;
}

/// `ClientFrame` variant indices the supervisor writes.
mod client_tag {
    pub const HELLO: u8 = 0;
    pub const STDIN_EOF: u8 = 3;
    pub const SIGNAL: u8 = 6;
    pub const RESIZE: u8 = 7;
    pub const CANCEL: u8 = 8;
}

/// Every `ErrorCode`, by its variant index.
pub const ERROR_CODES: [ErrorCode; 28] = [
    ErrorCode::UnsupportedVersion,
    ErrorCode::Malformed,
    ErrorCode::FrameTooLarge,
    ErrorCode::ProtocolViolation,
    ErrorCode::LimitExceeded,
    ErrorCode::InvalidRequest,
    ErrorCode::NotFound,
    ErrorCode::PermissionDenied,
    ErrorCode::ExecFormat,
    ErrorCode::BadCwd,
    ErrorCode::SpawnFailed,
    ErrorCode::ResourceExhausted,
    ErrorCode::Busy,
    ErrorCode::Internal,
    ErrorCode::Unauthenticated,
    ErrorCode::Unsupported,
    ErrorCode::ArgumentsTooLong,
    ErrorCode::AlreadyExists,
    ErrorCode::WrongFileType,
    ErrorCode::FileTooLarge,
    ErrorCode::NoSpace,
    ErrorCode::IntegrityMismatch,
    ErrorCode::PathEscape,
    ErrorCode::Io,
    ErrorCode::BadArchive,
    ErrorCode::NoSuchJob,
    ErrorCode::JobRunning,
    ErrorCode::JobEnded,
];

/// The code with variant index `index` (unknown ones are `Internal`).
pub fn error_code(index: u32) -> ErrorCode {
    ERROR_CODES
        .get(index as usize)
        .copied()
        .unwrap_or(ErrorCode::Internal)
}

/// What a runner said, as far as the supervisor cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerFrame<'a> {
    Started {
        pid: u32,
    },
    /// Output of stream 0 (stdout) or 1 (stderr).
    Output {
        stream: usize,
        data: &'a [u8],
    },
    StdinCredit(u32),
    Exited(Termination),
    /// The exec was refused, or failed.
    Error {
        code: ErrorCode,
        errno: u32,
        message: &'a [u8],
    },
    /// Anything else (the hello, keepalives, a dropped-output note): nothing to do.
    Other,
}

/// Reads a runner's frame body; `None` when it is not one (the runner is then treated as lost).
pub fn runner_frame(body: &[u8]) -> Option<RunnerFrame<'_>> {
    let mut r = Reader(body);
    Some(match r.u32()? {
        agent_tag::STARTED => RunnerFrame::Started { pid: r.u32()? },
        tag @ (agent_tag::STDOUT | agent_tag::STDERR) => {
            let _at_us = r.u64()?;
            let data = r.bytes()?;
            RunnerFrame::Output {
                stream: (tag - agent_tag::STDOUT) as usize,
                data,
            }
        }
        agent_tag::STDIN_CREDIT => RunnerFrame::StdinCredit(r.u32()?),
        agent_tag::EXITED => RunnerFrame::Exited(r.termination()?),
        agent_tag::ERROR => RunnerFrame::Error {
            code: error_code(r.u32()?),
            errno: r.u32()?,
            message: r.bytes()?,
        },
        _ => RunnerFrame::Other,
    })
}

/// A termination record's body (postcard's bytes of a `Termination`), as
/// `encode_agent_frame(Exited)` writes it after the tag; `None` when it is not one.
pub fn termination(body: &[u8]) -> Option<Termination> {
    let mut r = Reader(body);
    let t = r.termination()?;
    r.0.is_empty().then_some(t)
}

/// The unread rest of a body; every read is checked.
pub struct Reader<'a>(pub &'a [u8]);

impl<'a> Reader<'a> {
    pub fn byte(&mut self) -> Option<u8> {
        let (first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*first)
    }

    /// An unsigned LEB128 (postcard's varint), at most 10 bytes.
    pub fn u64(&mut self) -> Option<u64> {
        let mut out = 0u64;
        for i in 0..10 {
            let byte = self.byte()?;
            out |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Some(out);
            }
        }
        None
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.u64().and_then(|v| u32::try_from(v).ok())
    }

    pub fn bool(&mut self) -> Option<bool> {
        match self.byte()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    /// A length-prefixed byte string.
    pub fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.u64()?).ok()?;
        if len > self.0.len() {
            return None;
        }
        let (bytes, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(bytes)
    }

    fn variant<T: Copy>(&mut self, values: &[T]) -> Option<T> {
        values.get(self.u32()? as usize).copied()
    }

    fn stream_record(&mut self) -> Option<StreamRecord> {
        Some(StreamRecord {
            bytes: self.u64()?,
            dropped: self.u64()?,
        })
    }

    fn termination(&mut self) -> Option<Termination> {
        let status = match self.u32()? {
            0 => ExitStatus::Code(self.byte()?),
            1 => ExitStatus::Signal {
                number: self.byte()?,
                core_dumped: self.bool()?,
            },
            _ => return None,
        };
        Some(Termination {
            status,
            duration_us: self.u64()?,
            output_dropped: self.bool()?,
            ending: self.variant(&[
                Ending::Exited,
                Ending::TimedOut,
                Ending::Cancelled,
                Ending::RuntimeLimit,
                Ending::OutputLimit,
            ])?,
            tree_kill: self.variant(&[TreeKill::None, TreeKill::Cgroup, TreeKill::ProcessGroup])?,
            stdout: self.stream_record()?,
            stderr: self.stream_record()?,
            pipes_held: self.bool()?,
            oom_killed: self.bool()?,
            peak_memory: self.u64()?,
        })
    }
}

/// Writes into a buffer; `None` from [`Writer::finish`] when it did not fit.
pub struct Writer<'a> {
    buf: &'a mut [u8],
    len: usize,
    overflow: bool,
}

impl<'a> Writer<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        Writer {
            buf,
            len: 0,
            overflow: false,
        }
    }

    pub fn byte(&mut self, byte: u8) -> &mut Self {
        match self.buf.get_mut(self.len) {
            Some(slot) => {
                *slot = byte;
                self.len += 1;
            }
            None => self.overflow = true,
        }
        self
    }

    pub fn u64(&mut self, mut value: u64) -> &mut Self {
        loop {
            let low = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                return self.byte(low);
            }
            self.byte(low | 0x80);
        }
    }

    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        self.u64(bytes.len() as u64).raw(bytes)
    }

    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        let end = self.len.saturating_add(bytes.len());
        match self.buf.get_mut(self.len..end) {
            Some(dest) => {
                dest.copy_from_slice(bytes);
                self.len = end;
            }
            None => self.overflow = true,
        }
        self
    }

    /// The bytes written, unless something did not fit.
    pub fn finish(&self) -> Option<usize> {
        (!self.overflow).then_some(self.len)
    }
}

/// A whole client frame (length header and body) whose body `body` writes; `None` when it does
/// not fit `out`.
fn client_frame(out: &mut [u8], body: impl FnOnce(&mut Writer<'_>)) -> Option<usize> {
    let (header, rest) = out.split_at_mut_checked(4)?;
    let mut w = Writer::new(rest);
    body(&mut w);
    let len = w.finish()?;
    header.copy_from_slice(&(len as u32).to_le_bytes());
    Some(len + 4)
}

/// The client's hello, as `ClientHello::CURRENT` is encoded.
pub fn client_hello(out: &mut [u8]) -> Option<usize> {
    client_frame(out, |w| {
        w.byte(client_tag::HELLO)
            .raw(&MAGIC)
            .u64(MIN_PROTOCOL_VERSION.into())
            .u64(PROTOCOL_VERSION.into());
    })
}

/// A control the supervisor relays to a runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    StdinEof,
    Signal(u8),
    Resize { rows: u16, cols: u16 },
    Cancel { grace_ms: Option<u32> },
}

/// `control` as a whole client frame.
pub fn control_frame(control: Control, out: &mut [u8]) -> Option<usize> {
    client_frame(out, |w| match control {
        Control::StdinEof => {
            w.byte(client_tag::STDIN_EOF);
        }
        Control::Signal(number) => {
            w.byte(client_tag::SIGNAL).byte(number);
        }
        Control::Resize { rows, cols } => {
            w.byte(client_tag::RESIZE).u64(rows.into()).u64(cols.into());
        }
        Control::Cancel { grace_ms: None } => {
            w.byte(client_tag::CANCEL).byte(0);
        }
        Control::Cancel {
            grace_ms: Some(grace),
        } => {
            w.byte(client_tag::CANCEL).byte(1).u64(grace.into());
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_wire::{
        encode_agent_frame, encode_client_frame, AgentFrame, Bytes, Cancel, ClientFrame,
        ClientHello, Dropped, ErrorFrame, Output, Started, Stream, WindowSize,
    };

    fn client(frame: &ClientFrame<'_>) -> Vec<u8> {
        let mut buf = [0u8; 256];
        let n = encode_client_frame(frame, &mut buf).unwrap();
        buf[..n].to_vec()
    }

    fn body(frame: &AgentFrame<'_>) -> Vec<u8> {
        let mut buf = vec![0u8; 1024];
        let n = encode_agent_frame(frame, &mut buf).unwrap();
        buf[4..n].to_vec()
    }

    fn mine(f: impl FnOnce(&mut [u8]) -> Option<usize>) -> Vec<u8> {
        let mut buf = [0u8; 256];
        let n = f(&mut buf).unwrap();
        buf[..n].to_vec()
    }

    #[test]
    fn client_frames_are_postcards_bytes() {
        assert_eq!(
            mine(client_hello),
            client(&ClientFrame::Hello(ClientHello::CURRENT))
        );
        let cases = [
            (Control::StdinEof, ClientFrame::StdinEof),
            (Control::Signal(64), ClientFrame::Signal(64)),
            (
                Control::Resize {
                    rows: 300,
                    cols: u16::MAX,
                },
                ClientFrame::Resize(WindowSize {
                    rows: 300,
                    cols: u16::MAX,
                }),
            ),
            (
                Control::Cancel { grace_ms: None },
                ClientFrame::Cancel(Cancel { grace_ms: None }),
            ),
            (
                Control::Cancel {
                    grace_ms: Some(u32::MAX),
                },
                ClientFrame::Cancel(Cancel {
                    grace_ms: Some(u32::MAX),
                }),
            ),
        ];
        for (control, frame) in cases {
            assert_eq!(mine(|out| control_frame(control, out)), client(&frame));
        }
        assert_eq!(control_frame(Control::Signal(1), &mut [0u8; 5]), None);
    }

    fn termination(seed: u64) -> Termination {
        Termination {
            status: if seed.is_multiple_of(2) {
                ExitStatus::Code(seed as u8)
            } else {
                ExitStatus::Signal {
                    number: seed as u8,
                    core_dumped: seed.is_multiple_of(3),
                }
            },
            duration_us: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            output_dropped: seed.is_multiple_of(5),
            ending: [
                Ending::Exited,
                Ending::TimedOut,
                Ending::Cancelled,
                Ending::RuntimeLimit,
                Ending::OutputLimit,
            ][(seed % 5) as usize],
            tree_kill: [TreeKill::None, TreeKill::Cgroup, TreeKill::ProcessGroup]
                [(seed % 3) as usize],
            stdout: StreamRecord {
                bytes: seed << 7,
                dropped: u64::MAX - seed,
            },
            stderr: StreamRecord {
                bytes: seed >> 3,
                dropped: seed,
            },
            pipes_held: seed.is_multiple_of(7),
            oom_killed: seed.is_multiple_of(11),
            peak_memory: seed.rotate_left(13),
        }
    }

    #[test]
    fn agent_frames_read_as_ferry_wire_writes_them() {
        for seed in 0..200 {
            let t = termination(seed);
            let exited = body(&AgentFrame::Exited(t));
            assert_eq!(runner_frame(&exited), Some(RunnerFrame::Exited(t)));
            assert_eq!(super::termination(&exited[1..]), Some(t));
            // Every cut is refused, never misread.
            for cut in 0..exited.len() - 1 {
                assert_eq!(super::termination(&exited[1..=cut]), None);
            }
        }
        let data = [7u8; 300];
        for (frame, expected) in [
            (
                AgentFrame::Started(Started { pid: 70_000 }),
                RunnerFrame::Started { pid: 70_000 },
            ),
            (
                AgentFrame::Stdout(Output {
                    at_us: u64::MAX,
                    data: Bytes(&data),
                }),
                RunnerFrame::Output {
                    stream: 0,
                    data: &data,
                },
            ),
            (
                AgentFrame::Stderr(Output {
                    at_us: 1,
                    data: Bytes(b"e"),
                }),
                RunnerFrame::Output {
                    stream: 1,
                    data: b"e",
                },
            ),
            (
                AgentFrame::StdinCredit(131_072),
                RunnerFrame::StdinCredit(131_072),
            ),
            (AgentFrame::Keepalive, RunnerFrame::Other),
            (
                AgentFrame::OutputDropped(Dropped {
                    stream: Stream::Stderr,
                    bytes: 5,
                }),
                RunnerFrame::Other,
            ),
        ] {
            assert_eq!(runner_frame(&body(&frame)), Some(expected), "{frame:?}");
        }
        for (index, code) in ERROR_CODES.iter().enumerate() {
            assert_eq!(*code as usize, index);
            let frame = AgentFrame::Error(ErrorFrame {
                code: *code,
                errno: 2,
                message: "no such file",
            });
            assert_eq!(
                runner_frame(&body(&frame)),
                Some(RunnerFrame::Error {
                    code: *code,
                    errno: 2,
                    message: b"no such file"
                })
            );
        }
        assert_eq!(error_code(9999), ErrorCode::Internal);
    }

    #[test]
    fn garbage_is_refused_or_ignored_never_misread() {
        assert_eq!(runner_frame(&[]), None);
        assert_eq!(runner_frame(&[0xff; 11]), None);
        assert_eq!(runner_frame(&[2, 0, 5, 1]), None, "a cut output");
        assert_eq!(runner_frame(&[99]), Some(RunnerFrame::Other));
        let mut state = 1u64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 40) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (state >> (i % 8 * 8)) as u8).collect();
            let _ = runner_frame(&bytes);
            let _ = super::termination(&bytes);
        }
    }
}
