//! The private records between a connection process and the supervisor, one per
//! `SOCK_SEQPACKET` message (so a record is never split or merged). Internal, not the wire
//! protocol: both ends are this binary. A tag byte, then varints and length-prefixed bytes
//! ([`link::Reader`]); output and stdin data is the rest of the record. Decoding is total: a
//! record that does not read is `None`, and the supervisor drops the peer that sent it.

use ferry_wire::{ErrorCode, Termination};

use super::link::{error_code, Reader, Writer};

/// The largest record: an exec frame and a little.
pub const MAX_RECORD: usize = ferry_wire::limits::MAX_FRAME + 256;
/// The most output one record carries.
pub const MAX_OUTPUT: usize = 32 * 1024;

/// The tag of an output record: the stream's byte and the data follow.
pub const OUTPUT_TAG: u8 = tag::OUTPUT;

/// The tag of a stdin record: the data follows.
pub const STDIN_TAG: u8 = tag::STDIN;

/// "All users' jobs" in a request's `viewer`.
pub const ANY_VIEWER: u32 = u32::MAX;

mod tag {
    pub const START: u8 = 1;
    pub const LIST: u8 = 2;
    pub const ATTACH: u8 = 3;
    pub const WAIT: u8 = 4;
    pub const KILL: u8 = 5;
    pub const REMOVE: u8 = 6;
    pub const STDIN: u8 = 7;
    pub const CONTROL: u8 = 8;

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

/// What a connection process asks. `viewer` is the uid whose jobs it may see, or
/// [`ANY_VIEWER`]; `job` an id in decimal or a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    /// A detached job: `exec` is the whole exec frame (header and body) the client sent.
    Start {
        uid: u32,
        gid: u32,
        name: &'a [u8],
        exec: &'a [u8],
    },
    List {
        viewer: u32,
    },
    Attach {
        viewer: u32,
        job: &'a [u8],
        since: [u64; 2],
        follow: bool,
        stdin: bool,
    },
    Wait {
        viewer: u32,
        job: &'a [u8],
    },
    Kill {
        viewer: u32,
        job: &'a [u8],
        signal: u8,
        grace_ms: Option<u32>,
    },
    Remove {
        viewer: u32,
        job: &'a [u8],
    },
    /// A control for the attached job, as the runner's frame ([`super::link::Control`]).
    Control(super::link::Control),
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
            Request::List { viewer } => {
                w.byte(tag::LIST).u64(viewer.into());
            }
            Request::Attach {
                viewer,
                job,
                since,
                follow,
                stdin,
            } => {
                w.byte(tag::ATTACH)
                    .u64(viewer.into())
                    .bytes(job)
                    .u64(since[0])
                    .u64(since[1])
                    .byte(follow.into())
                    .byte(stdin.into());
            }
            Request::Wait { viewer, job } => {
                w.byte(tag::WAIT).u64(viewer.into()).bytes(job);
            }
            Request::Kill {
                viewer,
                job,
                signal,
                grace_ms,
            } => {
                w.byte(tag::KILL)
                    .u64(viewer.into())
                    .bytes(job)
                    .byte(signal)
                    .u64(grace_ms.map_or(0, |g| u64::from(g) + 1));
            }
            Request::Remove { viewer, job } => {
                w.byte(tag::REMOVE).u64(viewer.into()).bytes(job);
            }
            Request::Control(control) => {
                // The runner's own frame, ready to relay.
                let mut frame = [0u8; 16];
                let n = super::link::control_frame(control, &mut frame).unwrap_or(0);
                w.byte(tag::CONTROL).raw(frame.get(..n).unwrap_or(&[]));
            }
        }
        w.finish()
    }
}

/// A request record; `None` when it is not one. A control comes back as its runner frame's
/// bytes ([`ControlFrame`]).
pub fn request(record: &[u8]) -> Option<Incoming<'_>> {
    let mut r = Reader(record);
    let tag = r.byte()?;
    let viewer = |r: &mut Reader<'_>| r.u32();
    let request = match tag {
        tag::START => Request::Start {
            uid: r.u32()?,
            gid: r.u32()?,
            name: r.bytes()?,
            exec: core::mem::take(&mut r.0),
        },
        tag::LIST => Request::List {
            viewer: viewer(&mut r)?,
        },
        tag::ATTACH => Request::Attach {
            viewer: viewer(&mut r)?,
            job: r.bytes()?,
            since: [r.u64()?, r.u64()?],
            follow: r.bool()?,
            stdin: r.bool()?,
        },
        tag::WAIT => Request::Wait {
            viewer: viewer(&mut r)?,
            job: r.bytes()?,
        },
        tag::KILL => Request::Kill {
            viewer: viewer(&mut r)?,
            job: r.bytes()?,
            signal: r.byte()?,
            grace_ms: match r.u64()? {
                0 => None,
                n => Some(u32::try_from(n - 1).ok()?),
            },
        },
        tag::REMOVE => Request::Remove {
            viewer: viewer(&mut r)?,
            job: r.bytes()?,
        },
        tag::STDIN => return Some(Incoming::Stdin(core::mem::take(&mut r.0))),
        tag::CONTROL => return Some(Incoming::Control(ControlFrame(core::mem::take(&mut r.0)))),
        _ => return None,
    };
    r.0.is_empty().then_some(Incoming::Request(request))
}

/// A control's runner frame, relayed as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlFrame<'a>(pub &'a [u8]);

/// A record as the supervisor reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming<'a> {
    Request(Request<'a>),
    Stdin(&'a [u8]),
    Control(ControlFrame<'a>),
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
    use crate::jobs::link::Control;
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
            Request::List { viewer: ANY_VIEWER },
            Request::Attach {
                viewer: 7,
                job: b"12",
                since: [u64::MAX, 0],
                follow: true,
                stdin: false,
            },
            Request::Wait {
                viewer: 0,
                job: b"x",
            },
            Request::Kill {
                viewer: 1,
                job: b"y",
                signal: 0,
                grace_ms: None,
            },
            Request::Kill {
                viewer: 1,
                job: b"y",
                signal: 15,
                grace_ms: Some(u32::MAX),
            },
            Request::Remove {
                viewer: 3,
                job: b"4",
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
        // Stdin goes as its tag and the bytes (sent in two pieces, one record).
        assert_eq!(
            request(&[STDIN_TAG, b'a', b'b', b'c']),
            Some(Incoming::Stdin(b"abc"))
        );
        let n = Request::Control(Control::Signal(2))
            .encode(&mut buf)
            .unwrap();
        let Some(Incoming::Control(ControlFrame(frame))) = request(&buf[..n]) else {
            panic!("not a control");
        };
        assert_eq!(frame, &[2, 0, 0, 0, 6, 2]);
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
