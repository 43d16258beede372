//! The agent frame's encoder, written out by hand: exactly postcard's bytes for [`AgentFrame`]
//! (the serde derive stays for the host and the tests), but one small writer shared by every
//! field instead of a serializer inlined per field. The agent encodes only this.
//!
//! Postcard's format, as used here: integers as LEB128 varints (`i64` zigzagged first), `u8`
//! and `bool` as one byte, an enum as its variant index (a varint; every index here is below
//! 128, one byte), an `Option` as a 0/1 tag and the value, byte strings and `&str` as a length
//! varint and the bytes, fixed arrays element by element.
//!
//! NOTE: it must write exactly what `postcard::to_slice` writes for every [`AgentFrame`]:
//! `tests::hand_encoder_matches_postcard` holds it to that over every variant, edge values and
//! random frames. A field added to an agent message must be added here too, in its order.

use crate::jobs::*;
use crate::msg::*;
use crate::ops::*;

/// Writes `frame`'s body into `out`; `None` when it does not fit.
pub(crate) fn agent_frame(frame: &AgentFrame<'_>, out: &mut [u8]) -> Option<usize> {
    let mut w = Writer::new(out);
    w.agent_frame(frame);
    w.written()
}

/// An output buffer and how much of it is written; once something did not fit, `full` stays
/// set and nothing more is written (one check at the end instead of one per field).
pub(crate) struct Writer<'o> {
    out: &'o mut [u8],
    at: usize,
    full: bool,
}

impl<'o> Writer<'o> {
    pub(crate) fn new(out: &'o mut [u8]) -> Self {
        Writer {
            out,
            at: 0,
            full: false,
        }
    }

    /// The bytes written, or `None` when something did not fit.
    pub(crate) fn written(&self) -> Option<usize> {
        (!self.full).then_some(self.at)
    }

    // Out of line: every field writes through it.
    #[inline(never)]
    fn raw(&mut self, data: &[u8]) {
        match self
            .out
            .get_mut(self.at..)
            .and_then(|rest| rest.get_mut(..data.len()))
        {
            Some(slot) if !self.full => {
                slot.copy_from_slice(data);
                self.at += data.len();
            }
            _ => self.full = true,
        }
    }

    pub(crate) fn byte(&mut self, byte: u8) {
        self.raw(&[byte]);
    }

    fn bool(&mut self, value: bool) {
        self.byte(value.into());
    }

    /// Any unsigned integer (`u16`, `u32`, `u64`, a length) as postcard's varint: LEB128,
    /// seven bits a byte from the lowest, the high bit set on all but the last.
    #[inline(never)]
    pub(crate) fn varint(&mut self, mut value: u64) {
        while value > 0x7f {
            self.byte(value as u8 | 0x80);
            value >>= 7;
        }
        self.byte(value as u8);
    }

    fn u32(&mut self, value: u32) {
        self.varint(value.into());
    }

    fn i64(&mut self, value: i64) {
        self.varint(((value << 1) ^ (value >> 63)) as u64);
    }

    #[inline(never)]
    fn bytes(&mut self, data: &[u8]) {
        self.varint(data.len() as u64);
        self.raw(data);
    }

    fn str(&mut self, text: &str) {
        self.bytes(text.as_bytes());
    }

    fn timestamp(&mut self, t: &Timestamp) {
        self.i64(t.secs);
        self.u32(t.nanos);
    }

    fn record(&mut self, record: &StreamRecord) {
        self.varint(record.bytes);
        self.varint(record.dropped);
    }

    fn agent_frame(&mut self, frame: &AgentFrame<'_>) {
        // The variant index, pinned by `tests::variant_tags_are_pinned`.
        let tag = match frame {
            AgentFrame::Hello(_) => 0,
            AgentFrame::Started(_) => 1,
            AgentFrame::Stdout(_) => 2,
            AgentFrame::Stderr(_) => 3,
            AgentFrame::StdinCredit(_) => 4,
            AgentFrame::Exited(_) => 5,
            AgentFrame::Error(_) => 6,
            AgentFrame::Ready(_) => 7,
            AgentFrame::Authenticated(_) => 8,
            AgentFrame::Done(_) => 9,
            AgentFrame::Keepalive => 10,
            AgentFrame::OutputDropped(_) => 11,
            AgentFrame::FileReady(_) => 12,
            AgentFrame::FileData(_) => 13,
            AgentFrame::Skipped(_) => 14,
            AgentFrame::FileDone(_) => 15,
            AgentFrame::SystemInfo(_) => 16,
            AgentFrame::Mount(_) => 17,
            AgentFrame::Interface(_) => 18,
            AgentFrame::ClockSet(_) => 19,
            AgentFrame::Detached(_) => 20,
            AgentFrame::Job(_) => 21,
            AgentFrame::Attached(_) => 22,
        };
        self.byte(tag);
        match frame {
            AgentFrame::Hello(hello) => self.hello(hello),
            AgentFrame::Started(Started { pid: n })
            | AgentFrame::StdinCredit(n)
            | AgentFrame::Done(DoneReport { count: n }) => self.u32(*n),
            AgentFrame::Stdout(output) | AgentFrame::Stderr(output) => {
                self.varint(output.at_us);
                self.bytes(output.data.0);
            }
            AgentFrame::Exited(end) => self.termination(end),
            AgentFrame::Error(error) => {
                self.byte(error.code as u8);
                self.u32(error.errno);
                self.str(error.message);
            }
            AgentFrame::Ready(ready) => {
                self.u32(ready.cid);
                self.varint(ready.init_started_us);
                self.varint(ready.modules_us);
                self.varint(ready.listening_us);
                self.bytes(ready.module_times.as_bytes());
            }
            AgentFrame::Authenticated(proof) => self.bytes(&proof.mac.0),
            AgentFrame::Keepalive => {}
            AgentFrame::OutputDropped(dropped) => {
                self.byte(dropped.stream as u8);
                self.varint(dropped.bytes);
            }
            AgentFrame::FileReady(header) => {
                self.varint(header.size);
                self.u32(header.mode);
                self.timestamp(&header.mtime);
                self.u32(header.uid);
                self.u32(header.gid);
            }
            AgentFrame::FileData(data) => self.bytes(data.0),
            AgentFrame::Skipped(skipped) => {
                self.bytes(skipped.path.0);
                self.byte(skipped.reason as u8);
            }
            AgentFrame::FileDone(summary) => {
                self.varint(summary.bytes);
                self.bytes(&summary.sha256.0);
            }
            AgentFrame::SystemInfo(info) => self.system_info(info),
            AgentFrame::Mount(mount) => {
                self.bytes(mount.source.0);
                self.bytes(mount.target.0);
                self.str(mount.fstype);
                self.bool(mount.read_only);
                self.varint(mount.total);
                self.varint(mount.free);
                self.varint(mount.available);
            }
            AgentFrame::Interface(interface) => {
                self.str(interface.name);
                self.bool(interface.up);
                self.u32(interface.mtu);
                self.bytes(interface.mac.0);
                self.bytes(interface.addresses.as_bytes());
                self.varint(interface.rx_bytes);
                self.varint(interface.tx_bytes);
            }
            AgentFrame::ClockSet(previous) => self.timestamp(previous),
            AgentFrame::Detached(started) => {
                self.u32(started.id);
                self.u32(started.pid);
            }
            AgentFrame::Job(job) => self.job(job),
            AgentFrame::Attached(header) => {
                self.u32(header.id);
                for resume in [header.stdout, header.stderr] {
                    self.varint(resume.from);
                    self.varint(resume.lost);
                }
                self.bool(header.stdin);
                self.bool(header.running);
            }
        }
    }

    fn job(&mut self, job: &JobRecord<'_>) {
        self.u32(job.id);
        match job.name {
            Some(name) => {
                self.byte(1);
                self.bytes(name.0);
            }
            None => self.byte(0),
        }
        self.bytes(job.argv.as_bytes());
        self.u32(job.uid);
        self.u32(job.gid);
        self.u32(job.pid);
        self.byte(job.state as u8);
        self.timestamp(&job.started);
        self.varint(job.duration_us);
        self.varint(job.stdout_bytes);
        self.varint(job.stderr_bytes);
        match &job.termination {
            Some(end) => {
                self.byte(1);
                self.termination(end);
            }
            None => self.byte(0),
        }
    }

    fn hello(&mut self, hello: &AgentHello<'_>) {
        self.raw(&hello.magic);
        self.varint(hello.min_version.into());
        self.varint(hello.version.into());
        self.str(hello.agent_version);
        let l = &hello.limits;
        for value in [
            l.max_frame_body,
            l.max_data,
            l.max_argv_bytes,
            l.max_args,
            l.max_env_bytes,
            l.max_env_vars,
            l.max_path,
            l.stdin_window,
            l.max_user,
            l.max_arg_len,
            l.keepalive_ms,
            l.idle_ms,
        ] {
            self.u32(value);
        }
        self.bytes(&hello.nonce.0);
        self.byte(hello.security as u8);
        let b = &hello.bounds;
        self.varint(b.max_runtime_s);
        self.varint(b.max_output);
        self.varint(b.max_file_size);
        self.u32(b.max_connections);
        self.u32(b.handshake_timeout_ms);
        self.varint(b.memory_max);
        self.u32(b.pids_max);
        self.bool(b.cgroup);
        self.u32(b.default_uid);
        self.u32(b.default_gid);
    }

    fn termination(&mut self, end: &Termination) {
        match end.status {
            ExitStatus::Code(code) => {
                self.byte(0);
                self.byte(code);
            }
            ExitStatus::Signal {
                number,
                core_dumped,
            } => {
                self.byte(1);
                self.byte(number);
                self.bool(core_dumped);
            }
        }
        self.varint(end.duration_us);
        self.bool(end.output_dropped);
        self.byte(end.ending as u8);
        self.byte(end.tree_kill as u8);
        self.record(&end.stdout);
        self.record(&end.stderr);
        self.bool(end.pipes_held);
        self.bool(end.oom_killed);
        self.varint(end.peak_memory);
    }

    fn system_info(&mut self, info: &SystemInfo<'_>) {
        self.str(info.kernel_release);
        self.str(info.kernel_version);
        self.str(info.machine);
        self.str(info.hostname);
        self.varint(info.uptime_ms);
        self.timestamp(&info.now);
        self.u32(info.cpus);
        self.str(info.cpu_model);
        for load in info.load {
            self.u32(load);
        }
        self.varint(info.memory_total);
        self.varint(info.memory_available);
        self.u32(info.processes);
        self.u32(info.agent_pid);
        self.varint(info.agent_rss);
    }
}
