//! The private records between a connection process and the supervisor, one per
//! `SOCK_SEQPACKET` message (so a record is never split or merged). Internal, not the wire
//! protocol: both ends are this binary. A tag byte, then varints and length-prefixed bytes
//! ([`link::Reader`]); output data is the rest of the record. A request other than a start,
//! and an attacher's stdin and controls, carry the client's own frame, which the supervisor
//! reads with `ferry_wire`'s decoder (or relays to the runner as it is): no second codec for
//! them. Decoding is total: a record that does not read is `None`, and the supervisor drops the
//! peer that sent it.

use ferry_wire::{ErrorCode, Termination};

use super::link::{error_code, Reader, Writer};

/// The largest record: an exec frame and a little.
pub const MAX_RECORD: usize = ferry_wire::limits::MAX_FRAME + 256;
/// The most output one record carries.
pub const MAX_OUTPUT: usize = 32 * 1024;

/// The tag of an output record: the stream's byte and the data follow.
pub const OUTPUT_TAG: u8 = tag::OUTPUT;

/// The tag of a relayed record: an attacher's frame for the job (stdin, a control) follows.
pub const RELAY_TAG: u8 = tag::RELAY;

/// "All users' jobs" in a request's `viewer`.
pub const ANY_VIEWER: u32 = u32::MAX;

mod tag {
    pub const START: u8 = 1;
    pub const FRAME: u8 = 2;
    pub const RELAY: u8 = 3;

    pub const STARTED: u8 = 21;
    pub const REFUSED: u8 = 22;
    pub const JOB: u8 = 23;
    pub const DONE: u8 = 24;
    pub const ATTACHED: u8 = 25;
    pub const OUTPUT: u8 = 26;
    pub const DROPPED: u8 = 27;
    pub const CREDIT: u8 = 28;
    pub const ENDED: u8 = 29;
}

/// What a connection process asks first. `viewer` is the uid whose jobs it may see, or
/// [`ANY_VIEWER`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    /// A detached job: `exec` is the whole exec frame (header and body) the client sent.
    Start {
        uid: u32,
        gid: u32,
        name: &'a [u8],
        exec: &'a [u8],
    },
    /// Any other job request: the client's whole frame (`Jobs`, `Attach`, `Wait`, `Kill`,
    /// `Remove`), which the session validated.
    Frame { viewer: u32, frame: &'a [u8] },
}

/// A job as listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobInfo<'a> {
    pub id: u32,
    pub name: &'a [u8],
    pub argv: &'a [u8],
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    /// 0 running, 1 exited, 2 killed, 3 lost.
    pub state: u8,
    pub started_secs: i64,
    pub started_nanos: u32,
    pub duration_us: u64,
    pub bytes: [u64; 2],
    pub termination: Option<Termination>,
}

/// What the supervisor answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer<'a> {
    Started {
        id: u32,
        pid: u32,
    },
    Refused {
        code: ErrorCode,
        errno: u32,
        message: &'a [u8],
    },
    Job(JobInfo<'a>),
    Done {
        count: u32,
    },
    Attached {
        id: u32,
        /// Per stream: the first offset sent, and the bytes lost before it.
        from: [u64; 2],
        lost: [u64; 2],
        stdin: bool,
        running: bool,
        /// When the job started, on the monotonic clock.
        started_us: u64,
    },
    Output {
        stream: u8,
        data: &'a [u8],
    },
    Dropped {
        stream: u8,
        bytes: u64,
    },
    /// Stdin bytes the runner took: the attacher's credit comes back.
    Credit(u32),
    Ended(Termination),
}

fn termination_bytes(t: &Termination, w: &mut Writer<'_>) {
    let mut buf = [0u8; 128];
    let frame = ferry_wire::AgentFrame::Exited(*t);
    let n = ferry_wire::encode_agent_frame(&frame, &mut buf).unwrap_or(0);
    // The header and the tag go: the rest is the record's body.
    w.bytes(buf.get(5..n).unwrap_or(&[]));
}

fn read_termination(r: &mut Reader<'_>) -> Option<Termination> {
    super::link::termination(r.bytes()?)
}

impl Request<'_> {
    /// The record, into `out`; `None` when it does not fit.
    pub fn encode(&self, out: &mut [u8]) -> Option<usize> {
        let mut w = Writer::new(out);
        match *self {
            Request::Start {
                uid,
                gid,
                name,
                exec,
            } => {
                w.byte(tag::START)
                    .u64(uid.into())
                    .u64(gid.into())
                    .bytes(name)
                    .raw(exec);
            }
            Request::Frame { viewer, frame } => {
                w.byte(tag::FRAME).u64(viewer.into()).raw(frame);
            }
        }
        w.finish()
    }
}

/// A request record; `None` when it is not one.
pub fn request(record: &[u8]) -> Option<Incoming<'_>> {
    let mut r = Reader(record);
    let request = match r.byte()? {
        tag::START => Request::Start {
            uid: r.u32()?,
            gid: r.u32()?,
            name: r.bytes()?,
            exec: r.0,
        },
        tag::FRAME => Request::Frame {
            viewer: r.u32()?,
            frame: r.0,
        },
        tag::RELAY => return Some(Incoming::Relay(r.0)),
        _ => return None,
    };
    Some(Incoming::Request(request))
}

/// A record as the supervisor reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming<'a> {
    Request(Request<'a>),
    /// An attacher's frame for the job's runner (stdin or a control), as the client sent it.
    Relay(&'a [u8]),
}

impl Answer<'_> {
    /// The record, into `out`; `None` when it does not fit.
    pub fn encode(&self, out: &mut [u8]) -> Option<usize> {
        let mut w = Writer::new(out);
        match *self {
            Answer::Started { id, pid } => {
                w.byte(tag::STARTED).u64(id.into()).u64(pid.into());
            }
            Answer::Refused {
                code,
                errno,
                message,
            } => {
                let message = message.get(..message.len().min(200)).unwrap_or(&[]);
                w.byte(tag::REFUSED)
                    .u64(code as u64)
                    .u64(errno.into())
                    .bytes(message);
            }
            Answer::Job(job) => {
                w.byte(tag::JOB)
                    .u64(job.id.into())
                    .bytes(job.name)
                    .bytes(job.argv)
                    .u64(job.uid.into())
                    .u64(job.gid.into())
                    .u64(job.pid.into())
                    .byte(job.state)
                    .u64(job.started_secs as u64)
                    .u64(job.started_nanos.into())
                    .u64(job.duration_us)
                    .u64(job.bytes[0])
                    .u64(job.bytes[1]);
                match &job.termination {
                    Some(t) => termination_bytes(t, w.byte(1)),
                    None => {
                        w.byte(0);
                    }
                }
            }
            Answer::Done { count } => {
                w.byte(tag::DONE).u64(count.into());
            }
            Answer::Attached {
                id,
                from,
                lost,
                stdin,
                running,
                started_us,
            } => {
                w.byte(tag::ATTACHED)
                    .u64(id.into())
                    .u64(from[0])
                    .u64(from[1])
                    .u64(lost[0])
                    .u64(lost[1])
                    .byte(stdin.into())
                    .byte(running.into())
                    .u64(started_us);
            }
            Answer::Output { stream, data } => {
                w.byte(tag::OUTPUT).byte(stream).raw(data);
            }
            Answer::Dropped { stream, bytes } => {
                w.byte(tag::DROPPED).byte(stream).u64(bytes);
            }
            Answer::Credit(n) => {
                w.byte(tag::CREDIT).u64(n.into());
            }
            Answer::Ended(t) => termination_bytes(&t, w.byte(tag::ENDED)),
        }
        w.finish()
    }
}

/// An answer record; `None` when it is not one.
pub fn answer(record: &[u8]) -> Option<Answer<'_>> {
    let mut r = Reader(record);
    let answer = match r.byte()? {
        tag::STARTED => Answer::Started {
            id: r.u32()?,
            pid: r.u32()?,
        },
        tag::REFUSED => Answer::Refused {
            code: error_code(r.u32()?),
            errno: r.u32()?,
            message: r.bytes()?,
        },
        tag::JOB => Answer::Job(JobInfo {
            id: r.u32()?,
            name: r.bytes()?,
            argv: r.bytes()?,
            uid: r.u32()?,
            gid: r.u32()?,
            pid: r.u32()?,
            state: r.byte().filter(|s| *s <= 3)?,
            started_secs: r.u64()? as i64,
            started_nanos: r.u32()?,
            duration_us: r.u64()?,
            bytes: [r.u64()?, r.u64()?],
            termination: match r.bool()? {
                true => Some(read_termination(&mut r)?),
                false => None,
            },
        }),
        tag::DONE => Answer::Done { count: r.u32()? },
        tag::ATTACHED => Answer::Attached {
            id: r.u32()?,
            from: [r.u64()?, r.u64()?],
            lost: [r.u64()?, r.u64()?],
            stdin: r.bool()?,
            running: r.bool()?,
            started_us: r.u64()?,
        },
        tag::OUTPUT => Answer::Output {
            stream: r.byte().filter(|s| *s <= 1)?,
            data: core::mem::take(&mut r.0),
        },
        tag::DROPPED => Answer::Dropped {
            stream: r.byte().filter(|s| *s <= 1)?,
            bytes: r.u64()?,
        },
        tag::CREDIT => Answer::Credit(r.u32()?),
        tag::ENDED => Answer::Ended(read_termination(&mut r)?),
        _ => return None,
    };
    r.0.is_empty().then_some(answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_wire::{Ending, ExitStatus, StreamRecord, TreeKill};

    const T: Termination = Termination {
        status: ExitStatus::Signal {
            number: 9,
            core_dumped: false,
        },
        duration_us: 12_345_678,
        output_dropped: true,
        ending: Ending::Cancelled,
        tree_kill: TreeKill::Cgroup,
        stdout: StreamRecord {
            bytes: 1 << 40,
            dropped: 3,
        },
        stderr: StreamRecord {
            bytes: 0,
            dropped: 0,
        },
        pipes_held: false,
        oom_killed: true,
        peak_memory: 1 << 30,
    };

    fn requests() -> Vec<Request<'static>> {
        vec![
            Request::Start {
                uid: 1000,
                gid: u32::MAX - 1,
                name: b"build",
                exec: b"\x05\x00\x00\x00\x01abcd",
            },
            Request::Start {
                uid: 0,
                gid: 0,
                name: b"",
                exec: b"",
            },
            Request::Frame {
                viewer: ANY_VIEWER,
                frame: b"\x01\x00\x00\x00\x20",
            },
            Request::Frame {
                viewer: 7,
                frame: b"",
            },
        ]
    }

    fn answers() -> Vec<Answer<'static>> {
        vec![
            Answer::Started { id: 1, pid: 77 },
            Answer::Refused {
                code: ErrorCode::AlreadyExists,
                errno: 17,
                message: b"name in use",
            },
            Answer::Job(JobInfo {
                id: 3,
                name: b"n",
                argv: b"sleep\x0010\x00",
                uid: 1,
                gid: 2,
                pid: 3,
                state: 2,
                started_secs: -5,
                started_nanos: 999_999_999,
                duration_us: 1,
                bytes: [5, u64::MAX],
                termination: Some(T),
            }),
            Answer::Job(JobInfo {
                id: 3,
                name: b"",
                argv: b"",
                uid: 1,
                gid: 2,
                pid: 3,
                state: 0,
                started_secs: 1_700_000_000,
                started_nanos: 0,
                duration_us: 0,
                bytes: [0, 0],
                termination: None,
            }),
            Answer::Done { count: 64 },
            Answer::Attached {
                id: 9,
                from: [10, 20],
                lost: [0, 970],
                stdin: true,
                running: false,
                started_us: 123,
            },
            Answer::Output {
                stream: 1,
                data: b"hello",
            },
            Answer::Dropped {
                stream: 0,
                bytes: 970,
            },
            Answer::Credit(65536),
            Answer::Ended(T),
        ]
    }

    #[test]
    fn records_round_trip() {
        let mut buf = vec![0u8; MAX_RECORD];
        for asked in requests() {
            let n = asked.encode(&mut buf).unwrap();
            assert_eq!(request(&buf[..n]), Some(Incoming::Request(asked)));
            // Every cut is refused or reads as something else, never past the record.
            for cut in 0..n {
                let _ = super::request(&buf[..cut]);
            }
        }
        for answer in answers() {
            let n = answer.encode(&mut buf).unwrap();
            assert_eq!(super::answer(&buf[..n]), Some(answer));
            for cut in 0..n {
                let _ = super::answer(&buf[..cut]);
            }
        }
        // A relayed frame goes as its tag and the bytes (sent in two pieces, one record).
        assert_eq!(
            request(&[RELAY_TAG, b'a', b'b', b'c']),
            Some(Incoming::Relay(b"abc"))
        );
        assert_eq!(Answer::Done { count: 1 }.encode(&mut [0u8; 1]), None);
    }

    #[test]
    fn garbage_never_reads_past_its_record() {
        assert_eq!(request(&[]), None);
        assert_eq!(answer(&[]), None);
        assert_eq!(answer(&[tag::DONE, 1, 0]), None, "trailing bytes");
        assert_eq!(answer(&[tag::OUTPUT, 2]), None, "no such stream");
        let mut state = 7u64;
        for _ in 0..50_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 48) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|i| (state >> (i % 8 * 8)) as u8).collect();
            if let Some(first) = bytes.first_mut() {
                *first = 1 + (*first % 30);
            }
            let _ = request(&bytes);
            let _ = answer(&bytes);
        }
    }
}
