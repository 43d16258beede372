//! The client frame's decoder, written out by hand: exactly postcard's reading of
//! [`ClientFrame`] (the serde derive stays for everything else), but one small reader shared by
//! every field instead of a deserializer inlined per field. The agent decodes only this; about
//! 2 KB less code in it.
//!
//! NOTE: it must accept and reject exactly what `postcard::take_from_bytes::<ClientFrame>`
//! does, and decode the same value: `tests::hand_decoder_matches_postcard` holds it to that over
//! every golden vector, random frames, and their truncations and mutations. A field added to
//! a client message must be added here too.

use crate::bytes::{ByteArray, Bytes};
use crate::jobs::*;
use crate::msg::*;
use crate::ops::*;

/// A client frame body; `None` when it is not a valid encoding, with the bytes left over.
pub(crate) fn client_frame(body: &[u8]) -> Option<(ClientFrame<'_>, usize)> {
    let mut r = Reader(body);
    let frame = r.client_frame()?;
    Some((frame, r.0.len()))
}

/// The unread rest of a body.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*first)
    }

    /// An unsigned LEB128 of at most `max_bytes`, whose last byte holds at most `last_max`
    /// (postcard's check that the value fits its type).
    // Out of line: every integer field reads through it.
    #[inline(never)]
    fn varint(&mut self, max_bytes: u32, last_max: u8) -> Option<u64> {
        let mut out = 0u64;
        for i in 0..max_bytes {
            let byte = self.byte()?;
            out |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return (i != max_bytes - 1 || byte <= last_max).then_some(out);
            }
        }
        None
    }

    fn u16(&mut self) -> Option<u16> {
        self.varint(3, 3).map(|v| v as u16)
    }

    fn u32(&mut self) -> Option<u32> {
        self.varint(5, 15).map(|v| v as u32)
    }

    fn u64(&mut self) -> Option<u64> {
        self.varint(10, 1)
    }

    fn i64(&mut self) -> Option<i64> {
        let v = self.u64()?;
        Some(((v >> 1) as i64) ^ -((v & 1) as i64))
    }

    /// An enum's variant index, below `count`.
    fn variant(&mut self, count: u32) -> Option<u32> {
        self.u32().filter(|v| *v < count)
    }

    fn bool(&mut self) -> Option<bool> {
        match self.byte()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    /// Postcard's option tag: `Some(false)` for `None`, `Some(true)` when a value follows.
    fn some(&mut self) -> Option<bool> {
        self.bool()
    }

    fn bytes(&mut self) -> Option<Bytes<'a>> {
        let len = usize::try_from(self.u64()?).ok()?;
        if len > self.0.len() {
            return None;
        }
        let (taken, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(Bytes(taken))
    }

    fn array<const N: usize>(&mut self) -> Option<ByteArray<N>> {
        self.bytes()?.0.try_into().ok().map(ByteArray)
    }

    fn option_bytes(&mut self) -> Option<Option<Bytes<'a>>> {
        Some(if self.some()? {
            Some(self.bytes()?)
        } else {
            None
        })
    }

    fn option_u32(&mut self) -> Option<Option<u32>> {
        Some(if self.some()? {
            Some(self.u32()?)
        } else {
            None
        })
    }

    fn window_size(&mut self) -> Option<WindowSize> {
        Some(WindowSize {
            rows: self.u16()?,
            cols: self.u16()?,
        })
    }

    fn timestamp(&mut self) -> Option<Timestamp> {
        Some(Timestamp {
            secs: self.i64()?,
            nanos: self.u32()?,
        })
    }

    fn transfer_kind(&mut self) -> Option<TransferKind> {
        Some(match self.variant(2)? {
            0 => TransferKind::File,
            _ => TransferKind::Tree,
        })
    }

    fn client_frame(&mut self) -> Option<ClientFrame<'a>> {
        Some(match self.variant(23)? {
            0 => ClientFrame::Hello(ClientHello {
                magic: [self.byte()?, self.byte()?, self.byte()?, self.byte()?],
                min_version: self.u16()?,
                max_version: self.u16()?,
            }),
            1 => ClientFrame::Exec(self.exec()?),
            2 => ClientFrame::Stdin(self.bytes()?),
            3 => ClientFrame::StdinEof,
            4 => ClientFrame::Auth(ClientProof {
                nonce: self.array()?,
                mac: self.bytes()?,
            }),
            5 => ClientFrame::KillAll,
            6 => ClientFrame::Signal(self.byte()?),
            7 => ClientFrame::Resize(self.window_size()?),
            8 => ClientFrame::Cancel(Cancel {
                grace_ms: self.option_u32()?,
            }),
            9 => ClientFrame::ExecPart(ExecPart {
                list: match self.variant(2)? {
                    0 => ListKind::Argv,
                    _ => ListKind::Env,
                },
                data: self.bytes()?,
            }),
            10 => ClientFrame::Put(PutRequest {
                path: self.bytes()?,
                kind: self.transfer_kind()?,
                mode: self.option_u32()?,
                owner: self.option_bytes()?,
                mtime: if self.some()? {
                    Some(self.timestamp()?)
                } else {
                    None
                },
                size: if self.some()? {
                    Some(self.u64()?)
                } else {
                    None
                },
                create_parents: self.bool()?,
                no_clobber: self.bool()?,
                user: self.option_bytes()?,
            }),
            11 => ClientFrame::PutEnd(self.array()?),
            12 => ClientFrame::Get(GetRequest {
                path: self.bytes()?,
                kind: self.transfer_kind()?,
                user: self.option_bytes()?,
            }),
            13 => ClientFrame::Info,
            14 => ClientFrame::Shutdown(ShutdownRequest {
                reboot: self.bool()?,
                grace_ms: self.u32()?,
            }),
            15 => ClientFrame::TimeSync(self.timestamp()?),
            16 => ClientFrame::Reseed(self.bytes()?),
            17 => ClientFrame::StartJob(JobStart {
                name: self.option_bytes()?,
            }),
            18 => ClientFrame::Jobs(JobQuery {
                user: self.option_bytes()?,
            }),
            19 => ClientFrame::Attach(AttachRequest {
                job: self.bytes()?,
                user: self.option_bytes()?,
                since_stdout: self.u64()?,
                since_stderr: self.u64()?,
                follow: self.bool()?,
                stdin: self.bool()?,
            }),
            20 => ClientFrame::Wait(self.job_request()?),
            21 => ClientFrame::Kill(KillJob {
                job: self.bytes()?,
                user: self.option_bytes()?,
                signal: self.byte()?,
                grace_ms: self.option_u32()?,
            }),
            _ => ClientFrame::Remove(self.job_request()?),
        })
    }

    fn job_request(&mut self) -> Option<JobRequest<'a>> {
        Some(JobRequest {
            job: self.bytes()?,
            user: self.option_bytes()?,
        })
    }

    fn exec(&mut self) -> Option<ExecRequest<'a>> {
        Some(ExecRequest {
            argv: StrList(self.bytes()?),
            env: StrList(self.bytes()?),
            clean_env: self.bool()?,
            cwd: self.option_bytes()?,
            stdin: match self.variant(2)? {
                0 => StdinMode::Null,
                _ => StdinMode::Pipe,
            },
            user: self.option_bytes()?,
            pty: if self.some()? {
                Some(self.window_size()?)
            } else {
                None
            },
            timeout_ms: self.u64()?,
            kill_grace_ms: self.option_u32()?,
            kill_tree_on_exit: self.bool()?,
            max_output: self.u64()?,
        })
    }
}
